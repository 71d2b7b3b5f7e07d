"""``llm-env benchmark``: the whole RLHF benchmark from one command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum``.

    A count out of range (``--nproc 0``, ``--seeds 0``, a negative seed, which NumPy's generators refuse) is
    then a one-line usage error (exit status 2) at parse time, not a traceback minutes into the run.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def add_parser(subparsers: Any) -> None:
    """Register ``benchmark``."""
    parser = subparsers.add_parser(
        "benchmark",
        help="build a task, train every agent on one environment, print the leaderboard",
        description=(
            "Builds (or reuses from the cache) a task's tiny SFT policy and reward: by default the review task "
            "(simulated preferences and proxy reward models, scored by a gold rater), with --task sorting or a "
            "reasoning-gym task a verifiable one (a checker is both reward and gold). Then trains and evaluates every registered agent "
            "on the same environment: SFT, best-of-k, rejection sampling, PPO (with a beta sweep on the review task), "
            "GRPO, RLOO, offline DPO, online DPO, Stable-Baselines3 PPO and a random agent; --agents all adds GRPO "
            "with the KL in the loss, rejection sampling then PPO, Dr. GRPO, DAPO, GSPO, REINFORCE++ and ReMax. "
            "Every score, win-rate and KL carries a 95% bootstrap "
            "interval (over the held-out prompts, and over seeds with --seeds N), every row states what it consumed "
            "(sampled tokens, reward-model calls, gradient steps, wall time). Writes the leaderboard (Markdown, CSV, "
            "JSON with versions, settings and seeds), plots, samples and a self-contained report.html to --out."
        ),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", dest="size", action="store_const", const="quick", help="minutes on 2 CPU cores (default)"
    )
    size.add_argument(
        "--full",
        dest="size",
        action="store_const",
        const="full",
        help="3 seeds, more data, 3x the token budget, a wider beta sweep and evaluation (under an hour on 2 CPU cores)",
    )
    size.add_argument(
        "--tiny", dest="size", action="store_const", const="tiny", help="toy sizes, seconds (for smoke tests)"
    )
    parser.set_defaults(size="quick")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when available, default)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="where reports and plots go")
    parser.add_argument(
        "--cache-dir", type=Path, help="artifact cache (default $LLM_ENV_CACHE or ~/.cache/llm_env)"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the cached SFT policy and reward models"
    )
    parser.add_argument(
        "--agents",
        help="comma-separated entries to run, 'all' for every entry or 'default' for the default set "
        "(default: the default set); sft always runs",
    )
    parser.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="seed of the task, the SFT policy and the reward models, and the agents' first seed (default: 0)",
    )
    parser.add_argument(
        "--seeds",
        type=_int_at_least(1),
        help="repeat the whole agent sweep with N independent seeds (--seed, --seed + 1, ...) on the shared SFT "
        "policy and reward models; the intervals then cover training randomness too (default: 1 with --quick "
        "and --tiny, 3 with --full)",
    )
    parser.add_argument(
        "--task",
        help="the task: reviews (default; learned proxy reward, gold rater) or sorting (verifiable reward: "
        "a checker); after pip install -e '.[tasks]', reasoning-gym:<dataset> (any reasoning-gym dataset, its "
        "score_answer the checker), rg-spell-backward or rg-count-bits (reasoning in a scratchpad first; "
        "reasoning-gym datasets at a difficulty the tiny policies partly learn); tasks registered with "
        "rlhf_bench.leaderboard.register_task work too; guess-number is multi-turn (a responder answers each "
        "guess)",
    )
    parser.add_argument(
        "--no-task-settings",
        dest="task_settings",
        action="store_false",
        help="run the preset's settings as they are, without the task's own (e.g. sorting's token budget and "
        "update shape; what a task changes is logged and kept in leaderboard.json's task_settings)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument(
        "--nproc",
        type=_int_at_least(1),
        default=1,
        help="train the data-parallel rows (PPO and its sweep, rejection sampling, the critic-free agents, "
        "offline and online DPO) on N local processes through torchrun's launcher (one GPU each with --device cuda; on CPU they share the cores); evaluation stays in this "
        "process (default: 1)",
    )
    own = parser.add_argument_group("bring your own models and data (paths or hub names)")
    own.add_argument("--policy", help="SFT policy to start from (causal LM)")
    own.add_argument("--reference", help="KL reference (default: the policy)")
    own.add_argument(
        "--reward-model", help="proxy reward model (sequence classifier or rewards.RewardModel dir)"
    )
    own.add_argument("--prompts", help='JSONL file of {"prompt": ...} lines (split into train and held-out)')
    own.add_argument("--gold-reward-model", help="a second reward model used only to score (the gold)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from llm_env.distributed import world_size
    from rlhf_bench.leaderboard.runner import run_benchmark
    from rlhf_bench.leaderboard.settings import BenchmarkSettings

    if world_size() > 1:  # every rank would run the whole benchmark
        raise SystemExit("llm-env benchmark: run it in one process and pass --nproc N, not under torchrun")

    overrides = {"seeds": args.seeds} if args.seeds is not None else {}
    settings = getattr(BenchmarkSettings, args.size)(seed=args.seed, **overrides)
    agents = [a.strip() for a in args.agents.split(",") if a.strip()] if args.agents else None
    result = run_benchmark(
        settings,
        task=args.task,
        agents=agents,
        device=args.device,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        rebuild=args.rebuild,
        policy=args.policy,
        reference=args.reference,
        reward_model=args.reward_model,
        prompts=args.prompts,
        gold_reward_model=args.gold_reward_model,
        progress=args.progress,
        nproc=args.nproc,
        use_task_settings=args.task_settings,
    )
    print(f"benchmark finished in {result.seconds:.0f}s; reports in {args.out}")
    return 0
