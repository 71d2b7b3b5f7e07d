"""What every leaderboard entry shares: the context it trains in, the registry, and the evaluation.

Adding an agent to the leaderboard takes one registered function::

    from rlhf_bench.leaderboard import BenchmarkContext, register_agent

    @register_agent("my-agent", description="what it does")
    def my_agent(ctx: BenchmarkContext):
        policy = ctx.load_policy()                        # a fresh copy of the SFT model
        env = ctx.make_env(kl_coef=0.05)                  # the benchmark's environment, training prompts
        ...                                               # train through env
        return agent                                      # anything with act(obs, restarted)

The runner times the function (wall time), then evaluates the returned agent on the held-out prompts,
through the same environment with the SFT model as KL reference: gold score, proxy score, KL to the SFT
policy, gold win-rate against the SFT policy and generation throughput. It also states what the entry
consumed: the responses the proxy reward scored during training (every environment of :meth:`make_env`
and :attr:`BenchmarkContext.reward` counts them), and the sampled response tokens and gradient steps the
factory records (``ctx.record(name, sampled_tokens=..., gradient_steps=...)``). ``register_agent(...,
default=False)`` keeps an entry out of the default run; ``--agents all`` (or naming it) runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn

from agents.rollout import collect_episodes
from llm_env import TextGenVectorEnv
from llm_env.distributed import is_main_process
from llm_env.models import load_causal_lm
from llm_env.reward import check_scores
from rlhf_bench.leaderboard.artifacts import Artifacts
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.stats import per_prompt_means

__all__ = [
    "AgentEntry",
    "BenchmarkContext",
    "CountingReward",
    "EvalResult",
    "TrainingCurve",
    "paired_wins",
    "register_agent",
    "registered_agents",
    "select_agents",
    "win_rate",
]

AgentFactory = Callable[["BenchmarkContext"], Any]

CURVE_METRICS = ("gold", "proxy", "kl", "response_length")
"""What every point of a :class:`TrainingCurve` measures, each with per-prompt values for its interval."""


@dataclass(frozen=True)
class AgentEntry:
    """A leaderboard entry: a name, a factory that trains and returns an agent, a description, and whether
    the default run (no ``--agents``) includes it."""

    name: str
    factory: AgentFactory
    description: str = ""
    default: bool = True


_REGISTRY: dict[str, AgentEntry] = {}

SELECTORS = ("all", "default")
"""Names that stand for several entries in ``--agents``: every entry, or the default ones."""


def register_agent(
    name: str, *, description: str = "", default: bool = True
) -> Callable[[AgentFactory], AgentFactory]:
    """Decorator adding ``factory(ctx) -> agent`` to the leaderboard under ``name``; ``default=False`` runs it
    only with ``--agents all`` or when named."""
    if not name or any(c.isspace() for c in name) or name in SELECTORS or "," in name:
        raise ValueError(
            f"agent names must be non-empty, without spaces or commas, and not one of {SELECTORS}, got {name!r}"
        )

    def decorate(factory: AgentFactory) -> AgentFactory:
        _REGISTRY[name] = AgentEntry(
            name, factory, description or (factory.__doc__ or "").strip().split("\n")[0], default
        )
        return factory

    return decorate


def select_agents(names: Sequence[str] | None) -> list[str]:
    """The entries (and ``"best-of-k"``) a run with ``--agents names`` trains, in registration order.

    None: the default entries and best-of-k; ``"all"``: every entry and best-of-k; ``"default"``: the
    default ones; other names are taken as they are (unknown names raise). Duplicates are dropped.
    """
    registry = registered_agents()
    defaults = [name for name, entry in registry.items() if entry.default] + ["best-of-k"]
    expanded: list[str] = []
    for name in defaults if names is None else names:
        if name == "all":
            expanded += [*registry, "best-of-k"]
        elif name == "default":
            expanded += defaults
        else:
            expanded.append(name)
    unknown = [name for name in expanded if name not in registry and name != "best-of-k"]
    if unknown:
        raise ValueError(
            f"unknown agents {unknown}; registered: {[*registry, 'best-of-k']} (or 'all', 'default')"
        )
    return list(dict.fromkeys(expanded))


def registered_agents() -> dict[str, AgentEntry]:
    """All registered entries, in registration order (the built-ins, registered when
    :mod:`rlhf_bench.leaderboard` is imported, come first)."""
    return dict(_REGISTRY)


@dataclass
class EvalResult:
    """One agent's responses on the held-out prompts and their measurements (one row per episode)."""

    name: str
    prompts: list[str]
    responses: list[str]
    prompt_index: np.ndarray
    sample: np.ndarray  # which of the eval_samples draws of its prompt this episode is
    proxy: np.ndarray
    gold: np.ndarray | None
    kl: np.ndarray  # summed per-token KL to the SFT reference (NaN when the agent gave no log-probs)
    lengths: np.ndarray
    tokens_per_s: float
    seconds: float
    turns: np.ndarray | None = None  # the agent's turns per episode on a multi-turn task, else None

    def order(self) -> np.ndarray:
        """Episode order sorted by (prompt, sample), to pair two agents' answers to the same prompt."""
        return np.lexsort((self.sample, self.prompt_index))

    @property
    def num_prompts(self) -> int:
        """Held-out prompts evaluated (the first ``num_prompts`` of them)."""
        return int(self.prompt_index.max()) + 1 if len(self.prompt_index) else 0

    def per_prompt(self, metric: str) -> np.ndarray:
        """``"gold"``, ``"proxy"``, ``"kl"`` or ``"response_length"`` (tokens) averaged over each prompt's
        draws, shape ``(num_prompts,)`` (NaN for gold without a gold rater, and for KL when the agent reported
        no log-probabilities)."""
        values = {
            "gold": self.gold,
            "proxy": self.proxy,
            "kl": self.kl,
            "response_length": self.lengths,
            "turns": self.turns,
        }[metric]
        if values is None:
            return np.full(self.num_prompts, np.nan)
        return per_prompt_means(values, self.prompt_index, self.num_prompts)


def paired_wins(
    result: EvalResult, baseline: EvalResult, *, use_gold: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_index, wins)`` over ``result``'s episodes in (prompt, draw) order: 1 where it scores above
    the ``baseline``'s answer to the same prompt and draw, 1/2 on a tie, 0 below (NaN without scores)."""
    a, b = (result.gold, baseline.gold) if use_gold else (result.proxy, baseline.proxy)
    ia, ib = result.order(), baseline.order()
    keys_a = list(zip(result.prompt_index[ia], result.sample[ia]))
    keys_b = list(zip(baseline.prompt_index[ib], baseline.sample[ib]))
    if keys_a != keys_b:
        raise ValueError("win_rate needs both results on the same prompts and draws")
    if a is None or b is None:
        return result.prompt_index[ia], np.full(len(ia), np.nan)
    diff = a[ia] - b[ib]
    return result.prompt_index[ia], (diff > 0) + 0.5 * (diff == 0)


def win_rate(result: EvalResult, baseline: EvalResult, *, use_gold: bool = True) -> float:
    """Share of prompts (and draws) where ``result`` scores above ``baseline`` (a tie counts one half)."""
    return float(np.mean(paired_wins(result, baseline, use_gold=use_gold)[1]))


class CountingReward:
    """The proxy reward with a count of the responses it scored: the reward-model calls of a row.

    A call scores one response (the Llama 2 combination reads one of its two models per response, chosen
    by the prompt's safety tag and the safety score); evaluation scores are not counted (the runner scores
    the held-out responses with the wrapped reward directly)."""

    def __init__(self, reward: Callable[[Sequence[str], Sequence[str]], Any]) -> None:
        self.reward = reward
        self.calls = 0
        """Responses scored so far."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Any:
        self.calls += len(responses)
        return self.reward(prompts, responses)


@dataclass
class BenchmarkContext:
    """Everything an agent factory needs: shared artifacts, budgets, device, output directory, logging."""

    artifacts: Artifacts
    settings: BenchmarkSettings
    device: torch.device
    out_dir: Path
    log: Callable[[str], None] = print
    progress: bool = True
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra results factories leave for the report (training curves, histories), by agent name."""
    _reference: nn.Module | None = None
    reward: CountingReward = field(init=False)
    """The proxy reward the agents train against, counting the responses it scores. Environments of
    :meth:`make_env` use it; a factory that builds its own environments passes ``reward=ctx.reward``."""

    def __post_init__(self) -> None:
        self.reward = CountingReward(self.artifacts.reward)

    # ---------------------------------------------------------------------------------- models
    def load_policy(self) -> nn.Module:
        """A fresh, trainable copy of the SFT policy on the benchmark's device."""
        model = load_causal_lm(self.artifacts.policy_path, device=self.device, dtype=torch.float32)
        return model.train()

    @property
    def reference(self) -> nn.Module:
        """The frozen KL reference (loaded once and shared by every environment)."""
        if self._reference is None:
            model = load_causal_lm(self.artifacts.reference_path, device=self.device, dtype=torch.float32)
            self._reference = model.eval().requires_grad_(False)
        return self._reference

    @property
    def tokenizer(self) -> Any:
        """The task's tokenizer, shared by the policy, the reference and the environment."""
        return self.artifacts.tokenizer

    def record(self, name: str, **values: Any) -> None:
        """Attach results (curves, histories) to an agent's entry in the report."""
        self.records.setdefault(name, {}).update(values)

    # ---------------------------------------------------------------------------- environments
    def make_env(
        self,
        *,
        reference: Any = "sft",
        kl_coef: float = 0.0,
        prompts: str | list[str] = "train",
        num_envs: int | None = None,
        autoreset_mode: AutoresetMode = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> TextGenVectorEnv:
        """The benchmark's environment: proxy reward, response budget, device and tokenizer fixed.

        ``reference="sft"`` uses the shared frozen SFT model; pass another model, an ``AdapterDisabled``,
        or None. ``prompts`` is ``"train"``, ``"eval"`` or a list.
        """
        if isinstance(reference, str) and reference == "sft":
            reference = self.reference
        texts = (
            {"train": self.artifacts.train_prompts, "eval": self.artifacts.eval_prompts}[prompts]
            if isinstance(prompts, str)
            else prompts
        )
        options = dict(
            prompts=texts,
            tokenizer=self.tokenizer,
            reward=self.reward,
            reference=reference,
            kl_coef=kl_coef,
            max_new_tokens=self.settings.max_new_tokens,
            device=self.device,
        )
        options.update(self.artifacts.env_options)  # a multi-turn task's responder
        options.update(kwargs)
        return TextGenVectorEnv(
            num_envs=num_envs or self.settings.num_envs, autoreset_mode=autoreset_mode, **options
        )

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        agent: Any,
        name: str,
        *,
        prompts: int | None = None,
        samples: int | None = None,
        with_kl: bool = True,
    ) -> EvalResult:
        """Run ``agent`` on the held-out prompts (the first ``prompts`` of them, ``samples`` draws each).

        The environment measures the KL to the SFT reference from the agent's log-probabilities; the proxy
        and gold scores are computed afterwards in single batched calls over all responses (the episodes
        finish a few per step, and scoring them one step at a time would cost many small forward passes).
        """
        n_eval = len(self.artifacts.eval_prompts)
        n_prompts = n_eval if prompts is None else min(prompts, n_eval)
        samples = samples or self.settings.eval_samples
        env = self.make_env(
            prompts="eval",
            autoreset_mode=AutoresetMode.DISABLED,
            reward=_no_reward,
            reference="sft" if with_kl else None,
        )
        queue = np.repeat(np.arange(n_prompts), samples)
        seed = self.settings.seed + 4242
        _seed_agent(agent, seed)
        start = time.perf_counter()
        draws = collect_episodes(env, agent, len(queue), seed=seed, prompt_indices=queue)
        seconds = time.perf_counter() - start
        sample = np.zeros(len(draws), dtype=np.int64)
        seen: dict[int, int] = {}
        for i, index in enumerate(draws.prompt_index):
            sample[i] = seen.get(int(index), 0)
            seen[int(index)] = sample[i] + 1
        proxy = check_scores(
            self.artifacts.reward(draws.prompts, draws.responses), len(draws), "the proxy reward"
        )
        gold = self.artifacts.gold
        return EvalResult(
            name=name,
            prompts=draws.prompts,
            responses=draws.responses,
            prompt_index=draws.prompt_index,
            sample=sample,
            proxy=proxy.double().cpu().numpy(),
            gold=np.asarray(gold(draws.prompts, draws.responses), dtype=np.float64)
            if gold is not None
            else None,
            kl=draws.kl,
            lengths=draws.lengths,
            tokens_per_s=float(draws.lengths.sum()) / max(seconds, 1e-9),
            seconds=seconds,
            turns=draws.turns,
        )


class TrainingCurve:
    """Held-out evaluations of an agent along its training, at fractions of its sampled-token budget.

    Call :meth:`start` before training (the SFT policy, 0 tokens), pass the object as the agent's
    ``train(..., callback=...)``, and call :meth:`finish` after. After the update whose rollouts cross
    ``k / curve_points`` of ``budget`` (k = 1 .. ``curve_points``) it evaluates the agent on the first
    ``curve_prompts`` held-out prompts, one draw each, and adds a point for every fraction crossed (an
    update crossing two gets one evaluation, recorded for both); every seed of a run therefore has the same
    points, which the runner averages with their intervals. Each point holds the mean gold, proxy, KL and
    response length (tokens) of its evaluation responses: the length shows the length bias of a loss that
    normalises by each response's own length, which Dr. GRPO removes (Liu et al. 2025, "Understanding
    R1-Zero-Like Training: A Critical Perspective": GRPO's responses that are wrong keep growing longer).
    :meth:`finish` records them (``curve``, with per-prompt values for the intervals) and the seconds they
    took (``curve_seconds``: the runner takes them out of the row's wall time). On N processes only rank 0
    evaluates (its replica acts alone).
    """

    def __init__(self, ctx: BenchmarkContext, name: str, agent: Any, *, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"a training curve needs a positive token budget, got {budget}")
        self.ctx, self.name, self.agent, self.budget = ctx, name, agent, budget
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._next = 1  # the next fraction k / curve_points to cross
        self._main = is_main_process()

    def _evaluate(self, update: int, tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        result = self.ctx.evaluate(self.agent, self.name, prompts=self.ctx.settings.curve_prompts, samples=1)
        self.seconds += time.perf_counter() - start
        return {
            "update": update,
            "sampled_tokens": tokens,
            "kl": float(np.nanmean(result.kl)) if np.isfinite(result.kl).any() else float("nan"),
            "proxy": float(np.mean(result.proxy)),
            "gold": float(np.mean(result.gold)) if result.gold is not None else float("nan"),
            "response_length": float(np.mean(result.lengths)),
            "per_prompt": {metric: result.per_prompt(metric) for metric in CURVE_METRICS},
        }

    def start(self) -> None:
        """The point before training."""
        if self._main:
            self.points.append({"fraction": 0.0, **self._evaluate(0, 0)})

    def __call__(self, update: int, stats: dict[str, float]) -> None:
        """The agent's ``callback(update, stats)``: evaluate when the sampled tokens cross a fraction."""
        tokens = int(stats.get("sampled_tokens", getattr(self.agent, "sampled_tokens", 0)))
        n = self.ctx.settings.curve_points
        crossed = []
        while self._next <= n and tokens * n >= self._next * self.budget:
            crossed.append(self._next)
            self._next += 1
        if crossed and self._main:
            point = self._evaluate(update, tokens)
            self.points += [{"fraction": k / n, **point} for k in crossed]

    def finish(self) -> list[dict[str, Any]]:
        """Record the curve; a run that stopped before its budget gets its remaining points at the end."""
        n = self.ctx.settings.curve_points
        if self._next <= n and self._main:
            point = self._evaluate(int(getattr(self.agent, "update", 0)), int(self.agent.sampled_tokens))
            self.points += [{"fraction": k / n, **point} for k in range(self._next, n + 1)]
            self._next = n + 1
        self.ctx.record(self.name, curve=self.points, curve_seconds=self.seconds)
        return self.points


def _no_reward(prompts: Any, responses: Any) -> list[float]:
    """Evaluation environments pay nothing: the proxy is scored afterwards, in one batch."""
    return [0.0] * len(responses)


def _seed_agent(agent: Any, seed: int) -> None:
    """Give sampling agents the same seed at evaluation so runs are reproducible."""
    generator = getattr(agent, "_generator", None) or getattr(agent, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
