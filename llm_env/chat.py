"""Chat and instruct models: prompts given as conversations, rendered with the tokenizer's chat template.

An instruct checkpoint (Qwen2.5-Instruct, Llama-3-Instruct, Gemma-it, ...) was fine-tuned on conversations
laid out by its chat template; a raw string prompt is far from anything it saw. A prompt may therefore be
a conversation, ``[{"role": "user", "content": ...}, ...]`` (TRL's conversational format), from a list, a
JSONL field or a ``datasets.Dataset`` column, or a plain string that ``EnvConfig(chat_template=True)``
wraps as one user message. The environment then

* feeds the policy ``apply_chat_template(messages, add_generation_prompt=True)``: the conversation up to
  the opening of the assistant's turn;
* stops an episode at the template's end-of-turn token as well as at EOS (:func:`end_of_turn_ids`), since
  instruct models close their turn with ``<|im_end|>``, ``<|eot_id|>`` or ``<end_of_turn>`` and only
  then, if ever, emit EOS;
* hands the reward source the prompt as a :class:`ChatPrompt`: a string (the rendered prompt, so every
  reward callable keeps working) that also carries the ``messages``, so that a reward model re-renders
  the whole conversation with its own chat template, the way it was trained
  (:meth:`llm_env.SequenceClassifierReward.encode`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = ["ChatPrompt", "Conversation", "as_conversation", "conversation_text", "end_of_turn_ids", "render"]

Conversation = list[dict[str, str]]
"""A conversation: ``[{"role": "user", "content": ...}, ...]``, the messages a chat template renders."""


class ChatPrompt(str):
    """A prompt rendered by a chat template (the string), with the conversation it came from.

    It is a ``str`` so that reward callables, completion infos and reports see the text the policy
    answered; ``messages`` lets a reward model render the conversation its own way.
    """

    messages: Conversation

    def __new__(cls, text: str, messages: Conversation) -> ChatPrompt:
        prompt = super().__new__(cls, text)
        prompt.messages = messages
        return prompt

    def __reduce__(self) -> tuple[Any, ...]:  # pickling (torch.distributed objects, multiprocessing)
        return (ChatPrompt, (str(self), self.messages))


def as_conversation(value: Any, where: str) -> Conversation | None:
    """``value`` as a validated conversation, or None when it is not a list (a plain text prompt).

    Raises ValueError naming ``where`` and the message at fault for a malformed conversation, and for one
    that ends with the assistant's turn (a prompt ends where the policy starts to answer; drop the answer,
    e.g. ``messages[:-1]`` of a supervised fine-tuning row).
    """
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        return None
    if not value:
        raise ValueError(f"{where}: the conversation has no messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            fields = sorted(message) if isinstance(message, Mapping) else type(message).__name__
            raise ValueError(f"{where}: message {i} needs 'role' and 'content' fields, got {fields}")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} must have string 'role' and 'content'")
        messages.append(dict(message))
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            f"{where}: the conversation ends with an assistant message; a prompt ends where the policy answers "
            "(drop the answer, e.g. messages[:-1])"
        )
    return messages


def _check_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so conversation prompts cannot be rendered: "
            "use the instruct model's tokenizer (it carries the template), set tokenizer.chat_template, or give "
            "plain text prompts"
        )


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> tuple[ChatPrompt, list[int]]:
    """The prompt text and token ids of ``messages`` up to the opening of the assistant's turn."""
    _check_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes the special tokens (BOS included) itself: the tokenizer must not add them again.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatPrompt(text, messages), list(ids)


def conversation_text(tokenizer: PreTrainedTokenizerBase, messages: Conversation, response: str) -> str:
    """The whole conversation, the response as the assistant's closing turn, in ``tokenizer``'s template."""
    _check_template(tokenizer)
    return tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )


_SENTINEL = "\u2063llm-env-sentinel\u2063"


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token(s) with which the chat template closes the assistant's turn (empty if none).

    Found by rendering an assistant message whose content is a sentinel and reading the special tokens
    that directly follow it (``<|im_end|>`` for ChatML/Qwen, ``<|eot_id|>`` for Llama 3,
    ``<end_of_turn>`` for Gemma, ``<|end|>`` for Phi-3), so no list of model families is needed.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation shape: no end-of-turn token learnt
        return []
    cut = text.rfind(_SENTINEL)
    if cut < 0:
        return []
    ids = tokenizer(text[cut + len(_SENTINEL) :].lstrip(" "), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return [int(ids[0])] if ids and ids[0] in special else []
