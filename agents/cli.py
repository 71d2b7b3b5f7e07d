"""``llm-env ppo`` and ``llm-env rejection-sampling``: the agents from the command line.

Both take a policy, a prompt file and a reward model, and every field of their config dataclass as an
option (``--learning-rate``, ``--episodes-per-update``, ``--k``, ``--sft-epochs``, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llm_env.config_cli import add_dataclass_arguments, dataclass_from_args


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models and environment")
    group.add_argument("--policy", required=True, help="SFT model to optimise: local path or hub name")
    group.add_argument("--prompts", required=True, help='JSONL file with one {"prompt": ...} per line')
    group.add_argument(
        "--reward", required=True, help="reward model: rewards.RewardModel directory or seq-cls path"
    )
    group.add_argument("--reference", help="KL reference (default: the policy's initial weights)")
    group.add_argument("--tokenizer", help="tokenizer path (default: the policy's)")
    group.add_argument("--num-envs", type=int, default=16, help="sub-environments stepped in parallel")
    group.add_argument("--max-new-tokens", type=int, default=64, help="response budget in tokens")
    group.add_argument("--max-prompt-length", type=int, help="prompt budget (default: the longest prompt)")
    group.add_argument("--truncation-side", choices=["left", "right"], help="how to cut prompts over budget")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    group.add_argument("--out", required=True, type=Path, help="directory for the final model and metrics")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/checkpoint")


def _env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": args.max_prompt_length,
        "truncation_side": args.truncation_side,
    }


def _write_history(out: Path, history: list[dict[str, float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=2))


def _ppo(args: argparse.Namespace) -> int:
    from agents.ppo import PPOAgent, PPOConfig

    config = dataclass_from_args(PPOConfig, args)
    agent = PPOAgent(args.policy, args.tokenizer, config, reference=args.reference, device=args.device)
    checkpoint = args.out / "checkpoint"
    if args.resume:
        agent.load_checkpoint(checkpoint)
    env = agent.make_env(args.prompts, args.reward, num_envs=args.num_envs, **_env_kwargs(args))
    history = agent.train(env, args.updates, checkpoint_dir=checkpoint)
    agent.save_pretrained(args.out / "policy")
    _write_history(args.out, history)
    last = history[-1] if history else {}
    print(
        f"ppo: {agent.update} updates, final score {last.get('score', float('nan')):.4f}, KL {last.get('kl', float('nan')):.4f}"
    )
    print(f"saved the policy to {args.out / 'policy'}")
    return 0


def _rejection(args: argparse.Namespace) -> int:
    from agents.rejection import RejectionSamplingAgent, RejectionSamplingConfig

    config = dataclass_from_args(RejectionSamplingConfig, args)
    agent = RejectionSamplingAgent(args.policy, args.tokenizer, config, device=args.device)
    checkpoint = args.out / "checkpoint"
    if args.resume:
        agent.load_checkpoint(checkpoint)
    reference = args.reference or args.policy
    env = agent.make_env(
        args.prompts, args.reward, num_envs=args.num_envs, reference=reference, **_env_kwargs(args)
    )
    history = agent.train(env, checkpoint_dir=checkpoint)
    agent.save_pretrained(args.out / "policy")
    _write_history(args.out, history)
    for stats in history:
        measured = stats.get("kl_best_of_k_measured", float("nan"))
        print(
            f"round {int(stats['round'])}: mean score {stats['sample_score']:.4f}, best-of-{config.k} "
            f"{stats['best_score']:.4f}, KL(best-of-k) measured {measured:.3f} vs theory {stats['kl_best_of_k_theory']:.3f}"
        )
    print(f"saved the policy to {args.out / 'policy'}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``ppo`` and ``rejection-sampling``."""
    from agents.ppo import PPOConfig
    from agents.rejection import RejectionSamplingConfig

    ppo = subparsers.add_parser("ppo", help="token-level PPO through the environment")
    _env_arguments(ppo)
    ppo.add_argument("--updates", type=int, default=100, help="total PPO updates")
    add_dataclass_arguments(ppo, PPOConfig)
    ppo.set_defaults(func=_ppo)

    rs = subparsers.add_parser("rejection-sampling", help="best-of-k sampling and fine-tuning (Llama 2)")
    _env_arguments(rs)
    add_dataclass_arguments(rs, RejectionSamplingConfig)
    rs.set_defaults(func=_rejection)
