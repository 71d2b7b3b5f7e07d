"""Loading and introspecting Hugging Face models and tokenizers.

Everything that turns a user argument (a model object, a local path or a hub name) into a ready model
lives here, so the environment, the reward models and the agents load weights the same way:
safetensors first (``transformers`` falls back to ``torch.load(weights_only=True)`` for ``.bin``
checkpoints) and never ``trust_remote_code`` unless the caller asks for it.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "cache_kwarg",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "model_context_length",
    "model_device",
    "model_vocab_size",
    "pad_token_id",
    "resolve_device",
    "resolve_dtype",
    "unwrap_model",
]

PathLike = str | os.PathLike

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Turn ``"bfloat16"``/``"bf16"``/``torch.bfloat16``/``None`` into a ``torch.dtype`` (or ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def resolve_device(device: torch.device | str | None, model: Any = None) -> torch.device:
    """The device every ``device="auto"`` option of the library means.

    ``"auto"`` or ``None``: the device of ``model`` when it is a model object (so a model you built is
    never moved behind your back), else CUDA when available, else the CPU. Anything else is passed to
    ``torch.device`` (asking for CUDA on a machine without it raises). ``"cuda"`` without a number means
    the current GPU (:func:`torch.cuda.current_device`, which :func:`llm_env.distributed.init_distributed`
    sets to the local rank's).
    """
    if device is None or device == "auto":
        if isinstance(model, nn.Module):
            return model_device(model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        # This process's current GPU (under torchrun, the one of its local rank), by number, so that devices
        # compare equal to the device of the models placed on it.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def model_vocab_size(model: nn.Module) -> int:
    """Number of rows of the output (LM) head, i.e. the size of the logits' last dimension."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(unwrap_model(model).config.vocab_size)


def model_context_length(model: nn.Module) -> tuple[int, str] | None:
    """The longest sequence ``model`` is built for and the config field that says so, or None.

    GPT-2-style models learn one position embedding per position (``n_positions``), so a longer sequence
    indexes past the table (an IndexError on CPU, a device-side assert on CUDA). Rotary models
    (``max_position_embeddings``) compute positions instead, but were trained up to this length and a
    dynamic or long RoPE scaling switches frequencies for the whole batch beyond it, so it is a limit too.
    """
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns from 5.2x and is removed
    in 5.40), so we look at the signature of the underlying model instead of assuming a version.
    """
    params = inspect.signature(unwrap_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def accepts_kwarg(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` (under any peft wrapper) names ``name`` as a parameter."""
    return name in inspect.signature(unwrap_model(model).forward).parameters


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to pad observations and batches.

    Tokenizers without a pad token (GPT-2, Llama) get their EOS token as pad, the usual convention; the
    environment never relies on the pad id for meaning, only the attention mask does. The tokenizer object
    itself is not modified.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "the tokenizer has neither a pad token nor an EOS token; set one, e.g. "
        "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings"
    )


def load_tokenizer(
    tokenizer: PreTrainedTokenizerBase | PathLike, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Return ``tokenizer`` itself, or load it from a local path or hub name."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        _check_local_path(tokenizer, "tokenizer")
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer), trust_remote_code=trust_remote_code)
    raise TypeError(f"tokenizer must be a transformers tokenizer or a path, got {type(tokenizer).__name__}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_local_path(path: PathLike, what: str) -> None:
    """Fail early, with the path in the message, for a filesystem path that does not exist.

    Strings shaped like hub ids (``gpt2``, ``org/name``) are left to transformers, which downloads them
    when the machine has network access.
    """
    text = os.fspath(path)
    if os.path.exists(text) or _HUB_ID.match(text):
        return
    raise FileNotFoundError(f"{what} path does not exist: {text}")


def _load(
    auto_cls: Any,
    model: PreTrainedModel | PathLike,
    *,
    what: str,
    device: torch.device | str | None,
    dtype: torch.dtype | str | None,
    trust_remote_code: bool,
    **kwargs: Any,
) -> PreTrainedModel:
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{what} must be a transformers model or a path, got {type(model).__name__}")
    _check_local_path(model, what)
    dtype = resolve_dtype(dtype)
    loaded = auto_cls.from_pretrained(
        os.fspath(model),
        dtype=dtype if dtype is not None else "auto",
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if device is not None:
        loaded = loaded.to(resolve_device(device))
    return loaded.eval()


def load_causal_lm(
    model: PreTrainedModel | PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Return a causal LM object as is, or load one from a path/hub name (in eval mode)."""
    return _load(
        AutoModelForCausalLM,
        model,
        what="causal LM",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )


def load_sequence_classifier(
    model: PreTrainedModel | PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """Return a sequence-classification model as is, or load one from a path/hub name (in eval mode)."""
    return _load(
        AutoModelForSequenceClassification,
        model,
        what="reward model",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
