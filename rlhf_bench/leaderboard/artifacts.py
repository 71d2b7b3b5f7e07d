"""Build (or load from the cache) what every agent of the benchmark shares.

:func:`build_artifacts` builds the artifacts of a registered task (:mod:`rlhf_bench.leaderboard.tasks`).
The default task, ``reviews``, is built here, in stages that each log one concise line when they finish: a
word-level tokenizer; a GPT-2-shaped policy pretrained on generated reviews and fine-tuned on (prompt,
review) pairs (the SFT model); SFT samples compared by simulated annotators (noisy Bradley-Terry draws from
the gold rater, Llama 2's four levels); a helpfulness and a safety reward model initialised from the SFT
model (Llama 2) and trained on those comparisons; their accuracy against noiseless gold labels on held-out
prompts. Everything lands in the task's directory, ``<cache>/benchmark/reviews-<settings hash>/``, and a
second run with the same settings loads it instead (:func:`cached_build`).

With your own models (``policy=``, ``reward_model=``, ``prompts=``) nothing is built: the benchmark
runs on them, with the reward model as proxy and no gold rater unless one is given.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from transformers import PreTrainedTokenizerBase

from agents.policy import TokenSampler
from agents.rollout import collect_episodes
from agents.sft import SFTConfig, sft_train
from llm_env import TextGenVectorEnv
from llm_env.models import load_causal_lm, load_tokenizer
from llm_env.prompts import load_prompts
from llm_env.reward import as_reward_function
from llm_env.tiny import tiny_gpt2, word_tokenizer
from rewards import (
    Llama2Reward,
    RewardModel,
    evaluate_reward_model,
    save_preferences,
    simulate_preferences,
    train_reward_model,
)
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.task import KIDS_TAG, TASK_VERSION, ReviewTask
from rlhf_bench.leaderboard.tasks import DEFAULT_TASK, get_task, register_task, task_directory

__all__ = [
    "Artifacts",
    "build_artifacts",
    "build_review_artifacts",
    "cached_build",
    "default_cache_dir",
    "load_byo_artifacts",
    "new_sft_policy",
    "sample_texts",
    "train_sft_policy",
]

Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$LLM_ENV_CACHE`` or ``~/.cache/llm_env``."""
    return Path(os.environ.get("LLM_ENV_CACHE", Path.home() / ".cache" / "llm_env"))


@dataclass
class Artifacts:
    """What the agents share: models, prompts, the proxy reward and (for the built-in task) the gold."""

    policy_path: str
    """The SFT policy (and its tokenizer): where agents start and the KL reference."""
    reference_path: str
    """The KL reference (the SFT policy unless given)."""
    tokenizer: PreTrainedTokenizerBase
    reward: Callable[[Sequence[str], Sequence[str]], Any]
    """The reward the agents optimise: the proxy (on the review task, the Llama 2 combination of the two
    reward models), or on a verifiable task the checker itself."""
    gold: Callable[[Sequence[str], Sequence[str]], Any] | None
    """The gold rater that scores the agents, or None when running on your own models without one."""
    train_prompts: list[str]
    eval_prompts: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    """Build-time measurements: SFT losses, reward-model accuracies (overall and per level)."""
    directory: Path | None = None
    task: Any = None
    """The task object (its generator and gold rater or checker) when built by a registered task."""
    preference_files: list[Path] = field(default_factory=list)
    """Preference JSONL files (``rewards.save_preferences`` format) the offline DPO row trains on: the
    comparisons the reward models learned from, or SFT samples ranked by a checker; empty for your own
    models."""
    critic_path: str | None = None
    """A reward model PPO initialises its separate critic from (InstructGPT), sharing the policy's tokenizer:
    on the review task the helpfulness model; None (a value head on the policy's trunk) for a checker's
    reward and for your own models, whose reward model may use another tokenizer."""
    verifiable: bool = False
    """True when ``reward`` is the gold itself (a checker): the agents optimise exactly what scores them,
    there is no proxy gap and the gold and proxy columns agree."""
    success_score: float = 1.0
    """On a verifiable task, the checker score at and above which a response counts as correct (pass@k,
    success rate): 1 for answers that are right or not, lower for a task whose score also grades how
    (the guessing game: winning in fewer turns)."""
    env_options: dict[str, Any] = field(default_factory=dict)
    """Environment options every environment of the task gets (:meth:`BenchmarkContext.make_env`): a
    multi-turn task's ``responder`` and ``max_turns``."""
    unsupported_agents: dict[str, str] = field(default_factory=dict)
    """Entries the task cannot run, with the reason: the runner skips them and says why."""


def sample_texts(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    k: int,
    *,
    max_new_tokens: int,
    num_envs: int,
    device: torch.device | str,
    seed: int,
    env_options: dict[str, Any] | None = None,
) -> list[list[str]]:
    """``k`` sampled responses per prompt, generated through the environment with the policy's KV cache
    (``env_options``: more environment options, e.g. a multi-turn task's responder)."""
    env = TextGenVectorEnv(
        num_envs=num_envs,
        prompts=list(prompts),
        tokenizer=tokenizer,
        reward=lambda p, r: [0.0] * len(r),
        max_new_tokens=max_new_tokens,
        autoreset_mode=AutoresetMode.DISABLED,
        device=device,
        **(env_options or {}),
    )
    sampler = TokenSampler(policy, generator=torch.Generator(device=device).manual_seed(seed))
    queue = np.repeat(np.arange(len(prompts)), k)
    draws = collect_episodes(env, sampler, len(queue), seed=seed, prompt_indices=queue)
    out: list[list[str]] = [[] for _ in prompts]
    for index, response in zip(draws.prompt_index, draws.responses):
        out[int(index)].append(response)
    return out


def new_sft_policy(
    tokenizer: PreTrainedTokenizerBase,
    settings: BenchmarkSettings,
    *,
    device: torch.device | str,
    progress: bool,
    n_positions: int = 128,
) -> tuple[Any, SFTConfig]:
    """A fresh GPT-2-shaped policy of the settings' size (``n_positions`` of context) and the supervised
    configuration every task's SFT stages train it with: the start of :func:`train_sft_policy`, and of a task
    that trains on token-level examples of its own (the guessing game's conversations)."""
    model = tiny_gpt2(
        tokenizer,
        n_layer=settings.policy_layers,
        n_embd=settings.policy_width,
        n_head=4,
        n_positions=n_positions,
        seed=settings.seed,
    ).to(device)
    config = SFTConfig(
        learning_rate=settings.sft_lr,
        epochs=1,
        batch_size=32,
        warmup_ratio=0.05,
        seed=settings.seed,
        progress=progress,
    )
    return model, config


def train_sft_policy(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    settings: BenchmarkSettings,
    *,
    device: torch.device | str,
    log: Log,
    progress: bool,
    what: str = "texts",
    n_positions: int = 128,
) -> tuple[Any, dict[str, Any]]:
    """A GPT-2-shaped policy of the settings' size, pretrained with the language-modelling loss on every
    token of ``documents``, then fine-tuned on (prompt, response) ``pairs`` (loss on the responses only):
    the SFT model of a task, in eval mode. ``what`` names the texts in the log lines; ``n_positions`` is
    the policy's context (prompt and response together, in tokens)."""
    model, config = new_sft_policy(
        tokenizer, settings, device=device, progress=progress, n_positions=n_positions
    )
    start = time.perf_counter()
    ids = [[*row, tokenizer.eos_token_id] for row in tokenizer(list(documents))["input_ids"]]
    model, pretrain = sft_train(model, [(row[:1], row[1:]) for row in ids], config)  # LM loss on every token
    log(
        f"pretrained the policy on {len(documents)} {what}: loss {pretrain['epoch_loss'][-1]:.3f} ({time.perf_counter() - start:.0f}s)"
    )
    start = time.perf_counter()
    model, sft = sft_train(model, list(pairs), config, tokenizer=tokenizer)
    log(
        f"fine-tuned it on {len(pairs)} (prompt, response) pairs: loss {sft['epoch_loss'][-1]:.3f} ({time.perf_counter() - start:.0f}s)"
    )
    return model.eval(), {"pretrain_loss": pretrain["epoch_loss"][-1], "sft_loss": sft["epoch_loss"][-1]}


def cached_build(
    directory: Path,
    build: Callable[[Path], dict[str, Any]],
    *,
    settings: BenchmarkSettings,
    rebuild: bool,
    log: Log,
    what: str,
) -> dict[str, Any]:
    """The build metrics of the artifacts cached in ``directory``, running ``build`` first unless present.

    ``build(tmp)`` writes the artifacts into ``tmp`` (a sibling ``.partial`` directory) and returns its
    metrics; they are saved with the build time and the settings' artifact fields as ``artifacts.json``
    and the directory is renamed into place only then, so an interrupted build is never taken for a
    finished one. ``rebuild`` deletes the cached copy first; ``what`` names the artifacts in the log.
    """
    done = directory / "artifacts.json"
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    if done.is_file():
        log(f"reusing the cached {what} in {directory}")
        return json.loads(done.read_text())
    start = time.perf_counter()
    tmp = directory.with_name(directory.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    metrics = build(tmp)
    metrics["build_seconds"] = time.perf_counter() - start
    metrics["settings"] = {name: getattr(settings, name) for name in settings.ARTIFACT_FIELDS}
    (tmp / "artifacts.json").write_text(json.dumps(metrics, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    log(f"cached the {what} in {directory} ({metrics['build_seconds']:.0f}s)")
    return metrics


def _reward_model(
    name: str,
    task: ReviewTask,
    settings: BenchmarkSettings,
    policy: Any,
    tokenizer: Any,
    prompts: list[str],
    eval_prompts: list[str],
    gold: Callable,
    device: Any,
    stream: int,
    log: Log,
    progress: bool,
) -> tuple[Any, dict, list]:
    def sample_fn(ps: list[str], k: int) -> list[list[str]]:
        return sample_texts(
            policy,
            tokenizer,
            ps,
            k,
            max_new_tokens=settings.max_new_tokens,
            num_envs=settings.num_envs,
            device=device,
            seed=settings.seed * 1000 + stream,
        )

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical sample pairs are dropped: counted below
        train = simulate_preferences(
            prompts,
            sample_fn,
            gold,
            pairs_per_prompt=settings.pairs_per_prompt,
            temperature=settings.annotator_temperature,
            seed=settings.seed + stream,
        )
        held_out = simulate_preferences(
            eval_prompts,
            sample_fn,
            gold,
            pairs_per_prompt=2,
            temperature=0.0,
            seed=settings.seed + stream + 1,
        )
    rm = RewardModel.from_causal_lm(policy, tokenizer)
    result = train_reward_model(
        rm,
        train,
        eval_fraction=0.0,  # measured once, below, on the held-out prompts
        epochs=settings.rm_epochs,
        lr=settings.rm_lr,
        batch_size=32,
        center_coef=0.01,
        seed=settings.seed + stream,
        progress=progress,
    )
    evaluation = evaluate_reward_model(result.model, held_out)
    per_level = {level: round(v["accuracy"], 3) for level, v in evaluation["per_level"].items()}
    log(
        f"trained the {name} reward model on {len(train)} simulated comparisons: held-out accuracy vs the "
        f"noiseless gold {evaluation['accuracy']:.3f} ({per_level}) ({time.perf_counter() - start:.0f}s)"
    )
    metrics = {"train_pairs": len(train), "eval_pairs": len(held_out), "accuracy": evaluation["accuracy"]}
    metrics.update(
        per_level=evaluation["per_level"], mean_gap=evaluation["mean_gap"], stats=result.metrics["stats"]
    )
    return result.model, metrics, train


def build_artifacts(
    settings: BenchmarkSettings,
    *,
    task: str = DEFAULT_TASK,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    rebuild: bool = False,
    log: Log = print,
    progress: bool = True,
) -> Artifacts:
    """The artifacts of the registered ``task`` (default ``reviews``), from its directory under
    ``cache_dir`` (default :func:`default_cache_dir`) when they are there; an unknown name raises, listing
    the registered tasks."""
    entry = get_task(task)
    directory = task_directory(task, settings, cache_dir if cache_dir is not None else default_cache_dir())
    return entry.builder(
        settings, directory=directory, device=device, rebuild=rebuild, log=log, progress=progress
    )


PREFERENCE_FILES = ("preferences_helpfulness.jsonl", "preferences_safety.jsonl")
"""The review task's preference data, in its directory: what the two reward models learn from."""


@register_task(
    "reviews",
    description="short reviews scored by a gold rater; agents optimise proxy reward models learned from "
    "simulated preferences (over-optimisation shows)",
    version=TASK_VERSION,
)
def build_review_artifacts(
    settings: BenchmarkSettings,
    *,
    directory: Path,
    device: torch.device | str = "cpu",
    rebuild: bool = False,
    log: Log = print,
    progress: bool = True,
) -> Artifacts:
    """The review task's artifacts in ``directory`` (see the module docstring)."""
    task = ReviewTask(seed=settings.seed)
    train_prompts = task.prompts(settings.train_prompts, stream=5)
    eval_prompts = task.prompts(settings.eval_prompts, stream=6)

    def build(tmp: Path) -> dict[str, Any]:
        tokenizer = word_tokenizer([" ".join(task.vocabulary())])
        prompts = task.prompts(settings.pretrain_texts, stream=1)
        documents = [p + r for p, r in zip(prompts, task.reviews(prompts, stream=1))]
        prompts = task.prompts(settings.sft_pairs, stream=2)
        pairs = list(zip(prompts, task.reviews(prompts, stream=2)))
        policy, metrics = train_sft_policy(
            tokenizer, documents, pairs, settings, device=device, log=log, progress=progress, what="reviews"
        )
        policy.save_pretrained(tmp / "sft")
        tokenizer.save_pretrained(tmp / "sft")
        rm_prompts = task.prompts(settings.rm_prompts, stream=3)
        rm_eval = task.prompts(settings.rm_eval_prompts, stream=4)
        kids = [
            f"{KIDS_TAG} {p}" if not p.startswith(KIDS_TAG) else p
            for p in task.prompts(settings.safety_rm_prompts, stream=7)
        ]
        kids_eval = [f"{KIDS_TAG} {p}" if not p.startswith(KIDS_TAG) else p for p in rm_eval]
        for name, prompts, eval_ps, gold, stream in (
            ("helpfulness", rm_prompts, rm_eval, task.gold_helpfulness, 10),
            ("safety", kids, kids_eval, task.gold_safety, 20),
        ):
            rm, rm_metrics, data = _reward_model(
                name, task, settings, policy, tokenizer, prompts, eval_ps, gold, device, stream, log, progress
            )
            rm.save_pretrained(tmp / f"rm_{name}")
            save_preferences(data, tmp / f"preferences_{name}.jsonl")
            metrics[f"rm_{name}"] = rm_metrics
        return metrics

    metrics = cached_build(
        directory, build, settings=settings, rebuild=rebuild, log=log, what="SFT policy and reward models"
    )
    tokenizer = load_tokenizer(directory / "sft")
    reward = Llama2Reward(
        RewardModel.from_pretrained(directory / "rm_helpfulness", device=device),
        RewardModel.from_pretrained(directory / "rm_safety", device=device),
        safety_tag=KIDS_TAG,
    )
    return Artifacts(
        policy_path=str(directory / "sft"),
        reference_path=str(directory / "sft"),
        tokenizer=tokenizer,
        reward=reward,
        gold=task.gold,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        metrics=metrics,
        directory=directory,
        task=task,
        preference_files=[directory / name for name in PREFERENCE_FILES],
        critic_path=str(directory / "rm_helpfulness"),
    )


def load_byo_artifacts(
    *,
    policy: str,
    reward_model: str,
    prompts: str | None,
    reference: str | None,
    gold_reward_model: str | None,
    settings: BenchmarkSettings,
    device: torch.device | str,
    log: Log = print,
) -> Artifacts:
    """Artifacts from your own models and prompts (local paths or hub names; hub names need network).

    The prompts are split into training and held-out evaluation prompts by the settings' sizes (seeded).
    """
    tokenizer = load_tokenizer(policy)
    reward = as_reward_function(reward_model, device=device)
    gold = as_reward_function(gold_reward_model, device=device) if gold_reward_model else None
    if prompts is None:
        raise ValueError('--prompts is required with --policy (a JSONL file of {"prompt": ...} lines)')
    texts = load_prompts(prompts)
    order = np.random.default_rng(settings.seed).permutation(len(texts))
    n_eval = min(settings.eval_prompts, max(1, len(texts) // 5))
    eval_prompts = [texts[i] for i in order[:n_eval]]
    train_prompts = [texts[i] for i in order[n_eval : n_eval + settings.train_prompts]] or eval_prompts
    load_causal_lm(policy)  # fail early on a bad path
    log(
        f"using your models: policy {policy}, reward {reward_model}; {len(train_prompts)} train / {len(eval_prompts)} eval prompts"
    )
    return Artifacts(
        policy_path=policy,
        reference_path=reference or policy,
        tokenizer=tokenizer,
        reward=reward,
        gold=gold,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
    )
