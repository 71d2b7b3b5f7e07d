"""The critic-free agents (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, ReMax) on 2 gloo processes (CPU),
against the single-process run.

Each test launches this file under torchrun (``python -m torch.distributed.run``, 1 thread per rank) with a
scenario name; the ranks write what they measured to a work directory and the test compares it with the
same computation done here in one process. Launches have a timeout that fails the test instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from agents.dapo import DAPOAgent, DAPOConfig
from agents.dr_grpo import DrGRPOAgent, DrGRPOConfig
from agents.grpo import GRPOAgent, GRPOConfig
from agents.gspo import GSPOAgent, GSPOConfig
from agents.reinforce_pp import ReinforcePPAgent, ReinforcePPConfig
from agents.remax import ReMaxAgent, ReMaxConfig
from agents.rloo import RLOOAgent, RLOOConfig
from agents.rollout import Trajectories
from llm_env.distributed import all_gather_objects, deal_minibatches, full_state_dict, is_main_process, rank
from llm_env.tiny import tiny_gpt2, word_tokenizer
from tests.agents.distributed_common import CORPUS, PROMPTS, assert_same_weights, digest, good_count, run_rank

pytestmark = pytest.mark.slow

GROUPS, SIZE = 4, 4  # the collected rollout: 4 prompts x 4 responses; each rank learns from 2 groups
UPDATE = dict(
    learning_rate=1e-3,
    prompts_per_update=GROUPS,
    group_size=SIZE,
    epochs=2,
    minibatch_size=4,  # four minibatches per epoch, dealt from the rank-order numbering as in one process
    gradient_accumulation_steps=2,
    kl_coef=0.05,
    kl_estimator="k1",
    progress=False,
    seed=0,
)
# name: (agent, config, overrides); every aggregation mode of agents.losses.aggregate_loss is among them.
CASES = {
    "grpo": (GRPOAgent, GRPOConfig, {}),  # KL in the reward, seq-mean-token-mean
    "grpo-kl-loss": (GRPOAgent, GRPOConfig, {"kl_in": "loss", "kl_estimator": "k3"}),
    "grpo-lora-kl-loss": (GRPOAgent, GRPOConfig, {"kl_in": "loss", "kl_estimator": "k3", "lora_rank": 4}),
    "dr-grpo": (DrGRPOAgent, DrGRPOConfig, {}),  # seq-mean-token-sum-norm
    "dapo": (DAPOAgent, DAPOConfig, {}),  # token-mean, overlong shaping
    "gspo": (GSPOAgent, GSPOConfig, {"clip_range": 0.2, "clip_range_high": 0.2}),
    "rloo": (RLOOAgent, RLOOConfig, {}),  # seq-mean-token-sum
    "reinforce-pp": (ReinforcePPAgent, ReinforcePPConfig, {"group_size": 1, "prompts_per_update": 16}),
    "grpo-fsdp": (GRPOAgent, GRPOConfig, {"strategy": "fsdp"}),
    "grpo-fsdp-lora": (GRPOAgent, GRPOConfig, {"strategy": "fsdp", "lora_rank": 4, "kl_in": "loss"}),
}
TRAIN = dict(
    learning_rate=3e-3,
    prompts_per_update=4,
    group_size=2,
    epochs=2,
    minibatch_size=4,  # two minibatches per epoch
    gradient_accumulation_steps=2,
    lr_schedule="cosine",
    kl_in="loss",
    kl_coef=0.05,
    lora_rank=4,
    progress=False,
    seed=0,
)
BUDGET = {"dapo": 400, "remax": 60, "grpo-fsdp": 60}  # sampled response tokens of the token-budget runs


def characters(prompts, responses):
    return [float(len(r)) for r in responses]


def characters_on_rank_0(prompts, responses):
    """The response's length in characters on rank 0 and 0 elsewhere: DAPO finds informative groups on rank 0
    at once and never on rank 1, so rank 0 waits while rank 1 resamples, and rank 1 ends with none."""
    return [float(len(r)) if rank() == 0 else 0.0 for r in responses]


def episodes_of(trajectories: Trajectories, name: str, part: int, parts: int) -> Trajectories:
    """Rank ``part``'s whole groups of the collected rollout (the groups of REINFORCE++ are single episodes)."""
    return trajectories.select(np.array_split(np.arange(len(trajectories)), parts)[part])


def build(work: Path, name: str):
    agent_class, config_class, overrides = CASES[name]
    torch.manual_seed(0)  # the same LoRA initialisation in every process
    return agent_class(str(work / "policy"), config=config_class(**{**UPDATE, **overrides}))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny policy and a GRPO rollout of 4 groups of 4 (the same data for 1 and for 2 ranks)."""
    path = tmp_path_factory.mktemp("distributed_pg")
    tokenizer = word_tokenizer(CORPUS)
    tiny_gpt2(tokenizer, seed=2).save_pretrained(path / "policy")
    tokenizer.save_pretrained(path / "policy")
    agent = GRPOAgent(str(path / "policy"), config=GRPOConfig(**UPDATE))
    env = agent.make_env(PROMPTS, good_count, num_envs=4, max_new_tokens=5)
    trajectories = agent.rollout(env)
    assert len(set(trajectories.lengths.tolist())) > 1  # unequal lengths: token and sequence means differ
    torch.save(trajectories, path / "episodes.pt")
    return path


def single_process_update(work: Path, name: str, episodes=None) -> tuple[dict, dict]:
    agent = build(work, name)
    trajectories = torch.load(work / "episodes.pt", weights_only=False)
    stats = agent.learn(trajectories if episodes is None else trajectories.select(episodes))
    return {k: v.detach().clone() for k, v in agent.policy.state_dict().items()}, stats


def assert_same_stats(actual: dict, expected: dict, keys) -> None:
    for key in keys:
        assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def update_run(work, torchrun):
    """The ``update`` scenario on 2 ranks (launched once for the tests that read its results)."""
    code, output = torchrun(__file__, "update", work, timeout=600)
    assert code == 0, output[-6000:]
    return json.loads((work / "update.json").read_text())


STATS = ("score", "kl", "reward", "response_length", "entropy", "advantage_mean", "advantage_std")


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", [n for n in CASES if "fsdp" not in n])
def test_one_update_on_two_ranks_equals_one_update_in_one_process(work, update_run, name):
    """2 ranks x 2 groups give the update of 1 process x 4 groups (rank 0's first), with four minibatches per
    epoch dealt by one global order (their episodes spread unevenly over the ranks): every loss normaliser
    (sequences, tokens, Dr. GRPO's constant, the KL term's), REINFORCE++'s batch whitening and the logged
    statistics are global.
    The loss and the gradient norm are compared too: Adam and gradient clipping would hide a normaliser that
    is off by the same factor on every rank."""
    dealt = deal_minibatches([8, 8], 4, epochs=2, generator=torch.Generator().manual_seed(0))  # update 0's
    assert (4, 0) in {m.counts for m in dealt}  # some minibatch is all rank 0's: rank 1 joins with no loss
    expected, stats = single_process_update(work, name)
    assert_same_weights(load_file(work / f"{name}.safetensors"), expected)
    keys = (*STATS, "policy_loss", "grad_norm") + (("kl_loss",) if "kl-loss" in name else ())
    assert_same_stats(update_run["stats"][name], stats, keys)
    assert len(set(update_run["digests"][name])) == 1  # every rank holds the same weights


def test_dapo_ranks_with_unequal_kept_groups_make_the_update_on_every_kept_group(work, update_run):
    """DAPO may keep different numbers of groups on different ranks: rank 0 holds 2 groups and rank 1 one
    (padded with rows that carry no loss), or none at all (``extras["padding"]``); the update is the
    single-process one on the kept groups."""
    expected, stats = single_process_update(work, "dapo", episodes=np.arange(3 * SIZE))
    assert_same_weights(load_file(work / "dapo-uneven.safetensors"), expected)
    assert_same_stats(update_run["stats"]["dapo-uneven"], stats, (*STATS, "policy_loss", "grad_norm"))
    expected, stats = single_process_update(work, "dapo", episodes=np.arange(2 * SIZE))
    assert_same_weights(load_file(work / "dapo-padding.safetensors"), expected)
    assert_same_stats(update_run["stats"]["dapo-padding"], stats, (*STATS, "policy_loss", "grad_norm"))


def test_fsdp2_update_matches_ddp(work, update_run):
    """FSDP2 (parameters, gradients and optimizer state sharded) makes the update DDP makes, with and
    without LoRA, and its checkpoint resumes exactly."""
    assert_same_weights(load_file(work / "grpo-fsdp.safetensors"), load_file(work / "grpo.safetensors"))
    expected, stats = single_process_update(work, "grpo-fsdp-lora")  # one process: the strategy is ignored
    assert_same_weights(load_file(work / "grpo-fsdp-lora.safetensors"), expected)
    assert_same_stats(update_run["stats"]["grpo-fsdp"], update_run["stats"]["grpo"], (*STATS, "policy_loss"))
    assert update_run["fsdp_resumes"] is True


def test_bad_configurations_fail_before_any_work(update_run):
    errors = update_run["errors"]
    assert errors["prompts_per_update"].startswith(
        "prompts_per_update=3 is not divisible by the world size 2"
    )
    assert errors["minibatch"].startswith("minibatch_size=3 is not divisible by the world size 2")
    assert errors["accumulation"].startswith("gradient_accumulation_steps (8) must divide the per-rank")
    assert errors["prompts"].startswith("6 prompts cannot give 2 ranks x 4 envs a disjoint shard")
    shards = update_run["shards"]
    assert (
        shards[0] and not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(PROMPTS)
    )


def test_grpo_resumes_exactly_on_two_ranks_and_the_budget_stops_every_rank_together(work, torchrun):
    """GRPO (LoRA, KL in the loss, two minibatches, gradient accumulation, cosine schedule) stopped after
    update 2 and resumed from its checkpoint ends bit for bit where the uninterrupted 2-rank run ends, on
    identical weights on both ranks. DAPO (dynamic sampling, which resamples on some ranks and not others)
    and ReMax (a greedy rollout per update) on a token budget stop after the same update on every rank, with
    the same global statistics, instead of hanging; so does a GRPO run sharded with FSDP2."""
    code, output = torchrun(__file__, "train", work, timeout=600)
    assert code == 0, output[-6000:]
    result = json.loads((work / "train.json").read_text())
    assert result["resumed_equals_straight"] == [True, True]
    assert result["update_after_resume"] == 4
    assert len(set(result["digests"])) == 1 and result["same_history_on_every_rank"]
    history = result["history"]
    assert [h["update"] for h in history] == [1, 2, 3, 4]
    checkpoint = torch.load(work / "ck" / "training.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2  # every rank's RNG state
    for name in ("dapo", "remax", "grpo-fsdp"):
        budget = result["budget"][name]
        assert budget["same_on_every_rank"], name
        runs = budget["history"]
        spent = [0] + [h["sampled_tokens"] for h in runs]  # every rank's tokens, counted by every rank
        assert spent[-1] >= BUDGET[name] > spent[-2], (
            name,
            spent,
        )  # the update that reached the budget was the last
    for h in result["budget"]["dapo"]["history"]:  # rank 0 kept its 2 groups in round 1 and waited 2 rounds
        assert (h["groups_kept"], h["sampling_rounds"], h["groups_sampled"]) == (2, 3, 2 + 3 * 2)
    assert all("greedy_score" in h for h in result["budget"]["remax"]["history"])


# ----------------------------------------------------------------------------------- the rank's side
def _update(work: Path) -> None:
    errors = {}
    for key, make in (
        ("prompts_per_update", lambda: GRPOAgent(str(work / "policy"), config=GRPOConfig(prompts_per_update=3, group_size=2))),
        ("minibatch", lambda: GRPOConfig(prompts_per_update=6, group_size=2, minibatch_size=3).check_world_size(2)),
        ("accumulation", lambda: GRPOConfig(prompts_per_update=4, group_size=2, gradient_accumulation_steps=8).check_world_size(2)),
        ("prompts", lambda: build(work, "grpo").make_env(PROMPTS[:6], good_count, num_envs=4)),
    ):  # fmt: skip
        try:
            make()
        except ValueError as exc:
            errors[key] = str(exc)
    episodes = torch.load(work / "episodes.pt", weights_only=False)
    stats, digests = {}, {}
    for name in CASES:
        agent = build(work, name)
        stats[name] = agent.learn(episodes_of(episodes, name, rank(), 2))
        state = {k: v.detach().clone().contiguous() for k, v in full_state_dict(agent.policy).items()}
        if "fsdp" not in name:
            digests[name] = all_gather_objects(digest(agent.policy))
        if is_main_process():
            save_file(state, str(work / f"{name}.safetensors"))
        if name == "grpo-fsdp":  # a checkpoint of the shards resumes exactly: one more update on each side
            agent.save_checkpoint(work / "ck-fsdp")
            resumed = build(work, name)
            resumed.load_checkpoint(work / "ck-fsdp")
            mine = episodes_of(episodes, name, rank(), 2)
            agent.learn(mine)
            resumed.learn(mine)
            a, b = full_state_dict(agent.policy), full_state_dict(resumed.policy)
            fsdp_resumes = all(torch.equal(a[k], b[k]) for k in a) and resumed.update == 2
    # DAPO with unequal kept groups: rank 0 holds groups 0 and 1, rank 1 group 2 (or nothing: padding).
    for name, mine in (("dapo-uneven", [[0, 1], [2]]), ("dapo-padding", [[0, 1], [2]])):
        agent = build(work, "dapo")
        groups = np.asarray(mine[rank()])
        part = episodes.select((groups[:, None] * SIZE + np.arange(SIZE)).reshape(-1))
        if name == "dapo-padding" and rank() == 1:
            part.extras["padding"] = True
        stats[name] = agent.learn(part)
        if is_main_process():
            save_file(
                {k: v.clone() for k, v in agent.policy.state_dict().items()},
                str(work / f"{name}.safetensors"),
            )
    env = build(work, "grpo").make_env(PROMPTS, good_count, num_envs=4)  # this rank's shard of the prompts
    shards = all_gather_objects([env.prompt_text(i) for i in range(env.num_prompts)])
    if is_main_process():
        result = {
            "errors": errors,
            "stats": stats,
            "digests": digests,
            "shards": shards,
            "fsdp_resumes": fsdp_resumes,
        }
        (work / "update.json").write_text(json.dumps(result))


def _train(work: Path) -> None:
    config = GRPOConfig(**TRAIN)

    def run(updates, **kwargs):
        torch.manual_seed(0)
        agent = GRPOAgent(str(work / "policy"), config=config)
        if kwargs.pop("resume", False):
            agent.load_checkpoint(work / "ck")
        env = agent.make_env(PROMPTS, good_count, num_envs=2, max_new_tokens=5)
        return agent, agent.train(env, updates, **kwargs)

    straight, history = run(4)

    class Interrupt(Exception):
        pass

    def stop_after_two(update, stats):
        if update == 2:
            raise Interrupt

    with contextlib.suppress(Interrupt):
        run(4, checkpoint_dir=work / "ck", callback=stop_after_two)
    resumed, _ = run(4, resume=True)
    same = all(
        torch.equal(a, b)
        for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values())
    )
    results = all_gather_objects(same)
    digests = all_gather_objects(digest(straight.policy))
    histories = all_gather_objects(_comparable(history))

    budget = {}
    for name, agent_class, config, reward in (
        ("dapo", DAPOAgent, DAPOConfig(prompts_per_update=4, group_size=4, learning_rate=1e-2, max_sampling_rounds=3, progress=False), characters_on_rank_0),
        ("remax", ReMaxAgent, ReMaxConfig(prompts_per_update=4, learning_rate=1e-2, progress=False), characters),
        ("grpo-fsdp", GRPOAgent, GRPOConfig(prompts_per_update=2, group_size=2, strategy="fsdp", learning_rate=1e-2, progress=False), characters),
    ):  # fmt: skip
        agent = agent_class(str(work / "policy"), config=config)
        env = agent.make_env(PROMPTS, reward, num_envs=2, max_new_tokens=5)
        runs = agent.train(env, total_tokens=BUDGET[name])
        every = all_gather_objects(_comparable(runs))
        budget[name] = {"history": runs, "same_on_every_rank": all(h == every[0] for h in every)}
        agent.save_pretrained(work / f"{name}-policy")  # FSDP: gathered on rank 0
    if is_main_process():
        result = {
            "digests": digests,
            "resumed_equals_straight": results,
            "same_history_on_every_rank": all(h == histories[0] for h in histories),
            "update_after_resume": resumed.update,
            "history": history,
            "budget": budget,
        }
        (work / "train.json").write_text(json.dumps(result))


def _comparable(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """A history without its timings (which differ between ranks)."""
    return [{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in history]


if __name__ == "__main__":
    run_rank({"update": _update, "train": _train})
