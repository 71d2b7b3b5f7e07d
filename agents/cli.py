"""``llm-env ppo``, ``rejection-sampling``, the critic-free agents (``grpo``, ``dr-grpo``, ``dapo``, ``gspo``,
``rloo``, ``reinforce-pp``, ``remax``), ``dpo`` and ``online-dpo``: the agents from the command line.

Every option is generated from a dataclass, so the command line has exactly the fields, defaults and help
of the library: :class:`RunOptions` (models, data, output), the environment's options from
:class:`llm_env.EnvConfig` (``--max-new-tokens``, ``--kl-estimator``, ...) and the agent's config
(``--learning-rate``, ``--episodes-per-update``, ``--k``, ``--group-size``, ``--kl-in``, ...).

They all run on N processes under ``torchrun --nproc-per-node N -m rlhf_bench <command> ...``: every rank
trains on its share of the prompts (of the preference pairs for ``dpo``) and rank 0 prints and writes the
policy, ``history.json`` and the checkpoint.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.dapo import DAPOAgent
from agents.dpo import DPOAgent, DPOConfig, load_preference_pairs
from agents.dr_grpo import DrGRPOAgent
from agents.grpo import GRPOAgent
from agents.gspo import GSPOAgent
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig
from agents.pg import PGAgent
from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce_pp import ReinforcePPAgent
from agents.rejection import RejectionSamplingAgent, RejectionSamplingConfig
from agents.remax import ReMaxAgent
from agents.rloo import RLOOAgent
from llm_env import EnvConfig
from llm_env.config_cli import add_dataclass_arguments, dataclass_from_args, options_from_args
from llm_env.distributed import is_main_process

__all__ = ["ENV_OPTIONS", "PG_AGENTS", "DPORunOptions", "RunOptions", "add_parser"]


@dataclass
class RunOptions:
    """What an agent's command needs besides its config: the models, the data and where to write."""

    policy: str
    """SFT model to optimise: local path or hub name."""
    prompts: str
    """JSONL file with one {"prompt": ...} per line."""
    reward: str
    """Reward model: a rewards.RewardModel directory or a sequence-classification path / hub name."""
    out: str
    """Directory for the final model, the metrics and the checkpoint."""
    reference: str | None = None
    """KL reference (default: the policy's initial weights)."""
    tokenizer: str | None = None
    """Tokenizer path (default: the policy's)."""
    num_envs: int = 16
    """Sub-environments stepped in parallel."""
    device: str = "auto"
    """cpu, cuda, cuda:1 or auto (CUDA when available)."""
    resume: bool = False
    """Continue from the checkpoint in OUT/checkpoint."""


@dataclass
class DPORunOptions:
    """What offline DPO needs besides its config: preference data instead of prompts and a reward model."""

    policy: str
    """SFT model to optimise: local path or hub name."""
    data: tuple[str, ...]
    """Preference JSONL file(s): {"prompt", "chosen", "rejected"} per line (as rewards.save_preferences writes)."""
    out: str
    """Directory for the final model, the metrics and the checkpoint."""
    reference: str | None = None
    """KL reference (default: the policy's initial weights, or its base with the LoRA adapter disabled)."""
    tokenizer: str | None = None
    """Tokenizer path (default: the policy's)."""
    device: str = "auto"
    """cpu, cuda, cuda:1 or auto (CUDA when available)."""
    resume: bool = False
    """Continue from the checkpoint in OUT/checkpoint."""
    checkpoint_every: int = 100
    """Write the checkpoint every this many optimizer steps (and at the end)."""


ENV_OPTIONS = (
    "kl_estimator",
    "max_new_tokens",
    "max_prompt_length",
    "truncation_side",
    "stop_token_ids",
    "missing_eos_penalty",
    "prompt_order",
    "prompt_key",
    "chat_template",
    "reward_batch_size",
    "dtype",
)
"""The :class:`~llm_env.EnvConfig` fields offered on the command line (the others are objects, or set by the
agent: the tokenizer, the reference, ``kl_coef``, the device)."""


PG_AGENTS: dict[str, tuple[type[PGAgent], str]] = {
    "grpo": (GRPOAgent, "GRPO (Shao et al. 2024): group-normalised advantages, PPO clip, no critic"),
    "dr-grpo": (DrGRPOAgent, "Dr. GRPO (Liu et al. 2025): GRPO without std division and length bias"),
    "dapo": (DAPOAgent, "DAPO (Yu et al. 2025): clip-higher, token-level loss, dynamic sampling"),
    "gspo": (GSPOAgent, "GSPO (Zheng et al. 2025): clipped sequence-level importance ratio"),
    "rloo": (RLOOAgent, "RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline"),
    "reinforce-pp": (ReinforcePPAgent, "REINFORCE++ (Hu 2025): per-token KL returns, batch-normalised"),
    "remax": (ReMaxAgent, "ReMax (Li et al. 2023): REINFORCE with the greedy response as baseline"),
}
"""The critic-free subcommands: agent class (its ``config_class`` gives the options) and one-line help.

:meta hide-value:
"""

PG_ENV_OPTIONS = tuple(name for name in ENV_OPTIONS if name != "kl_estimator")
"""The environment options of the critic-free commands: their config's ``--kl-estimator`` sets the env's."""


def _add_common(parser: argparse.ArgumentParser, env_options: tuple[str, ...] = ENV_OPTIONS) -> None:
    add_dataclass_arguments(parser, RunOptions)
    add_dataclass_arguments(parser, EnvConfig, include=env_options)


def _start(agent_class: type, config: Any, run: Any, **kwargs: Any) -> tuple[Any, Path]:
    """The agent of a command, resumed from ``<out>/checkpoint`` with ``--resume``; and that directory."""
    agent = agent_class(run.policy, run.tokenizer, config, device=run.device, **kwargs)
    checkpoint = Path(run.out) / "checkpoint"
    if run.resume:
        agent.load_checkpoint(checkpoint)
    return agent, checkpoint


def _env(
    agent: Any, run: RunOptions, args: argparse.Namespace, include: tuple[str, ...], **kwargs: Any
) -> Any:
    """The training environment of a command, from its run options and the environment options it exposes."""
    env_options = options_from_args(EnvConfig, args, include=include)
    return agent.make_env(run.prompts, run.reward, num_envs=run.num_envs, **kwargs, **env_options)


def _finish(agent: Any, out: str, history: list[dict[str, float]], report: Callable[[], list[str]]) -> int:
    """Save the policy (every rank calls it, rank 0 writes) and ``history.json``; rank 0 prints ``report()``."""
    out = Path(out)
    agent.save_pretrained(out / "policy")
    if not is_main_process():
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    for line in report():
        print(line)
    print(f"saved the policy to {out / 'policy'}")
    return 0


def _last(history: list[dict[str, float]], key: str) -> float:
    return history[-1].get(key, float("nan")) if history else float("nan")


def _ppo(args: argparse.Namespace) -> int:
    run = dataclass_from_args(RunOptions, args)
    agent, checkpoint = _start(PPOAgent, dataclass_from_args(PPOConfig, args), run, reference=run.reference)
    env = _env(agent, run, args, ENV_OPTIONS)
    history = agent.train(env, args.updates, checkpoint_dir=checkpoint)
    return _finish(
        agent,
        run.out,
        history,
        lambda: [
            f"ppo: {agent.update} updates, final score {_last(history, 'score'):.4f}, "
            f"KL {_last(history, 'kl'):.4f}"
        ],
    )


def _rejection(args: argparse.Namespace) -> int:
    run = dataclass_from_args(RunOptions, args)
    config = dataclass_from_args(RejectionSamplingConfig, args)
    agent, checkpoint = _start(RejectionSamplingAgent, config, run)
    env = _env(agent, run, args, ENV_OPTIONS, reference=run.reference or run.policy)
    history = agent.train(env, checkpoint_dir=checkpoint)
    return _finish(
        agent,
        run.out,
        history,
        lambda: [
            f"round {int(stats['round'])}: mean score {stats['sample_score']:.4f}, best-of-{config.k} "
            f"{stats['best_score']:.4f}, KL(best-of-k) measured "
            f"{stats.get('kl_best_of_k_measured', float('nan')):.3f} vs theory "
            f"{stats['kl_best_of_k_theory']:.3f}"
            for stats in history
        ],
    )


def _updates(args: argparse.Namespace) -> int | None:
    """``--updates``, or 100 when neither it nor ``--total-tokens`` bounds the run."""
    return args.updates if args.updates is not None or args.total_tokens is not None else 100


def _train_online(
    args: argparse.Namespace,
    agent_class: Any,
    config_class: Any,
    env_options: Any,
    summary: Callable[[Any, list], str],
) -> int:
    """The body of every command whose agent samples from the environment and trains on a token budget or
    a number of updates (the critic-free agents and online DPO); ``summary`` words the final report line."""
    run = dataclass_from_args(RunOptions, args)
    config = dataclass_from_args(config_class, args)
    agent, checkpoint = _start(agent_class, config, run, reference=run.reference)
    env = _env(agent, run, args, env_options)
    history = agent.train(env, _updates(args), total_tokens=args.total_tokens, checkpoint_dir=checkpoint)
    return _finish(agent, run.out, history, lambda: [summary(agent, history)])


def _pg(args: argparse.Namespace) -> int:
    agent_class = PG_AGENTS[args.command_name][0]
    return _train_online(
        args,
        agent_class,
        agent_class.config_class,
        PG_ENV_OPTIONS,
        lambda agent, history: (
            f"{agent.algorithm}: {agent.update} updates, {agent.sampled_tokens} sampled tokens, final score "
            f"{_last(history, 'score'):.4f}, KL {_last(history, 'kl'):.4f}"
        ),
    )


def _dpo(args: argparse.Namespace) -> int:
    run = dataclass_from_args(DPORunOptions, args)
    config = dataclass_from_args(DPOConfig, args)
    agent, checkpoint = _start(DPOAgent, config, run, reference=run.reference)
    pairs = agent.tokenize(load_preference_pairs(*run.data))
    history = agent.train(pairs, checkpoint_dir=checkpoint, checkpoint_every=run.checkpoint_every)
    return _finish(
        agent,
        run.out,
        history,
        lambda: [
            f"{config.loss_type}: {agent.step} steps on {len(pairs)} pairs, final loss "
            f"{_last(history, 'loss'):.4f}, implicit-reward accuracy {_last(history, 'reward_accuracy'):.3f}"
        ],
    )


def _online_dpo(args: argparse.Namespace) -> int:
    return _train_online(
        args,
        OnlineDPOAgent,
        OnlineDPOConfig,
        ENV_OPTIONS,
        lambda agent, history: (
            f"online-dpo: {agent.update} updates, {agent.sampled_tokens} sampled tokens, {agent.ties} tied "
            f"pairs skipped, final score {_last(history, 'score'):.4f}, KL {_last(history, 'kl'):.4f}"
        ),
    )


def add_parser(subparsers: Any) -> None:
    """Register ``ppo``, ``rejection-sampling``, one command per critic-free agent, ``dpo`` and
    ``online-dpo``."""
    ppo = subparsers.add_parser("ppo", help="token-level PPO through the environment")
    _add_common(ppo)
    ppo.add_argument("--updates", type=int, default=100, help="total PPO updates (default: 100)")
    add_dataclass_arguments(ppo, PPOConfig)
    ppo.set_defaults(func=_ppo)

    rs = subparsers.add_parser("rejection-sampling", help="best-of-k sampling and fine-tuning (Llama 2)")
    _add_common(rs)
    add_dataclass_arguments(rs, RejectionSamplingConfig)
    rs.set_defaults(func=_rejection)

    for name, (agent_class, summary) in PG_AGENTS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary)
        _add_common(sub, PG_ENV_OPTIONS)
        sub.add_argument(
            "--updates", type=int, help="total updates (default: 100 unless --total-tokens is given)"
        )
        sub.add_argument(
            "--total-tokens", type=int, help="stop once the rollouts have sampled this many response tokens"
        )
        add_dataclass_arguments(sub, agent_class.config_class)
        sub.set_defaults(func=_pg, command_name=name)

    dpo = subparsers.add_parser("dpo", help="offline DPO or IPO on preference pairs (Rafailov et al. 2023)")
    add_dataclass_arguments(dpo, DPORunOptions)
    add_dataclass_arguments(dpo, DPOConfig)
    dpo.set_defaults(func=_dpo)

    online = subparsers.add_parser(
        "online-dpo", help="online DPO: two samples per prompt ranked by the reward model (Guo et al. 2024)"
    )
    _add_common(online)
    online.add_argument(
        "--updates", type=int, help="total updates (default: 100 unless --total-tokens is given)"
    )
    online.add_argument(
        "--total-tokens", type=int, help="stop once the rollouts have sampled this many response tokens"
    )
    add_dataclass_arguments(online, OnlineDPOConfig)
    online.set_defaults(func=_online_dpo)
