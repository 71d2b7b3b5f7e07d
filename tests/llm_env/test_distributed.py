"""llm_env.distributed in one process (every helper is then the local formula, bit for bit) and in a real
one-rank gloo group started from torchrun's environment variables (the path of ``torchrun
--nproc-per-node 1``). The 2-rank behaviour is tested in tests/agents, tests/rewards and tests/rlhf_bench."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from agents.losses import masked_mean, masked_var, masked_whiten
from llm_env import distributed as D


def test_rank_seeds_draw_different_samples_on_every_rank():
    """torch's CPU generator keeps only a seed's low 32 bits: a stride of 2**32 gave every rank rank 0's draws."""
    seeds = [D.rank_seed(7 * 1_000_003 + 5, of_rank=r) for r in range(8)]
    assert seeds[0] == 7 * 1_000_003 + 5  # one process draws what it always drew
    draws = {tuple(torch.rand(4, generator=torch.Generator().manual_seed(s)).tolist()) for s in seeds}
    assert len(draws) == 8
    assert len({s % 2**32 for s in seeds}) == 8


def test_without_a_launcher_everything_is_local():
    assert not D.launched() and not D.init_distributed()  # a plain process: no group is started
    assert (D.world_size(), D.rank(), D.is_main_process(), D.rank_seed(7)) == (1, 0, True, 7)
    prompts = ["a", "b", "c"]
    assert D.shard_prompts(prompts, num_envs=8) is prompts  # one process keeps its prompt source as it is
    model = nn.Linear(3, 2)
    assert D.data_parallel(model) is model and D.unwrap_parallel(model) is model and not D.is_sharded(model)
    with D.gradient_sync(model, enabled=False), D.full_parameters(model):
        model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None
    assert D.all_reduce_means({"a": 1.5}) == {"a": 1.5} and D.all_gather_objects({"x": 1}) == [{"x": 1}]
    assert D.all_reduce_sums({"a": 2, "b": 0.5}) == {"a": 2.0, "b": 0.5}
    assert D.full_state_dict(model, trainable_only=True).keys() == {"weight", "bias"}


def test_global_statistics_are_the_local_formulas_bit_for_bit_in_one_process():
    x = torch.randn(4, 7)
    mask = torch.rand(4, 7) > 0.3
    assert torch.equal(D.global_masked_mean(x, mask), masked_mean(x, mask))
    assert torch.equal(D.global_masked_var(x, mask), masked_var(x, mask))
    assert torch.equal(D.global_masked_whiten(x, mask), masked_whiten(x, mask))
    assert torch.equal(
        D.global_masked_whiten(x, mask, shift_mean=False), masked_whiten(x, mask, shift_mean=False)
    )


def test_divisibility_errors_name_the_numbers():
    assert D.check_divisible("episodes_per_update", 8, 4) == 2
    with pytest.raises(ValueError, match="episodes_per_update=6 is not divisible by the world size 4"):
        D.check_divisible("episodes_per_update", 6, 4)
    from agents.ppo import PPOConfig

    PPOConfig(episodes_per_update=16, minibatch_size=8, gradient_accumulation_steps=2).check_world_size(4)
    with pytest.raises(ValueError, match="minibatch_size=6 is not divisible by the world size 4"):
        PPOConfig(episodes_per_update=12, minibatch_size=6).check_world_size(4)
    with pytest.raises(
        ValueError, match=r"gradient_accumulation_steps \(4\) must divide the per-rank minibatch"
    ):
        PPOConfig(episodes_per_update=8, minibatch_size=8, gradient_accumulation_steps=4).check_world_size(4)


def test_minibatches_dealt_by_one_global_order_are_those_of_one_process():
    """Ranks holding 3, 5, 0 and 2 examples (numbered in rank order) take, for every minibatch, exactly the
    examples of the single-process minibatch, whose order is ``torch.randperm`` cut into minibatches."""
    counts, size, epochs = [3, 5, 0, 2], 4, 2
    single = D.deal_minibatches([10], size, epochs=epochs, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    expected = [
        order.split(size) for order in (torch.randperm(10, generator=generator) for _ in range(epochs))
    ]
    expected = [chunk for chunks in expected for chunk in chunks]  # 3 minibatches per epoch: 4, 4 and 2
    assert [m.size for m in single] == [4, 4, 2] * epochs
    assert all(torch.equal(m.rows, chunk) for m, chunk in zip(single, expected))
    offsets = [0, 3, 8, 8]
    dealt = [
        D.deal_minibatches(
            counts, size, epochs=epochs, generator=torch.Generator().manual_seed(5), for_rank=r
        )
        for r in range(len(counts))
    ]
    for k, chunk in enumerate(expected):
        held = torch.cat([dealt[r][k].rows + offsets[r] for r in range(len(counts))])
        assert sorted(held.tolist()) == sorted(chunk.tolist())
        assert all(dealt[r][k].counts == tuple(len(dealt[q][k].rows) for q in range(4)) for r in range(4))
        assert all(dealt[r][k].size == len(chunk) for r in range(4))
        # every rank runs as many micro-batches, the rank with the most rows sets how many
        steps = {len(dealt[r][k].micro_batches(1)) for r in range(4)}
        assert steps == {max(dealt[0][k].counts)}
    assert all(0 <= i < c for r, c in enumerate(counts) for m in dealt[r] for i in m.rows.tolist())
    # one minibatch per epoch without a size; one empty minibatch per epoch without any example
    assert [m.size for m in D.deal_minibatches([3, 5], None, epochs=2, for_rank=1)] == [8, 8]
    empty = D.deal_minibatches([0, 0], 4, epochs=2)
    assert [(m.size, len(m.rows), len(m.micro_batches(2))) for m in empty] == [(0, 0, 1)] * 2
    assert D.all_counts(7) == [7]


@pytest.fixture
def one_rank_group(monkeypatch):
    """The environment torchrun gives a single worker; the group is destroyed afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_launcher_environment_starts_a_gloo_group_and_ddp_wraps(one_rank_group):
    assert D.launched() and D.init_distributed(timeout_s=30) and D.init_distributed()  # idempotent
    assert D.is_distributed() and D.world_size() == 1 and dist.get_backend() == "gloo"
    model = nn.Linear(3, 2)
    wrapped = D.data_parallel(model)
    assert isinstance(wrapped, DistributedDataParallel) and D.unwrap_parallel(wrapped) is model
    with D.gradient_sync(wrapped, enabled=False):  # no_sync: the gradient stays local
        wrapped(torch.ones(2, 3)).sum().backward()
    with D.gradient_sync(wrapped, enabled=True):
        wrapped(torch.ones(2, 3)).sum().backward()
    torch.testing.assert_close(model.bias.grad, torch.full((2,), 4.0))  # 2 rows x 2 backward passes
    assert D.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    with pytest.raises(ValueError, match="strategy must be 'ddp' or 'fsdp'"):
        D.data_parallel(nn.Linear(1, 1), strategy="zero3")
    D.shutdown_distributed()
    assert not D.is_distributed()


def test_a_rank_without_rows_gets_one_stand_in_row():
    from llm_env.distributed import stand_in

    rows, placeholder = stand_in(torch.tensor([3, 1]))
    assert rows.tolist() == [3, 1] and not placeholder
    rows, placeholder = stand_in(torch.tensor([], dtype=torch.long))
    assert rows.tolist() == [0] and rows.dtype == torch.long and placeholder
