"""The static-shape decode step that CUDA graphs capture, checked eagerly on CPU (no GPU needed)."""

import numpy as np
import pytest
import torch

import llm_env
from agents.policy import TokenSampler
from llm_env.decoding import IncrementalLM, left_pad


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_window_step_equals_the_decode_across_restarts(arch, request, tokenizer):
    """Attention over the whole masked cache window gives the logits of the exact-window decode."""
    model = request.getfixturevalue(arch)
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
