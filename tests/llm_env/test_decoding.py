"""The slot KV cache must give the same next-token logits as a full forward over the whole sequence."""

import numpy as np
import pytest
import torch

from llm_env.decoding import IncrementalLM, left_pad
from llm_env.tiny import tiny_gpt2, tiny_llama


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


def tight_model(arch, tokenizer, context):
    if arch == "gpt2":
        return tiny_gpt2(tokenizer, seed=1, n_positions=context)
    return tiny_llama(tokenizer, seed=3, max_position_embeddings=context)


@pytest.mark.parametrize("kind", ["host", "device"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_outside_advance_stay_in_place_however_long_they_wait(arch, kind, tokenizer):
    """decode(advance=mask): a row outside the mask keeps its length and cache, even when it is full."""
    capacity = 8
    model = tight_model(arch, tokenizer, capacity)  # a context of exactly the capacity
    rng = np.random.default_rng(0)
    for wait in (1, 20):
        seqs = [[5, 6, 7], [8, 9]]
        lm = IncrementalLM(model, 2, capacity=capacity)
        ids, lengths = left_pad([np.array(s) for s in seqs], pad_id=0, device="cpu")
        lm.prefill(np.arange(2), ids, lengths)
        for _ in range(wait):  # row 1 waits; row 0 advances until it is full, then waits too
            mask = np.array([len(seqs[0]) < capacity, False])
            tokens = rng.integers(0, len(tokenizer), size=2)
            out = lm.decode(
                torch.as_tensor(tokens), advance=mask if kind == "host" else torch.as_tensor(mask)
            )
            if mask[0]:
                seqs[0].append(int(tokens[0]))
                torch.testing.assert_close(out.logits[0], full_logits(model, seqs[0]), atol=1e-5, rtol=1e-5)
            assert lm.length.tolist() == [len(seqs[0]), 2]
        for _ in range(4):  # now row 1 resumes exactly where it stopped
            tokens = rng.integers(0, len(tokenizer), size=2)
            mask = np.array([False, True])
            out = lm.decode(
                torch.as_tensor(tokens), advance=mask if kind == "host" else torch.as_tensor(mask)
            )
            seqs[1].append(int(tokens[1]))
            torch.testing.assert_close(out.logits[1], full_logits(model, seqs[1]), atol=1e-5, rtol=1e-5)
        assert lm.length.tolist() == [len(seqs[0]), 6]


def test_a_capacity_beyond_the_model_context_is_rejected(tokenizer):
    with pytest.raises(
        ValueError, match=r"9 tokens do not fit the model's context of 8 positions \(config.n_positions\)"
    ):
        IncrementalLM(tiny_gpt2(tokenizer, n_positions=8), 1, capacity=9)
    IncrementalLM(tiny_gpt2(tokenizer, n_positions=8), 1, capacity=8)
