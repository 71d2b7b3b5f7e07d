"""The built-in leaderboard entries. Each trains (if it learns) through the benchmark's environment and
returns an agent; the runner evaluates them all the same way. Best-of-k is evaluated by the runner itself
(it is a decoding strategy over the SFT policy, not a token-level agent).

Every policy-optimisation entry (PPO, its beta sweep and the critic-free agents) trains on the same
environment and prompts, pays the same KL (the environment's k1 penalty with ``ppo_kl_coef``, except
``grpo-kl-loss``), uses the same learning rate, rollout size (``ppo_episodes``), epochs and minibatches,
and stops at the same budget of sampled response tokens (``token_budget``). What differs is what defines
each algorithm: its advantage, its loss, its clip range and its sampling (groups, greedy baselines,
dynamic sampling). Each of them, and online DPO, is evaluated along training at fractions of the budget
(:class:`~rlhf_bench.leaderboard.harness.TrainingCurve`).

Every entry records what it consumed for the leaderboard's budget columns: ``sampled_tokens`` (response
tokens generated while training) and ``gradient_steps`` (optimizer steps); the runner adds the responses the
proxy reward scored (``ctx.reward`` counts them)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from agents import (
    DAPOAgent,
    DAPOConfig,
    DPOAgent,
    DPOConfig,
    DrGRPOAgent,
    DrGRPOConfig,
    GRPOAgent,
    GRPOConfig,
    GSPOAgent,
    GSPOConfig,
    IterativeConfig,
    LMActorCriticPolicy,
    OnlineDPOAgent,
    OnlineDPOConfig,
    PPOAgent,
    PPOConfig,
    ReinforcePPAgent,
    ReinforcePPConfig,
    RejectionSamplingAgent,
    RejectionSamplingConfig,
    ReMaxAgent,
    ReMaxConfig,
    RLOOAgent,
    RLOOConfig,
    SFTConfig,
    TokenSampler,
    iterative_rlhf,
    load_preference_pairs,
)
from agents.pg import PGAgent, PGConfig
from llm_env import TextGenEnv, TokenActions
from llm_env.distributed import shard_prompts, world_size
from llm_env.kl import KLGradientBiasWarning
from rlhf_bench.leaderboard.harness import BenchmarkContext, TrainingCurve, register_agent

__all__ = ["RandomAgent", "SB3Agent", "pg_run", "ppo_run"]


class RandomAgent:
    """Uniformly random tokens, with their log-probability ``-log V``: the floor of the leaderboard."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """One uniformly random token per sub-environment, with its log-probability ``-log V``."""
        batch = obs["input_ids"].shape[0]
        tokens = torch.randint(0, self.vocab_size, (batch,), generator=self.generator)
        return TokenActions(tokens, torch.full((batch,), -math.log(self.vocab_size)))


class SB3Agent(TokenSampler):
    """Acts with a trained Stable-Baselines3 policy (:class:`~agents.sb3.LMActorCriticPolicy`) and reports its
    log-probabilities (for the KL).

    That policy's action logits are its LM's next-token logits: the action net *is* the LM head, applied to
    the trunk's last hidden state of the observation. Sampling from the same LM with its own KV cache
    (:class:`~agents.TokenSampler`) therefore samples SB3's policy exactly, without re-encoding the whole
    text at every token as SB3's ``predict`` does (on the character-level reasoning-gym tasks that
    re-encoding made the row's evaluations take 80 s of a run's 12 minutes). Training is untouched:
    SB3 steps the environment one token at a time through its own API.
    """

    def __init__(self, model: Any, seed: int = 0) -> None:
        policy = model.policy
        if not isinstance(policy, LMActorCriticPolicy):
            raise TypeError(f"SB3Agent needs an LMActorCriticPolicy, got {type(policy).__name__}")
        policy.set_training_mode(False)
        self.policy = policy
        super().__init__(policy.features_extractor.lm, seed=seed)


@register_agent("sft", description="the SFT policy, sampled at temperature 1 (the baseline)")
def sft_agent(ctx: BenchmarkContext) -> TokenSampler:
    ctx.record("sft", sampled_tokens=0, gradient_steps=0)
    return TokenSampler(ctx.load_policy().eval(), seed=ctx.settings.seed)


@register_agent("random", description="uniformly random tokens")
def random_agent(ctx: BenchmarkContext) -> RandomAgent:
    ctx.record("random", sampled_tokens=0, gradient_steps=0)
    return RandomAgent(len(ctx.tokenizer), seed=ctx.settings.seed)


def _ppo_config(ctx: BenchmarkContext, kl_coef: float, name: str) -> PPOConfig:
    s = ctx.settings
    return PPOConfig(
        learning_rate=s.ppo_lr,
        episodes_per_update=s.ppo_episodes,
        minibatch_size=max(1, s.ppo_episodes // s.minibatches),
        ppo_epochs=s.update_epochs,
        kl_coef=kl_coef,
        critic=ctx.artifacts.critic_path,
        seed=s.seed,
        log_dir=str(ctx.out_dir / "tensorboard" / name),
        progress=ctx.progress,
    )


def _rank_envs(ctx: BenchmarkContext) -> int:
    """Sub-environments of this rank: the settings' ``num_envs`` is the total over the ``--nproc`` processes,
    so N ranks step as many episodes at once as one process does (a rank with more sub-environments than its
    share of a PPO rollout would score responses it then discards)."""
    return max(1, ctx.settings.num_envs // world_size())


def _train_env(ctx: BenchmarkContext, **kwargs: Any) -> Any:
    """The training environment: on N processes (``llm-env benchmark --nproc``) this rank's share of the
    prompts and of the sub-environments."""
    num_envs = _rank_envs(ctx)
    prompts = shard_prompts(ctx.artifacts.train_prompts, num_envs=num_envs, seed=ctx.settings.seed)
    return ctx.make_env(prompts=prompts, num_envs=num_envs, **kwargs)


def ppo_run(ctx: BenchmarkContext, name: str, kl_coef: float, policy: Any = None) -> PPOAgent:
    """Train PPO at ``kl_coef`` until it has sampled ``token_budget`` response tokens, evaluating on held-out
    prompts along training (:class:`~rlhf_bench.leaderboard.harness.TrainingCurve`) so that gold, proxy and
    KL can be plotted against the sampled tokens and against each other."""
    agent = PPOAgent(
        policy if policy is not None else ctx.load_policy(), ctx.tokenizer, _ppo_config(ctx, kl_coef, name)
    )
    env = _train_env(ctx, kl_coef=kl_coef, reference="sft")
    budget, episodes = ctx.settings.token_budget, ctx.settings.ppo_episodes
    curve = TrainingCurve(ctx, name, agent, budget=budget)
    curve.start()
    # Every episode has at least one token, so the budget is reached by update `cap` at the latest.
    cap = -(-budget // episodes)
    history = agent.train(env, cap, total_tokens=budget, callback=curve)
    curve.finish()
    ctx.record(
        name,
        history=history,
        kl_coef=kl_coef,
        sampled_tokens=agent.sampled_tokens,
        token_budget=budget,
        gradient_steps=agent.optimizer_steps,
    )
    return agent


@register_agent("ppo", description="token-level PPO through the environment (beta from the settings)")
def ppo_agent(ctx: BenchmarkContext) -> PPOAgent:
    return ppo_run(ctx, "ppo", ctx.settings.ppo_kl_coef)


def pg_run(
    ctx: BenchmarkContext,
    name: str,
    agent_class: type[PGAgent],
    config_class: type[PGConfig],
    *,
    grouped: bool = True,
    **overrides: Any,
) -> PGAgent:
    """Train a critic-free agent with the benchmark's shared settings until it has sampled ``token_budget``
    response tokens: learning rate, rollout of ``ppo_episodes`` episodes (``group_size`` responses per prompt
    when ``grouped``, else one per prompt), PPO's ``update_epochs`` passes of ``minibatches`` minibatches, and beta ``ppo_kl_coef`` in the
    environment's k1 reward, unless ``overrides`` say otherwise. The algorithm's own knobs (clip ranges,
    dynamic sampling, overlong shaping) keep their defaults."""
    s = ctx.settings
    group = s.group_size if grouped else 1
    if s.ppo_episodes % group:
        raise ValueError(f"group_size ({s.group_size}) must divide ppo_episodes ({s.ppo_episodes})")
    options: dict[str, Any] = dict(
        learning_rate=s.ppo_lr,
        prompts_per_update=s.ppo_episodes // group,
        group_size=group,
        epochs=s.update_epochs,
        minibatch_size=max(1, s.ppo_episodes // s.minibatches),
        kl_coef=s.ppo_kl_coef,
        kl_in="reward",
        kl_estimator="k1",
        seed=s.seed,
        log_dir=str(ctx.out_dir / "tensorboard" / name),
        progress=ctx.progress,
    )
    options.update(overrides)
    agent = agent_class(ctx.load_policy(), ctx.tokenizer, config_class(**options), reference=ctx.reference)
    env = _train_env(
        ctx,
        kl_coef=agent.env_kl_coef(),
        kl_estimator=agent.config.kl_estimator,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    curve = TrainingCurve(ctx, name, agent, budget=s.token_budget)
    curve.start()
    history = agent.train(env, total_tokens=s.token_budget, callback=curve)
    curve.finish()
    ctx.record(
        name,
        history=history,
        kl_coef=agent.config.kl_coef,
        kl_in=agent.config.kl_in,
        sampled_tokens=agent.sampled_tokens,
        token_budget=s.token_budget,
        gradient_steps=agent.optimizer_steps,
    )
    return agent


@register_agent("grpo", description="GRPO (Shao et al. 2024): group mean/std advantages, KL in the reward")
def grpo_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "grpo", GRPOAgent, GRPOConfig)


@register_agent(
    "grpo-kl-loss",
    description="GRPO with the KL in the loss (k3, as DeepSeekMath), env beta 0",
    default=False,
)
def grpo_kl_loss_agent(ctx: BenchmarkContext) -> PGAgent:
    # DeepSeekMath's k3 in the loss on purpose (its gradient is that of KL(pi_ref || pi), see llm_env.kl): the
    # row measures that recipe, so its KLGradientBiasWarning is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KLGradientBiasWarning)
        return pg_run(ctx, "grpo-kl-loss", GRPOAgent, GRPOConfig, kl_in="loss", kl_estimator="k3")


@register_agent("rloo", description="RLOO (Ahmadian et al. 2024): leave-one-out baseline, sequence REINFORCE")
def rloo_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "rloo", RLOOAgent, RLOOConfig)


@register_agent(
    "dr-grpo", description="Dr. GRPO (Liu et al. 2025): no std division, constant length norm", default=False
)
def dr_grpo_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "dr-grpo", DrGRPOAgent, DrGRPOConfig)


@register_agent(
    "dapo",
    description="DAPO (Yu et al. 2025): clip-higher, token-level loss, dynamic sampling, overlong shaping",
    default=False,
)
def dapo_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "dapo", DAPOAgent, DAPOConfig)


@register_agent(
    "gspo", description="GSPO (Zheng et al. 2025): clipped sequence-level ratio (3e-4, 4e-4)", default=False
)
def gspo_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "gspo", GSPOAgent, GSPOConfig)


@register_agent(
    "reinforce-pp",
    description="REINFORCE++ (Hu 2025): per-token KL returns, normalised over the batch",
    default=False,
)
def reinforce_pp_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "reinforce-pp", ReinforcePPAgent, ReinforcePPConfig, grouped=False)


@register_agent(
    "remax", description="ReMax (Li et al. 2023): the greedy response's reward as baseline", default=False
)
def remax_agent(ctx: BenchmarkContext) -> PGAgent:
    return pg_run(ctx, "remax", ReMaxAgent, ReMaxConfig, grouped=False)


@register_agent(
    "rejection-sampling", description="Llama 2 rejection sampling: best-of-k + SFT, pooled rounds"
)
def rejection_sampling_agent(ctx: BenchmarkContext) -> RejectionSamplingAgent:
    s = ctx.settings
    config = RejectionSamplingConfig(
        k=s.rs_k,
        rounds=s.rs_rounds,
        prompts_per_round=s.rs_prompts,
        kl_groups=2,
        kl_prompts=32,
        sft=SFTConfig(learning_rate=s.sft_lr / 3, epochs=1, batch_size=32, progress=False),
        seed=s.seed,
        progress=ctx.progress,
    )
    agent = RejectionSamplingAgent(ctx.load_policy(), ctx.tokenizer, config)
    env = ctx.make_env(autoreset_mode=AutoresetMode.DISABLED)
    history = agent.train(env)
    ctx.record(
        "rejection-sampling",
        history=history,
        sampled_tokens=agent.sampled_tokens,
        gradient_steps=agent.optimizer_steps,
    )
    return agent


@register_agent(
    "rs-then-ppo",
    description="Llama 2's iterative recipe: rejection-sampling rounds, then PPO",
    default=False,
)
def iterative_agent(ctx: BenchmarkContext) -> TokenSampler:
    s = ctx.settings
    config = IterativeConfig(
        rs_rounds=s.iterative_rs_rounds,
        ppo_updates=s.iterative_ppo_updates,
        reference="sft",
        num_envs=s.num_envs,
        rejection=RejectionSamplingConfig(
            k=s.rs_k,
            prompts_per_round=s.rs_prompts,
            kl_groups=1,
            sft=SFTConfig(learning_rate=s.sft_lr / 3, epochs=1, batch_size=32, progress=False),
            seed=s.seed,
            progress=ctx.progress,
        ),
        ppo=_ppo_config(ctx, s.ppo_kl_coef, "rs-then-ppo"),
    )
    result = iterative_rlhf(
        ctx.load_policy(),
        ctx.tokenizer,
        ctx.artifacts.train_prompts,
        ctx.reward,
        config,
        device=ctx.device,
        max_new_tokens=s.max_new_tokens,
        **ctx.artifacts.env_options,
    )
    stages = [h[-1] for h in (result.rejection_history, result.ppo_history) if h]  # cumulative counters
    ctx.record(
        "rs-then-ppo",
        rejection_history=result.rejection_history,
        history=result.ppo_history,
        sampled_tokens=sum(int(stage["sampled_tokens"]) for stage in stages),
        gradient_steps=sum(int(stage["optimizer_steps"]) for stage in stages),
    )
    return TokenSampler(result.policy.eval(), seed=s.seed)


@register_agent("sb3-ppo", description="unmodified Stable-Baselines3 PPO on TextGenEnv (LMActorCriticPolicy)")
def sb3_agent(ctx: BenchmarkContext) -> SB3Agent:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    s = ctx.settings
    beta = s.ppo_kl_coef
    history: list[float] = []

    def reward(prompts: list[str], responses: list[str]) -> Any:
        scores = ctx.reward(prompts, responses)
        history.extend(torch.as_tensor(scores).float().cpu().tolist())
        return scores

    envs = make_vec_env(
        lambda: TextGenEnv(
            prompts=ctx.artifacts.train_prompts,
            tokenizer=ctx.tokenizer,
            reward=reward,
            reference=ctx.reference,
            kl_coef=beta,
            max_new_tokens=s.max_new_tokens,
            device=ctx.device,
            **ctx.artifacts.env_options,  # a multi-turn task's responder
        ),
        n_envs=4,
        seed=s.seed,
    )
    n_steps = 128
    model = PPO(
        LMActorCriticPolicy,
        envs,
        policy_kwargs={"model": ctx.load_policy()},
        n_steps=n_steps,
        batch_size=128,
        n_epochs=4,
        learning_rate=0.3 * s.ppo_lr,  # SB3 normalises advantages and adds the entropy term unnormalised
        gamma=1.0,
        ent_coef=beta,  # the entropy half of the KL penalty; the env pays beta * log pi_ref per token
        seed=s.seed,
        device=ctx.device,
        verbose=0,
    )
    model.learn(total_timesteps=max(s.sb3_timesteps, n_steps * 4), progress_bar=False)
    # Every environment step samples one token; SB3's PPO takes n_epochs passes of minibatches over each
    # rollout of n_steps x n_envs steps (no early stop: target_kl is None).
    rollout = n_steps * envs.num_envs
    iterations = model.num_timesteps // rollout
    ctx.record(
        "sb3-ppo",
        score_history=history,
        sampled_tokens=int(model.num_timesteps),
        gradient_steps=iterations * model.n_epochs * -(-rollout // model.batch_size),
    )
    return SB3Agent(model, seed=s.seed)


@register_agent(
    "dpo",
    description="offline DPO (Rafailov et al. 2023, beta from the settings) on the task's preference data: "
    "the comparisons of SFT samples the reward models learn from, or that the checker ranks (no sampling, "
    "no reward model)",
)
def dpo_agent(ctx: BenchmarkContext) -> DPOAgent:
    s = ctx.settings
    files = ctx.artifacts.preference_files
    if not files:
        raise ValueError(
            "the dpo row trains on a task's preference data, which your own models do not come with: "
            "choose the other rows with --agents"
        )
    config = DPOConfig(
        beta=s.dpo_beta,
        learning_rate=s.dpo_lr,
        epochs=s.dpo_epochs,
        batch_size=s.dpo_batch_size,
        seed=s.seed,
        log_dir=str(ctx.out_dir / "tensorboard" / "dpo"),
        progress=ctx.progress,
    )
    agent = DPOAgent(ctx.load_policy(), ctx.tokenizer, config, reference=ctx.reference)
    pairs = load_preference_pairs(*files)
    history = agent.train(pairs)
    ctx.record(
        "dpo",
        data=[f.name for f in files],
        pairs=len(pairs),
        epochs=s.dpo_epochs,
        history=history,
        sampled_tokens=0,  # offline: the preference data was sampled from the SFT policy when the task was built
        gradient_steps=agent.step,
    )
    return agent


@register_agent(
    "online-dpo",
    description="online DPO (Guo et al. 2024, beta from the settings): two samples per prompt through the "
    "environment, the proxy reward model picks chosen and rejected; the same sampled-token budget as the "
    "policy-gradient agents",
)
def online_dpo_agent(ctx: BenchmarkContext) -> OnlineDPOAgent:
    s = ctx.settings
    config = OnlineDPOConfig(
        beta=s.dpo_beta,
        learning_rate=s.online_dpo_lr,
        prompts_per_update=s.online_dpo_prompts,
        minibatch_size=min(s.online_dpo_minibatch, s.online_dpo_prompts),
        seed=s.seed,
        log_dir=str(ctx.out_dir / "tensorboard" / "online-dpo"),
        progress=ctx.progress,
    )
    agent = OnlineDPOAgent(ctx.load_policy(), ctx.tokenizer, config, reference=ctx.reference)
    env = _train_env(ctx, kl_coef=0.0, reference="sft", autoreset_mode=AutoresetMode.DISABLED)
    curve = TrainingCurve(ctx, "online-dpo", agent, budget=s.token_budget)
    curve.start()
    history = agent.train(env, total_tokens=s.token_budget, callback=curve)
    curve.finish()
    ctx.record(
        "online-dpo",
        history=history,
        sampled_tokens=agent.sampled_tokens,
        token_budget=s.token_budget,
        ties=agent.ties,
        gradient_steps=agent.optimizer_steps,
    )
    return agent
