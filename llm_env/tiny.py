"""Tiny tokenizers and models built from configs, for tests, examples and the offline benchmark.

Nothing can be downloaded at run time on a CI machine, so everything small enough to be built locally is
built here: a word-level tokenizer from a corpus and GPT-2- or Llama-shaped causal LMs from configs.
Saved with ``save_pretrained`` and loaded back by path, they exercise the same loading code as hub models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = ["SPECIAL_TOKENS", "numbered_tokenizer", "tiny_gpt2", "tiny_llama", "word_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def _wrap(
    model: models.WordLevel, train_on: Iterable[str] | None = None, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """Whitespace pre-tokenisation, space-joining decoding and the three special tokens around a word model."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if train_on is not None:
        trainer = trainers.WordLevelTrainer(
            special_tokens=list(SPECIAL_TOKENS), vocab_size=vocab_size or 1_000_000, min_frequency=1
        )
        tokenizer.train_from_iterator(train_on, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def word_tokenizer(corpus: Iterable[str], *, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer trained on ``corpus``, with ``<pad>``, ``<eos>`` and ``<unk>``.

    Decoding joins words with single spaces, so ``decode(encode(text)) == text`` for whitespace-normalised
    text, and the decoding of a prefix is a prefix of the decoding (what the environment relies on to cut
    the response text from the full text).
    """
    return _wrap(models.WordLevel(unk_token="<unk>"), corpus, vocab_size)


def numbered_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` tokens: ids 0-2 are ``<pad>``, ``<eos>``,
    ``<unk>`` and id ``i >= 3`` is the word ``w{i}``, so a text of P words is exactly P tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    return _wrap(models.WordLevel(vocab=vocab, unk_token="<unk>"))


def _ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
    classifier: bool = False,
    **config_fields: Any,
) -> PreTrainedModel:
    """A GPT-2-shaped causal LM (or a one-label sequence classifier) sized to ``tokenizer``; ``config_fields``
    are passed on to ``GPT2Config``."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        num_labels=1,
        **_ids(tokenizer),
        **config_fields,
    )
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(config) if classifier else GPT2LMHeadModel(config)
    return model.eval()


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
    classifier: bool = False,
    **config_fields: Any,
) -> PreTrainedModel:
    """A Llama-shaped causal LM (GQA, RoPE, RMSNorm) sized to ``tokenizer`` (MLP width default 2x hidden);
    ``config_fields`` (e.g. ``rope_parameters``) are passed on to ``LlamaConfig``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        num_labels=1,
        **_ids(tokenizer),
        **config_fields,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config) if classifier else LlamaForCausalLM(config)
    return model.eval()
