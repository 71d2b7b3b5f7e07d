"""``IncrementalLM.extend``: a chunk of tokens (a tool's or a user's reply) appended to rows of the slot KV
cache in one forward pass gives the logits of one full forward pass over the longer sequence, for every
architecture of the conformance matrix (sliding windows shorter than the conversation included), with
chunks of different lengths, rows that do not take one, and decodes before and after."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from llm_env.decoding import IncrementalLM, left_pad
from llm_env.fused import FusedDecoder
from llm_env.tiny import TINY_ARCHITECTURES, numbered_tokenizer, tiny_causal_lm

ARCHITECTURES = sorted(TINY_ARCHITECTURES)
VOCAB = 48


@pytest.fixture(scope="module")
def tok():
    return numbered_tokenizer(VOCAB)


def full_logprobs(model, sequences: list[list[int]], context=None) -> torch.Tensor:
    """(n, V) log-probabilities of the token after each sequence, from one right-padded full forward pass."""
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    last = torch.tensor([len(s) - 1 for s in sequences])
    with torch.no_grad(), context() if context else torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits[torch.arange(len(sequences)), last], dim=-1)


def run_conversation(lm, model, rng, *, batch=3, capacity=40, context=None):
    """Prefill, decode, extend some rows, decode, extend again; compare every output with full passes."""
    seqs = [list(rng.integers(3, VOCAB, size=n)) for n in (2, 5, 3)][:batch]
    ids, lens = left_pad([np.array(s) for s in seqs], 0, "cpu")
    out = lm.prefill(np.arange(batch), ids, lens).logits
    worst = 0.0

    def check(rows, logits):
        nonlocal worst
        expected = full_logprobs(model, [seqs[r] for r in rows], context)
        worst = max(worst, (torch.log_softmax(logits, -1) - expected).abs().max().item())

    check(range(batch), out)
    for round_ in range(3):
        for _ in range(2):  # a few single-token decodes, one row waiting
            tokens = rng.integers(3, VOCAB, size=batch)
            advance = np.ones(batch, dtype=bool)
            advance[round_ % batch] = False
            logits = lm.decode(torch.as_tensor(tokens), advance=advance).logits
            for r in np.flatnonzero(advance):
                seqs[r].append(int(tokens[r]))
            check(np.flatnonzero(advance), logits[advance])
        rows = np.array([r for r in range(batch) if r != (round_ + 1) % batch])
        chunks = [np.array(rng.integers(3, VOCAB, size=int(rng.integers(1, 7)))) for _ in rows]
        padded, lengths = left_pad(chunks, 0, "cpu")
        logits = lm.extend(rows, padded, lengths).logits
        for r, chunk in zip(rows, chunks):
            seqs[r].extend(int(t) for t in chunk)
        check(rows, logits)
    return worst


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_extend_equals_a_full_forward_pass(tok, architecture):
    model = tiny_causal_lm(architecture, tok, seed=0)
    lm = IncrementalLM(model, 3, 40)
    assert run_conversation(lm, model, np.random.default_rng(0)) < 1e-4


def test_extend_crosses_a_sliding_window(tok):
    """A window of 4 slots shorter than each chunk plus its context: the masks must slide inside the chunk."""
    model = tiny_causal_lm("mistral", tok, seed=1, sliding_window=4)
    lm = IncrementalLM(model, 3, 40)
    assert run_conversation(lm, model, np.random.default_rng(1)) < 1e-4


def test_fused_extend_serves_policy_and_reference(tok):
    base = tiny_causal_lm("llama", tok, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(base, config)
    fused = FusedDecoder(policy, 2, 30)
    rng = np.random.default_rng(2)
    seqs = [list(rng.integers(3, VOCAB, size=n)) for n in (3, 6)]
    ids, lens = left_pad([np.array(s) for s in seqs], 0, "cpu")
    fused.prefill(np.arange(2), ids, lens)
    tokens = torch.as_tensor(rng.integers(3, VOCAB, size=2))
    fused.decode(tokens)
    for r in range(2):
        seqs[r].append(int(tokens[r]))
    chunk = [np.array([5, 6, 7, 8])]
    padded, lengths = left_pad(chunk, 0, "cpu")
    reference = fused.extend(np.array([1]), padded, lengths).logits
    seqs[1].extend([5, 6, 7, 8])
    expected_ref = full_logprobs(policy, [seqs[1]], policy.disable_adapter)
    expected_policy = full_logprobs(policy, [seqs[1]])
    assert torch.allclose(torch.log_softmax(reference, -1), expected_ref, atol=1e-4)
    assert torch.allclose(torch.log_softmax(fused.policy_logits[1:2], -1), expected_policy, atol=1e-4)
    assert not torch.allclose(expected_ref, expected_policy, atol=1e-3)  # the adapter matters


def test_extend_rejects_what_does_not_fit(tok):
    model = tiny_causal_lm("gpt2", tok)
    lm = IncrementalLM(model, 2, 8)
    ids, lens = left_pad([np.array([3, 4, 5]), np.array([6])], 0, "cpu")
    lm.prefill(np.arange(2), ids, lens)
    padded, lengths = left_pad([np.arange(3, 9)], 0, "cpu")
    with pytest.raises(ValueError, match="overflows the cache capacity 8"):
        lm.extend(np.array([0]), padded, lengths)
    with pytest.raises(ValueError, match="one length in"):
        lm.extend(np.array([0]), padded, np.array([0]))
    # Nothing changed: the row still extends by what fits.
    padded, lengths = left_pad([np.arange(3, 8)], 0, "cpu")
    lm.extend(np.array([0]), padded, lengths)
    assert lm.length.tolist() == [8, 1]
