"""The static-shape decode step that CUDA graphs capture, checked eagerly on CPU (no GPU needed)."""

import numpy as np
import pytest
import torch

import llm_env
from agents.policy import TokenSampler
from llm_env.decoding import IncrementalLM, left_pad
from llm_env.tiny import tiny_causal_lm, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "gemma3"])
def test_full_window_step_equals_the_decode_across_restarts(arch, request, tokenizer):
    """Attention over the whole masked cache window gives the logits of the exact-window decode, sliding
    windows (4 tokens, crossed here) included."""
    if arch in ("gpt2", "llama"):
        model = request.getfixturevalue(arch)
    else:
        model = tiny_causal_lm(arch, tokenizer, seed=1)
    vocab, batch = len(tokenizer), 3
    rng = np.random.default_rng(1)
    lm = IncrementalLM(model, batch, capacity=20)
    ids, lengths = left_pad([rng.integers(0, vocab, size=n) for n in (2, 5, 1)], pad_id=0, device="cpu")
    lm.prefill(np.arange(batch), ids, lengths)
    for step in range(7):
        tokens = torch.as_tensor(rng.integers(0, vocab, size=batch))
        static = lm._full_window_step(tokens[:, None]).clone()  # writes the slot that decode rewrites
        length = lm.length.clone()
        torch.testing.assert_close(static, lm.decode(tokens).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(lm.length, length + 1)  # only decode advances the rows
        if step in (1, 4):
            ids, lengths = left_pad([rng.integers(0, vocab, size=6)], pad_id=0, device="cpu")
            lm.prefill(np.array([step % batch]), ids, lengths)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_window_step_keeps_rows_that_do_not_advance_inside_the_context(arch, tokenizer):
    """The captured step reads positions from the device lengths: a full row that waits stays in range."""
    capacity = 6
    if arch == "gpt2":
        model = tiny_gpt2(tokenizer, seed=1, n_positions=capacity)
    else:
        model = tiny_llama(tokenizer, seed=3, max_position_embeddings=capacity)
    lm = IncrementalLM(model, 2, capacity=capacity)
    ids, lengths = left_pad([np.array([5, 6, 7]), np.array([8])], pad_id=0, device="cpu")
    lm.prefill(np.arange(2), ids, lengths)
    for token in (9, 10, 11):  # row 0 fills the whole context: positions 3, 4, 5
        lm.decode(torch.tensor([token, token]))
    assert lm.length.tolist() == [capacity, 4]
    wait = np.array([False, True])
    for token in (12, 13):  # row 0 waits, full; row 1 goes on to positions 4 and 5
        static = lm._full_window_step(torch.tensor([[token], [token]])).clone()
        torch.testing.assert_close(static[1], lm.decode(torch.tensor([token, token]), advance=wait).logits[1])
    assert lm.length.tolist() == [capacity, capacity]


def test_cuda_graphs_need_a_cuda_device(gpt2, tokenizer, reward_fn):
    with pytest.raises(ValueError, match="CUDA device"):
        IncrementalLM(gpt2, 1, capacity=8, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        TokenSampler(gpt2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda'"):
        llm_env.TextGenVectorEnv(
            num_envs=1, prompts=["the film was"], tokenizer=tokenizer, reward=reward_fn, reference=gpt2,
            cuda_graphs=True,
        )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager_decode(tokenizer):  # pragma: no cover - runs on GPU machines only
    from llm_env.tiny import tiny_gpt2

    model = tiny_gpt2(tokenizer, seed=3).cuda()
    eager = IncrementalLM(model, 2, capacity=16)
    graphed = IncrementalLM(model, 2, capacity=16, cuda_graph=True)
    ids, lengths = left_pad([np.array([5, 6, 7]), np.array([8])], pad_id=0, device="cuda")
    for lm in (eager, graphed):
        lm.prefill(np.arange(2), ids, lengths)
    for step in range(6):
        tokens = torch.tensor([4 + step, 9], device="cuda")
        torch.testing.assert_close(
            graphed.decode(tokens).logits, eager.decode(tokens).logits, atol=1e-4, rtol=1e-4
        )
    assert graphed.cuda_graph and graphed._graph is not None  # still on the graph: nothing fell back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_with_rows_that_wait_matches_eager(tokenizer):  # pragma: no cover - GPU only
    """advance= is applied outside the captured step; a full, waiting row stays inside the position table
    (past it, CUDA raises a device-side assert)."""
    capacity = 6
    model = tiny_gpt2(tokenizer, seed=3, n_positions=capacity).cuda()
    eager = IncrementalLM(model, 2, capacity=capacity)
    graphed = IncrementalLM(model, 2, capacity=capacity, cuda_graph=True)
    ids, lengths = left_pad([np.array([5, 6, 7]), np.array([8])], pad_id=0, device="cuda")
    for lm in (eager, graphed):
        lm.prefill(np.arange(2), ids, lengths)
    masks = [[True, True]] * 3 + [[False, True]] * 2 + [[False, False]] * 4  # row 0 full, then both
    for step, mask in enumerate(masks):
        tokens = torch.tensor([4 + step, 9], device="cuda")
        advance = np.array(mask)
        a = graphed.decode(tokens, advance=advance).logits
        b = eager.decode(tokens, advance=advance).logits
        torch.testing.assert_close(a[advance], b[advance], atol=1e-4, rtol=1e-4)
    torch.cuda.synchronize()
    assert graphed.length.tolist() == eager.length.tolist() == [capacity, capacity]
    assert graphed.cuda_graph and graphed._graph is not None  # still on the graph: nothing fell back
