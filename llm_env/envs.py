"""``TextGenEnv`` and ``TextGenVectorEnv``: RLHF of a language model as a Gymnasium environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import Env, spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import nn

from llm_env.config import EnvConfig
from llm_env.core import EpisodeBatch, StepResult, TokenActions
from llm_env.decoding import host_to_device
from llm_env.fused import FusedDecoder
from llm_env.kl import check_kl_coef
from llm_env.prompts import PromptSampler, validate_indices

__all__ = ["TextGenEnv", "TextGenVectorEnv"]

_SHARED_DOC = """
    ## Action Space

    ``Discrete(V)``: the id of the next token, V being the size of the reference model's output
    vocabulary (the tokenizer's length without a reference, or with ``action_vocab="tokenizer"``). To
    report the acting policy's log-probability of the token, pass ``TokenActions(token, logprob)``
    instead of the bare id. Many released models pad their output layer beyond the tokenizer: with the
    default ``action_vocab="model"`` those ids are valid actions that decode to no text (observed and
    KL-penalised, never seen by the reward model); ``action_vocab="tokenizer"`` rejects them.

    ## Observation Space

    ``Dict(input_ids=Box(0, V - 1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))`` with
    ``L = max_prompt_length + max_new_tokens``: the prompt followed by the response so far, left-aligned
    and right-padded with the pad token (EOS when the tokenizer has no pad token); the mask is 1 on
    real tokens. Integer ids, never floats.

    ## Rewards

    With ``d_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)`` and the estimator ``k`` (``kl_estimator``):
    ``r_t = -kl_coef * k(d_t)`` on every token, plus the reward model's score of (prompt, response)
    on the last token of the response (minus ``missing_eos_penalty`` if it was truncated before a stop
    token). When the action carries no log-probability, ``r_t = kl_coef * log pi_ref(a_t|s_t)``: the
    same KL-regularised objective with the policy-entropy half left to the agent (an entropy bonus of
    coefficient ``kl_coef``); the completion info then has no ``kl``. Without a reference, ``r_t = 0``
    until the final score.

    ## Starting State

    A prompt drawn by the sub-environment's prompt order (a seeded permutation per epoch, or
    sequential), or forced with ``reset(options={"prompt_index": i})``.

    ## Episode End

    * Termination: the action is a stop token (``stop_token_ids``, default the tokenizer's EOS).
    * Truncation: the response reaches ``max_new_tokens`` tokens without a stop token.

    These are the only ends at which the reward model scores the response. ``gymnasium.make(...,
    max_episode_steps=k)`` wraps the environment in Gymnasium's ``TimeLimit``, which the environment
    cannot see: with ``k < max_new_tokens`` it truncates episodes that are never scored (no score, no
    completion info), so set ``max_new_tokens=k`` instead (``k >= max_new_tokens`` never cuts first).
    ``gymnasium.make_vec`` hands ``max_episode_steps`` to the environment, which rejects it with that
    advice.

    At the end, ``info["completion"]`` holds ``prompt``, ``response`` (texts), ``score`` (reward model),
    ``kl`` (summed estimator, when log-probabilities were given on every step), ``return`` (sum of the
    episode's rewards), ``length`` (response tokens), ``eos`` (ended by a stop token) and
    ``prompt_index``.

    ## Arguments

    Every field of :class:`llm_env.EnvConfig` as a keyword argument (or an ``EnvConfig`` as the first
    positional argument), plus ``render_mode`` (``"ansi"`` renders the prompt and the response).
"""


def _make_config(config: EnvConfig | None, kwargs: dict[str, Any]) -> EnvConfig:
    if "max_episode_steps" in kwargs:  # gymnasium.make_vec hands it to a native vector env
        raise ValueError(
            f"max_episode_steps={kwargs['max_episode_steps']!r}: the response budget is max_new_tokens, "
            "at which the environment truncates the episode and the reward model scores it; pass "
            "max_new_tokens instead"
        )
    if config is None:
        return EnvConfig(**kwargs)
    if not isinstance(config, EnvConfig):
        raise TypeError(f"the positional argument must be an EnvConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **kwargs) if kwargs else config


def _check_integer(value: Any, what: str) -> None:
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if isinstance(dtype, torch.dtype):
        ok = not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    else:
        ok = np.dtype(dtype).kind in "iu"
    if not ok:
        raise TypeError(f"{what} must be integer token ids, got dtype {dtype}")


def _spaces(batch: EpisodeBatch) -> tuple[spaces.Discrete, spaces.Dict]:
    length, vocab = batch.max_length, batch.vocab_size
    fields = {
        "input_ids": spaces.Box(0, vocab - 1, shape=(length,), dtype=np.int64),
        "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
    }
    if batch.multi_turn:  # which tokens of the context are the agent's own (the others: prompt and replies)
        fields["agent_mask"] = spaces.Box(0, 1, shape=(length,), dtype=np.int64)
    return spaces.Discrete(vocab), spaces.Dict(fields)


class _BatchAccessors:
    """Read-only views of the shared :class:`EpisodeBatch`, common to both environments."""

    batch: EpisodeBatch

    @property
    def kl_coef(self) -> float:
        """beta of the per-token KL penalty; settable between steps (adaptive KL control)."""
        return self.batch.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        self.batch.kl_coef = check_kl_coef(value, has_reference=self.batch.reference is not None)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of prompts and responses."""
        return self.batch.tokenizer

    @property
    def pad_token_id(self) -> int:
        """Id used to pad observations (the tokenizer's pad token, else its EOS)."""
        return self.batch.pad_id

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokens that end an episode (EOS, and with chat prompts the template's end-of-turn token)."""
        return self.batch.stop_token_ids.tolist()

    @property
    def max_length(self) -> int:
        """L: the observation length, ``max_prompt_length + max_new_tokens``."""
        return self.batch.max_length

    @property
    def num_prompts(self) -> int:
        """Number of prompts in the prompt source."""
        return len(self.batch.prompts)

    def prompt_text(self, index: int) -> str:
        """The text of prompt ``index`` of the prompt source."""
        return self.batch.prompts[int(index)]

    def prompt_token_ids(self, index: int) -> np.ndarray:
        """Token ids of prompt ``index`` exactly as the environment feeds them (after truncation)."""
        return self.batch.prompt_ids(int(index))


class TextGenEnv(_BatchAccessors, Env[dict[str, np.ndarray], int]):
    __doc__ = (
        """Generate a response to a prompt one token per step, rewarded by a reward model minus KL.

    ## Description

    One episode is one prompt and the response generated for it. The agent is the language model
    being fine-tuned: at each step it chooses the next token (the vocabulary is the action space) and
    observes the prompt plus the text so far. The reward is the standard RLHF reward (InstructGPT,
    Ouyang et al. 2022): a per-token penalty for drifting from the frozen SFT reference model, and the
    reward model's score of the whole response on its last token. The reference model advances with a
    KV cache, one token per step. This is the single-episode environment with numpy observations, for
    Gymnasium and Stable-Baselines3; :class:`TextGenVectorEnv` steps B episodes on the GPU.
"""
        + _SHARED_DOC
        + """
    Example::

        >>> import llm_env
        >>> env = llm_env.TextGenEnv(prompts=["The film was"], tokenizer=tok, reward=my_scorer,
        ...                          reference="path/to/sft", max_new_tokens=32)      # doctest: +SKIP
        >>> obs, info = env.reset(seed=0)                                             # doctest: +SKIP
        >>> obs, reward, terminated, truncated, info = env.step(42)                   # doctest: +SKIP

    ## Vectorized environment

    ``gymnasium.make_vec("llm_env/TextGen-v0", num_envs=B, ...)`` builds :class:`TextGenVectorEnv`,
    whose sub-environment ``i`` reset with ``seed=s`` behaves exactly like this environment reset
    with ``seed=s + i``.

    ## Version History

    * v0: initial version.
    """
    )

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, config: EnvConfig | None = None, /, *, render_mode: str | None = None, **kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        self.config = _make_config(config, kwargs)
        self.batch = EpisodeBatch(self.config, 1)
        self.action_space, self.observation_space = _spaces(self.batch)
        self.render_mode = render_mode
        self._sampler = PromptSampler(len(self.batch.prompts), self.config.prompt_order)
        self._done = True
        self._seeded = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode with the next prompt of the prompt order.

        Args:
            seed: Seeds ``np_random`` and restarts the prompt order from it (the first reset restarts it
                in any case), so the same seed gives the same sequence of prompts.
            options: ``{"prompt_index": i}`` forces the prompt; no other option is accepted.

        Returns:
            The observation (``input_ids`` and ``attention_mask`` of the padded prompt as numpy arrays,
            plus ``agent_mask`` in a multi-turn episode) and
            the info ``{"prompt_index": i}``. Every argument is validated before anything changes, so a
            reset that raises leaves the environment as it was.
        """
        # Everything is validated before anything changes, so a reset that raises leaves the env as it was.
        self.batch.check_open()
        options = dict(options or {})
        forced = options.pop("prompt_index", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; the only option is 'prompt_index'")
        if forced is not None:
            forced = int(validate_indices([forced], len(self.batch.prompts), "options['prompt_index']")[0])
        super().reset(seed=seed)
        if seed is not None or not self._seeded:
            self._sampler.restart()
            self._seeded = True
        index = forced if forced is not None else self._sampler.next(self.np_random)
        self.batch.reset_rows(np.array([0]), np.array([index]))
        self._done = False
        return self.batch.host_observation(0), {"prompt_index": index}

    def step(
        self, action: int | TokenActions
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Append one token to the response and return ``(observation, reward, terminated, truncated, info)``.

        Args:
            action: A token id, or :class:`~llm_env.TokenActions` with the policy's log-probability of it
                (a float), which makes the KL penalty exact; without it the reward carries
                ``beta * log pi_ref(a|s)`` instead (see :mod:`llm_env.core`).

        Returns:
            The reward is the per-token KL penalty, plus the reward model's score on the last token of the
            response. At the end of the episode ``info["completion"]`` describes it (see the class
            description); in a multi-turn episode ``info["reply"]`` and ``info["injected_ids"]`` hold the
            reply that joined the context at this step. Stepping before :meth:`reset` or after the end of
            an episode raises.
        """
        if not self.batch.ready[0]:
            raise RuntimeError("step() called before reset(): call env.reset() first")
        if self._done:
            raise RuntimeError(
                "the episode has ended (terminated or truncated): call env.reset() to start a new one"
            )
        token, logprob = (
            (action.tokens, action.logprobs) if isinstance(action, TokenActions) else (action, None)
        )
        if isinstance(token, (bool, np.bool_)) or (
            not isinstance(token, (int, np.integer)) and not (hasattr(token, "dtype") and np.ndim(token) == 0)
        ):
            if np.ndim(token) > 0:
                raise ValueError(f"the action must be a single token id, got shape {np.shape(token)}")
            raise TypeError(f"the action must be an integer token id, got {type(token).__name__} {token!r}")
        _check_integer(token, "the action")
        tokens = torch.tensor([int(token)], dtype=torch.long, device=self.batch.device)
        logprobs = None
        if logprob is not None:
            if np.ndim(logprob) != 0:
                raise ValueError(f"the log-probability must be a scalar, got shape {np.shape(logprob)}")
            logprobs = torch.tensor([float(logprob)], dtype=torch.float32, device=self.batch.device)
        result = self.batch.step(tokens, logprobs, np.ones(1, dtype=bool))
        terminated, truncated = bool(result.terminated[0]), bool(result.truncated[0])
        self._done = terminated or truncated
        info: dict[str, Any] = {}
        if result.finished.size:
            info["completion"] = _single_completion(result)
        if 0 in result.replies:  # a tuple, so that SyncVectorEnv gathers replies of any length
            text, ids = result.replies[0]
            info["reply"], info["injected_ids"] = text, tuple(int(t) for t in ids)
        return self.batch.host_observation(0), float(result.reward[0]), terminated, truncated, info

    def close(self) -> None:
        """Release the reference model's decoder; stepping or resetting afterwards raises."""
        self.batch.close()

    def render(self) -> str | None:
        """With ``render_mode="ansi"``: the prompt and the response so far, separated by ``│``; else None."""
        if self.render_mode != "ansi" or not self.batch.ready[0]:
            return None
        prompt, response = self.batch.text(0)
        return f"{prompt}\u2502{response}"


def _single_completion(result: StepResult) -> dict[str, Any]:
    c = result.completions
    out: dict[str, Any] = {
        "prompt": str(c["prompt"][0]),
        "response": str(c["response"][0]),
        "score": float(c["score"][0]),
        "return": float(c["return"][0]),
        "length": int(c["length"][0]),
        "eos": bool(c["eos"][0]),
        "prompt_index": int(c["prompt_index"][0]),
    }
    if c["has_kl"][0]:
        out["kl"] = float(c["kl"][0])
    if "turns" in c:
        out["turns"] = int(c["turns"][0])
        out["conversation"] = c["conversation"][0]
    return out


_COMPLETION_DTYPES = {
    "prompt": object,
    "response": object,
    "score": np.float64,
    "kl": np.float64,
    "return": np.float64,
    "length": np.int64,
    "eos": np.bool_,
    "prompt_index": np.int64,
    "turns": np.int64,  # multi-turn only
    "conversation": object,  # multi-turn only
}


def _vector_completion(result: StepResult, num_envs: int) -> dict[str, Any]:
    """Completion info in Gymnasium's vector layout: arrays over all sub-envs plus ``_key`` masks."""
    rows = result.finished
    info: dict[str, Any] = {}
    for key, dtype in _COMPLETION_DTYPES.items():
        if key not in result.completions:
            continue
        array = np.full(num_envs, None, dtype=object) if dtype is object else np.zeros(num_envs, dtype=dtype)
        mask = np.zeros(num_envs, dtype=bool)
        present = rows[result.completions["has_kl"]] if key == "kl" else rows
        if present.size == 0:  # like Gymnasium's _add_info: a key no sub-env reported is absent
            continue
        keep = np.isin(rows, present)
        array[present] = result.completions[key][keep]
        mask[present] = True
        info[key], info[f"_{key}"] = array, mask
    return info


def _vector_replies(result: StepResult, num_envs: int) -> dict[str, np.ndarray]:
    """``reply`` (texts) and ``injected_ids`` (tuples of token ids) of the sub-envs a reply joined, with
    masks: the layout SyncVectorEnv gives the single environment's infos."""
    texts, ids = np.full(num_envs, None, dtype=object), np.full(num_envs, None, dtype=object)
    mask = np.zeros(num_envs, dtype=bool)
    for row, (text, tokens) in result.replies.items():
        texts[row], ids[row], mask[row] = text, tuple(int(t) for t in tokens), True
    return {"reply": texts, "_reply": mask, "injected_ids": ids, "_injected_ids": mask.copy()}


class TextGenVectorEnv(_BatchAccessors, VectorEnv):
    __doc__ = (
        """B RLHF episodes stepped in lockstep on a device, with Gymnasium's next-step autoreset.

    ## Description

    The batched form of :class:`TextGenEnv`, for agents that generate on a GPU: the token state, the
    reference model and its KV cache live on ``device``; observations, rewards, terminations and
    truncations are returned as torch tensors there, and a step reads back only B token ids and flags.
    The reference advances one token per step through a per-row slot KV cache, so a sub-environment that
    restarts with a new prompt is prefilled alone while the others continue. Reward-model scoring is one
    batched call over the episodes that finished at that step.
"""
        + _SHARED_DOC.replace("``Discrete(V)``", "``MultiDiscrete([V] * B)``")
        + """
    ## Vectorized environment

    ``metadata["autoreset_mode"]`` is ``AutoresetMode.NEXT_STEP`` by default: the step after a
    sub-environment ends resets it (its action is ignored, its reward is 0, ``info["prompt_index"]``
    names the new prompt). With ``autoreset_mode=AutoresetMode.DISABLED`` finished sub-environments
    stay finished (actions ignored, reward 0, flags kept) until ``reset(options={"reset_mask": m})``.
    ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i``, like ``SyncVectorEnv`` over
    :class:`TextGenEnv`. ``reset(options={"prompt_indices": idx})`` forces the prompts (e.g. the same
    prompt in k sub-environments for best-of-k). Info follows Gymnasium 1.x: ``info["completion"]`` is a
    dict of arrays over sub-environments with ``_key`` masks, and ``info["_completion"]`` marks the
    sub-environments whose episode ended. A sub-environment that does not step (being reset, frozen,
    waiting) leaves the reference's cache as it is, however long it waits. Gymnasium's numpy vector
    wrappers (``RecordEpisodeStatistics``, ``NormalizeReward``, ...) go on top of
    :class:`llm_env.TorchToNumpy`, which returns numpy arrays on the host.

    Example::

        >>> envs = gymnasium.make_vec("llm_env/TextGen-v0", num_envs=16, prompts="prompts.jsonl",
        ...                           reference="path/to/sft", reward="path/to/rm", device="cuda")  # doctest: +SKIP
        >>> obs, info = envs.reset(seed=0)                                                         # doctest: +SKIP
        >>> obs, rewards, terminations, truncations, infos = envs.step(TokenActions(tokens, logprobs))  # doctest: +SKIP

    ## Version History

    * v0: initial version.
    """
    )

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi"]}

    def __init__(
        self,
        config: EnvConfig | None = None,
        /,
        *,
        num_envs: int = 1,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
        **kwargs: Any,
    ):
        mode = AutoresetMode(autoreset_mode) if isinstance(autoreset_mode, str) else autoreset_mode
        if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or DISABLED, got {autoreset_mode!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.config = _make_config(config, kwargs)
        self.batch = EpisodeBatch(self.config, num_envs)
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.single_action_space, self.single_observation_space = _spaces(self.batch)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.device = self.batch.device
        num_prompts = len(self.batch.prompts)
        self._samplers = [
            PromptSampler(num_prompts, self.config.prompt_order, start=i, stride=num_envs)
            for i in range(num_envs)
        ]
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        # Rows not running: ended at the last step (or earlier when autoreset is DISABLED), or never reset.
        self._ended = np.ones(num_envs, dtype=bool)
        self._started = False
        self._terminated = np.zeros(num_envs, dtype=bool)
        self._truncated = np.zeros(num_envs, dtype=bool)

    def _generators(
        self, rows: np.ndarray, seed: int | Sequence[int | None] | None
    ) -> tuple[dict[int, np.random.Generator], tuple[np.random.Generator, int] | None]:
        """The new prompt-order generators of ``reset(seed=...)``, by row, and the env's own
        ``(np_random, np_random_seed)`` (None when ``seed`` is None).

        Reset rows take their seed; a row that has never had a generator gets its own seed too (it starts
        later, by autoreset or a partial reset, and must still be reproducible). Nothing is changed here,
        so that a reset can validate everything before it changes anything.
        """
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(
                    f"a list of seeds must have num_envs={self.num_envs} entries, got {len(seeds)}"
                )
        selected = set(int(r) for r in rows)
        generators = {
            row: seeding.np_random(seeds[row])[0]
            for row in range(self.num_envs)
            if (row in selected and seeds[row] is not None) or self._rngs[row] is None
        }
        return generators, seeding.np_random(seeds[0]) if seed is not None else None

    def _draw(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self._samplers[r].next(self._rngs[r]) for r in rows], dtype=np.int64)

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Start new episodes in all sub-environments, or in those of ``options["reset_mask"]``.

        Args:
            seed: An int seeds sub-environment ``i``'s prompt order with ``seed + i``; a list gives one seed
                (or None) per sub-environment.
            options: ``"reset_mask"``, a bool array of shape ``(num_envs,)`` selecting the sub-environments
                to reset (the others keep their episodes); ``"prompt_indices"``, the prompts to use, one
                per sub-environment or one per reset sub-environment.

        Returns:
            The observation (tensors on the device) and the info ``{"prompt_index": ..., "_prompt_index":
            mask}``. Every argument is validated before anything changes.
        """
        self.batch.check_open()
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        forced = options.pop("prompt_indices", None)
        if options:
            raise ValueError(
                f"unknown reset options {sorted(options)}; use 'reset_mask' and/or 'prompt_indices'"
            )
        if mask is None:
            mask = np.ones(self.num_envs, dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},)")
            if not mask.any():
                raise ValueError("options['reset_mask'] must select at least one sub-environment")
        rows = np.flatnonzero(mask)
        if forced is not None:
            forced = validate_indices(forced, len(self.batch.prompts), "options['prompt_indices']")
            if forced.shape == (self.num_envs,):
                forced = forced[rows]
            elif forced.shape != (len(rows),):
                raise ValueError(
                    f"options['prompt_indices'] must have shape ({self.num_envs},) or one entry per reset "
                    f"sub-environment ({len(rows)}), got {forced.shape}"
                )
        generators, env_rng = self._generators(rows, seed)
        # Validated: from here on the reset cannot fail on its arguments.
        for row, generator in generators.items():
            self._rngs[row] = generator
            self._samplers[row].restart()
        if env_rng is not None:
            self._np_random, self._np_random_seed = env_rng
        indices = forced if forced is not None else self._draw(rows)
        self.batch.reset_rows(rows, indices)
        self._started = True
        self._ended[rows] = False
        self._terminated[rows] = False
        self._truncated[rows] = False
        prompt_index = np.zeros(self.num_envs, dtype=np.int64)
        prompt_index[rows] = indices
        return self.batch.observation(), {"prompt_index": prompt_index, "_prompt_index": mask.copy()}

    def _parse_actions(self, actions: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, logprobs = (
            (actions.tokens, actions.logprobs) if isinstance(actions, TokenActions) else (actions, None)
        )
        if not isinstance(tokens, torch.Tensor):
            tokens = np.asarray(tokens)
        _check_integer(tokens, "actions")
        if tuple(tokens.shape) != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {tuple(tokens.shape)}")
        tokens = torch.as_tensor(tokens).to(self.device, torch.long)
        if logprobs is not None:
            logprobs = torch.as_tensor(logprobs)
            if tuple(logprobs.shape) != (self.num_envs,):
                raise ValueError(f"logprobs must have shape ({self.num_envs},), got {tuple(logprobs.shape)}")
            if not logprobs.dtype.is_floating_point:
                raise TypeError(f"logprobs must be floating point, got dtype {logprobs.dtype}")
            logprobs = logprobs.to(self.device, torch.float32)
        return tokens, logprobs

    def step(
        self, actions: Any
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Append one token to every running episode; return observations, rewards, terminations,
        truncations (tensors on the device) and the info.

        Args:
            actions: Token ids of shape ``(num_envs,)`` (a tensor or an array), or
                :class:`~llm_env.TokenActions` with the policy's log-probabilities of them, which make the
                KL penalty exact.

        Returns:
            The rewards are the per-token KL penalties, plus the reward model's scores on the last token
            of the episodes that ended. ``info["completion"]`` and ``info["_completion"]`` describe the
            ended episodes; with next-step autoreset the sub-environments that ended at the previous step
            are reset instead of stepped (``info["prompt_index"]``). See the class description.
        """
        if not self._started:
            raise RuntimeError("step() called before reset(): call envs.reset() first")
        tokens, logprobs = self._parse_actions(actions)
        next_step = self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        resetting = self._ended.copy() if next_step else np.zeros(self.num_envs, dtype=bool)
        stepping = ~self._ended
        result = self.batch.step(tokens, logprobs, stepping)
        info: dict[str, Any] = {}
        if result.finished.size:
            mask = np.zeros(self.num_envs, dtype=bool)
            mask[result.finished] = True
            info["completion"], info["_completion"] = _vector_completion(result, self.num_envs), mask
        if result.replies:
            info.update(_vector_replies(result, self.num_envs))
        if resetting.any():
            rows = np.flatnonzero(resetting)
            indices = self._draw(rows)
            self.batch.reset_rows(rows, indices)
            prompt_index = np.zeros(self.num_envs, dtype=np.int64)
            prompt_index[rows] = indices
            info["prompt_index"], info["_prompt_index"] = prompt_index, resetting
        done = result.terminated | result.truncated
        self._terminated = np.where(stepping, result.terminated, self._terminated & ~resetting)
        self._truncated = np.where(stepping, result.truncated, self._truncated & ~resetting)
        self._ended = np.where(stepping, done, self._ended & ~resetting)
        return (
            self.batch.observation(),
            result.reward,
            host_to_device(self._terminated.copy(), self.device),
            host_to_device(self._truncated.copy(), self.device),
            info,
        )

    def render(self) -> tuple[str, ...] | None:
        """With ``render_mode="ansi"``: each sub-environment's prompt and response so far, else None."""
        if self.render_mode != "ansi" or not self._started:
            return None
        return tuple(
            "\u2502".join(self.batch.text(row)) if self.batch.ready[row] else ""
            for row in range(self.num_envs)
        )

    @property
    def fused_policy(self) -> nn.Module | None:
        """The peft policy decoded in the same forward pass as the reference
        (``reference=AdapterDisabled(policy, fuse=True)``), or None."""
        lm = self.batch.lm
        return lm.model if isinstance(lm, FusedDecoder) else None

    def policy_logits(
        self, observation: dict[str, torch.Tensor], model: nn.Module | None = None
    ) -> torch.Tensor | None:
        """Next-token logits ``(B, V)`` of the fused policy for ``observation``, or None.

        With ``reference=AdapterDisabled(policy, fuse=True)`` each step decodes the policy and its
        reference in one forward pass (:class:`llm_env.fused.FusedDecoder`); an agent acting with that
        policy reads the policy half here instead of decoding again. The logits are returned only for
        the very observation this environment returned last (not a copy, not an earlier one) and, when
        ``model`` is given, only if it is the fused policy; otherwise the agent must decode itself. The
        tensor belongs to the environment: read it, do not write into it.
        """
        lm = self.batch.lm
        if not isinstance(lm, FusedDecoder) or (model is not None and model is not lm.model):
            return None
        return lm.logits_for(observation["input_ids"])

    def close_extras(self, **kwargs: Any) -> None:
        """Release the reference model's decoder (``close()`` calls this); stepping afterwards raises."""
        self.batch.close()
