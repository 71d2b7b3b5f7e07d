"""Multi-turn episodes at token level: a responder answers the agent, its reply joins the context.

A tool, a simulated user or a game answers the model between its turns. Every environment library and
trainer of 2025 does this at the level of whole turns: the trainer re-tokenises the conversation's text and
guesses which tokens were the model's, and the guess is wrong whenever tokenising the text again does not
give back the tokens the model sampled (the "token-in, token-out" problem). Here the step stays one token:

* the agent's turn ends with a stop token (EOS, the chat template's end-of-turn token, or a configured one);
* the environment calls the task's **responder** with the :class:`Conversation` so far and gets a
  :class:`Reply` (a string, or ``None`` to end the episode, is short for one);
* the reply is tokenised once (through the chat template when the prompts are conversations:
  :class:`ReplyRenderer`) and its tokens are appended to the context; the reference model prefills them in
  one chunk through its slot KV cache (:meth:`llm_env.IncrementalLM.extend`, no re-encoding) and the
  agent's next observation carries them, with ``agent_mask`` marking which tokens of the context are the
  agent's own;
* only the agent's tokens are actions: the KL penalty is paid on them alone; a reply may pay a per-turn
  reward on the agent's last token of the turn; at the end the reward source scores the whole
  conversation (its ``response`` argument is a :class:`Transcript`, the text after the prompt, which also
  carries the structured conversation).

A responder that always returns ``None`` gives the single-turn environment back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from llm_env.chat import ChatPrompt, end_of_turn_ids

__all__ = ["Conversation", "Reply", "ReplyRenderer", "Responder", "Transcript", "Turn", "as_reply"]

AGENT = "assistant"


@dataclass(frozen=True)
class Reply:
    """What a responder answers to the agent's turn.

    Attributes:
        text: the reply to append to the context (a tool's output, a user's message, a game's feedback),
            or ``None`` to end the episode after this turn.
        reward: paid on the agent's last token of the turn just ended (per-turn rewards; 0 by default).
            The reward source still scores the whole conversation when the episode ends.
        role: the reply's role in the chat template (``"user"``, ``"tool"``, ...); ignored for text prompts.
    """

    text: str | None
    reward: float = 0.0
    role: str = "user"


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: the agent's (role ``"assistant"``) or a reply, its text and exact tokens."""

    role: str
    text: str
    token_ids: tuple[int, ...]


@dataclass
class Conversation:
    """An episode's conversation after its prompt, as the responder and the reward source see it.

    ``turns`` alternate between the agent's turns (role ``"assistant"``) and the replies; the last one is the
    agent's turn just ended when the responder is called. ``state`` is the responder's scratch space for this
    episode (empty at the start of every episode): a stateful game or tool keeps its per-episode objects
    there. The environment never reads it.
    """

    prompt: str
    prompt_index: int
    turns: list[Turn] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def agent_turns(self) -> list[str]:
        """The texts of the agent's turns, in order."""
        return [turn.text for turn in self.turns if turn.role == AGENT]

    @property
    def last_agent_turn(self) -> str:
        """The text of the agent's latest turn ("" before its first)."""
        turns = self.agent_turns
        return turns[-1] if turns else ""

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: the prompt's own (a conversation prompt), else the prompt as
        one user message, then every turn."""
        head = (
            list(self.prompt.messages)
            if isinstance(self.prompt, ChatPrompt)
            else [{"role": "user", "content": str(self.prompt)}]
        )
        return head + [{"role": turn.role, "content": turn.text} for turn in self.turns]


class Transcript(str):
    """Everything after the prompt as one text (the agent's turns and the replies, special tokens dropped),
    the ``response`` a reward source receives for a multi-turn episode; ``conversation`` has the structure.
    A ``str``, so every reward callable keeps working."""

    conversation: Conversation

    def __new__(cls, text: str, conversation: Conversation) -> Transcript:
        transcript = super().__new__(cls, text)
        transcript.conversation = conversation
        return transcript

    def __reduce__(self) -> tuple[Any, ...]:  # pickling (torch.distributed objects, multiprocessing)
        return (Transcript, (str(self), self.conversation))


Responder = Callable[[Conversation], Reply | str | None]
"""``(conversation so far) -> Reply``, or a string (a reply with no per-turn reward), or ``None`` (the end)."""


def as_reply(value: Any) -> Reply:
    """A responder's answer as a validated :class:`Reply` (TypeError / ValueError naming what is wrong)."""
    if value is None or isinstance(value, str):
        return Reply(value)
    if not isinstance(value, Reply):
        raise TypeError(
            f"the responder must return a Reply, a str or None, got {type(value).__name__} {value!r:.80}"
        )
    if value.text is not None and not isinstance(value.text, str):
        raise TypeError(f"Reply.text must be a str or None, got {type(value.text).__name__}")
    if (
        isinstance(value.reward, bool)
        or not isinstance(value.reward, (int, float))
        or not math.isfinite(value.reward)
    ):
        raise ValueError(f"Reply.reward must be a finite number, got {value.reward!r}")
    if not isinstance(value.role, str) or not value.role:
        raise ValueError(f"Reply.role must be a non-empty string, got {value.role!r}")
    return value


_AGENT_SENTINEL = "\u2063llm-env-agent\u2063"
_REPLY_SENTINEL = "\u2063llm-env-reply\u2063"


class ReplyRenderer:
    """Turns a reply into the tokens appended to the context after the agent's turn.

    Text prompts: the reply's text, tokenised as it is (the task writes its own separators, e.g.
    ``"\\nFeedback: higher\\nGuess:"``). Conversation prompts: what the chat template writes between the
    agent's end-of-turn token and the opening of the agent's next turn, around the reply, found once per
    role by rendering a conversation with sentinel contents (``"\\n<|im_start|>user\\n{reply}<|im_end|>\\n
    <|im_start|>assistant\\n"`` for ChatML), so that the agent sees exactly the layout it was trained on and
    the next turn opens like the first. The agent's own tokens are never re-tokenised.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self._frames: dict[str, tuple[str, str]] = {}

    def frame(self, role: str) -> tuple[str, str]:
        """(before, after): the template's text around a reply of ``role`` (empty for text prompts)."""
        if not self.chat:
            return "", ""
        if role not in self._frames:
            messages = [
                {"role": "user", "content": "hi"},
                {"role": AGENT, "content": _AGENT_SENTINEL},
                {"role": role, "content": _REPLY_SENTINEL},
            ]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:
                raise ValueError(
                    f"the chat template cannot render a {role!r} message after the assistant's turn: {exc}"
                ) from exc
            if text.count(_AGENT_SENTINEL) != 1 or text.count(_REPLY_SENTINEL) != 1:
                raise ValueError(f"the chat template does not render a {role!r} message's content verbatim")
            after_agent = text.split(_AGENT_SENTINEL, 1)[1]
            end = end_of_turn_ids(self.tokenizer)  # the agent's turn ended with this token: skip its text
            if end:
                closing = self.tokenizer.decode(end)
                start = after_agent.find(closing)
                if start >= 0:
                    after_agent = after_agent[start + len(closing) :]
            before, after = after_agent.split(_REPLY_SENTINEL, 1)
            self._frames[role] = (before, after)
        return self._frames[role]

    def __call__(self, reply: Reply) -> list[int]:
        """The token ids of ``reply`` as they join the context."""
        before, after = self.frame(reply.role)
        text = before + (reply.text or "") + after
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
