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
policy, gold win-rate against the SFT policy and generation throughput. ``register_agent(...,
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
from llm_env.models import load_causal_lm
from llm_env.reward import check_scores
from rlhf_bench.leaderboard.artifacts import Artifacts
from rlhf_bench.leaderboard.settings import BenchmarkSettings

__all__ = [
    "AgentEntry",
    "BenchmarkContext",
    "EvalResult",
    "register_agent",
    "registered_agents",
    "select_agents",
    "win_rate",
]

AgentFactory = Callable[["BenchmarkContext"], Any]


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

    def order(self) -> np.ndarray:
        """Episode order sorted by (prompt, sample), to pair two agents' answers to the same prompt."""
        return np.lexsort((self.sample, self.prompt_index))


def win_rate(result: EvalResult, baseline: EvalResult, *, use_gold: bool = True) -> float:
    """Share of prompts (and draws) where ``result`` scores above ``baseline`` (a tie counts one half)."""
    a, b = (result.gold, baseline.gold) if use_gold else (result.proxy, baseline.proxy)
    if a is None or b is None:
        return float("nan")
    ia, ib = result.order(), baseline.order()
    keys_a = list(zip(result.prompt_index[ia], result.sample[ia]))
    keys_b = list(zip(baseline.prompt_index[ib], baseline.sample[ib]))
    if keys_a != keys_b:
        raise ValueError("win_rate needs both results on the same prompts and draws")
    diff = a[ia] - b[ib]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


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
            reward=self.artifacts.reward,
            reference=reference,
            kl_coef=kl_coef,
            max_new_tokens=self.settings.max_new_tokens,
            device=self.device,
        )
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
        )


def _no_reward(prompts: Any, responses: Any) -> list[float]:
    """Evaluation environments pay nothing: the proxy is scored afterwards, in one batch."""
    return [0.0] * len(responses)


def _seed_agent(agent: Any, seed: int) -> None:
    """Give sampling agents the same seed at evaluation so runs are reproducible."""
    generator = getattr(agent, "_generator", None) or getattr(agent, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
