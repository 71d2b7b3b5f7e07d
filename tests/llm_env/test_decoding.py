"""The slot KV cache must give the same next-token logits as a full forward over the whole sequence."""

import numpy as np
import pytest
import torch

from llm_env.decoding import IncrementalLM, left_pad


def full_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_incremental_decoding_matches_full_forward_with_restarts(arch, request, tokenizer):
    model = request.getfixturevalue(arch)
    vocab = len(tokenizer)
    rng = np.random.default_rng(0)
    batch = 3
    seqs = [list(rng.integers(0, vocab, size=n)) for n in (3, 6, 1)]
    lm = IncrementalLM(model, batch, capacity=24)
    ids, lengths = left_pad([np.array(s) for s in seqs], pad_id=0, device="cpu")
    out = lm.prefill(np.arange(batch), ids, lengths)
    for step in range(8):
        for row in range(batch):
            torch.testing.assert_close(out.logits[row], full_logits(model, seqs[row]), atol=1e-5, rtol=1e-5)
        tokens = rng.integers(0, vocab, size=batch)
        out = lm.decode(torch.as_tensor(tokens))
        for row in range(batch):
            seqs[row].append(int(tokens[row]))
        if step in (2, 5):  # restart one row with a new, longer prompt while the others continue
            row = step % batch
            seqs[row] = list(rng.integers(0, vocab, size=7))
            ids, lengths = left_pad([np.array(seqs[row])], pad_id=0, device="cpu")
            restarted = lm.prefill(np.array([row]), ids, lengths)
            torch.testing.assert_close(
                restarted.logits[0], full_logits(model, seqs[row]), atol=1e-5, rtol=1e-5
            )
            out.logits[row] = restarted.logits[0]


def test_hidden_state_is_the_final_layer_output(gpt2, tokenizer):
    lm = IncrementalLM(gpt2, 1, capacity=8)
    ids = torch.tensor([[5, 6, 7]])
    out = lm.prefill(np.array([0]), ids, np.array([3]), hidden=True)
    with torch.no_grad():
        expected = gpt2(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(out.hidden[0], expected, atol=1e-5, rtol=1e-5)
    step = lm.decode(torch.tensor([9]), hidden=True)
    with torch.no_grad():
        expected = gpt2(torch.tensor([[5, 6, 7, 9]]), output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(step.hidden[0], expected, atol=1e-5, rtol=1e-5)


def test_prefill_longer_than_capacity_is_rejected(gpt2):
    lm = IncrementalLM(gpt2, 1, capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        lm.prefill(np.array([0]), torch.zeros(1, 6, dtype=torch.long), np.array([6]))


def test_flash_attention_is_rejected_with_advice(gpt2):
    original = gpt2.config._attn_implementation
    gpt2.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="sdpa"):
            IncrementalLM(gpt2, 1, capacity=4)
    finally:
        gpt2.config._attn_implementation = original
