"""Tiny tokenizers and models built from configs, for tests, examples and the offline benchmark.

Nothing can be downloaded at run time on a CI machine, so everything small enough to be built locally is
built here: a word-level or a character-level tokenizer from a corpus and GPT-2- or Llama-shaped causal LMs
from configs.
Saved with ``save_pretrained`` and loaded back by path, they exercise the same loading code as hub models.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
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

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_ARCHITECTURES",
    "char_tokenizer",
    "chat_tokenizer",
    "numbered_tokenizer",
    "tiny_causal_lm",
    "tiny_gpt2",
    "tiny_llama",
    "word_tokenizer",
]

#: The special tokens of every tiny tokenizer, at ids 0, 1 and 2: padding, end of sequence, unknown word.
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
    return _fast(tokenizer)


def _fast(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """``tokenizer`` as a transformers tokenizer with the three special tokens, decoding text as it is."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # " ." stays " .": decoding must give back the encoded text
    )


def word_tokenizer(corpus: Iterable[str], *, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer trained on ``corpus``, with ``<pad>``, ``<eos>`` and ``<unk>``.

    Decoding joins words with single spaces, so ``decode(encode(text)) == text`` for whitespace-normalised
    text, and the decoding of a prefix is a prefix of the decoding (what the environment relies on to cut
    the response text from the full text).
    """
    return _wrap(models.WordLevel(unk_token="<unk>"), corpus, vocab_size)


def char_tokenizer(corpus: Iterable[str], *, printable: bool = True) -> PreTrainedTokenizerFast:
    r"""A character-level tokenizer: every character of ``corpus`` (and, with ``printable``, of
    ``string.printable``) is one token, after ``<pad>``, ``<eos>`` and ``<unk>``; other characters encode to
    ``<unk>``.

    For free text a word vocabulary cannot cover (the questions of a procedural generator, with their
    punctuation, digits and newlines): ``decode(encode(text)) == text`` exactly, spaces and newlines included,
    for text written in the vocabulary, and the decoding of a prefix is a prefix of the decoding (what the
    environment relies on to cut the response text from the full text).

    >>> tokenizer = char_tokenizer(["12 + 3 =\n"])
    >>> ids = tokenizer("1 + 2 =\n 3")["input_ids"]
    >>> len(ids), tokenizer.decode(ids)
    (10, '1 + 2 =\n 3')
    """
    alphabet = {c for text in corpus for c in text}
    if printable:
        alphabet |= set(string.printable)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(alphabet):  # sorted: the same corpus gives the same ids whatever its order
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per char
    tokenizer.decoder = decoders.Fuse()  # concatenated as they are: no separator, nothing cleaned up
    return _fast(tokenizer)


def numbered_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` tokens: ids 0-2 are ``<pad>``, ``<eos>``,
    ``<unk>`` and id ``i >= 3`` is the word ``w{i}``, so a text of P words is exactly P tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    return _wrap(models.WordLevel(vocab=vocab, unk_token="<unk>"))


#: The ChatML layout of Qwen and SmolLM instruct models: each turn is
#: ``<|im_start|>role\ncontent<|im_end|>\n``.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(
    corpus: Iterable[str],
    *,
    template: str = CHATML_TEMPLATE,
    turn_tokens: tuple[str, str] = ("<|im_start|>", "<|im_end|>"),
) -> PreTrainedTokenizerFast:
    """A :func:`word_tokenizer` that carries a chat template (ChatML by default) and its turn markers as
    special tokens, like an instruct model's tokenizer; the role names are words of its vocabulary."""
    tokenizer = word_tokenizer([*corpus, "system user assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": list(turn_tokens)})
    tokenizer.chat_template = template
    return tokenizer


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


def _decoder(**fields: Any) -> dict[str, Any]:
    """The common shape of a tiny rotary decoder (2 layers of width 32, 4 query and 2 key/value heads)."""
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return {**shape, **fields}


#: The architecture conformance matrix: name -> (transformers config class, causal-LM class, config fields).
#: Tiny random configurations of the families users bring, each with the feature that makes it different;
#: the sliding windows (4 tokens) are shorter than an episode, so decoding crosses them. Adding an
#: architecture to every conformance test is one line here (:func:`tiny_causal_lm` builds one by name).
#:
#: :meta hide-value:
TINY_ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, n_positions=256)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _decoder()),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _decoder()),
    "qwen2-sliding": (  # use_sliding_window: layers from max_window_layers on slide
        "Qwen2Config",
        "Qwen2ForCausalLM",
        _decoder(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _decoder(head_dim=8)),  # QK-norm
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _decoder(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", _decoder(head_dim=8, sliding_window=4)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        _decoder(head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2),
    ),
    "gemma2": (  # alternating local/global layers, attention and final logit soft-capping (eager)
        "Gemma2Config",
        "Gemma2ForCausalLM",
        _decoder(
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),
    "gemma3": (  # five local layers to one global in the real models; two to one here, QK-norm
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _decoder(
            head_dim=8,
            num_hidden_layers=3,
            sliding_window=4,
            query_pre_attn_scalar=8,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _decoder(sliding_window=None)),  # fused qkv, partial rotary
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _decoder()),  # post-norm, QK-norm
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", _decoder(no_rope_layers=[1, 0])),  # a NoPE layer
    "gpt-neox": (  # parallel attention and MLP, rotary on half the head
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.5,
        ),
    ),
    "falcon": (  # parallel attention, multi-query
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    ),
    "opt": (  # learned positions
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
        ),
    ),
    "phi": (  # parallel attention, partial rotary, biases
        "PhiConfig",
        "PhiForCausalLM",
        _decoder(num_key_value_heads=4, partial_rotary_factor=0.5),
    ),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _decoder(sliding_window=4)),
}


def tiny_causal_lm(
    architecture: str, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **config_fields: Any
) -> PreTrainedModel:
    """A tiny random causal LM of one of :data:`TINY_ARCHITECTURES`, sized to ``tokenizer``; ``config_fields``
    override the matrix's fields (e.g. ``sliding_window``)."""
    import transformers

    try:
        config_name, model_name, fields = TINY_ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown tiny architecture {architecture!r}; choose one of {sorted(TINY_ARCHITECTURES)}"
        ) from None
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), **_ids(tokenizer), **{**fields, **config_fields}
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()
