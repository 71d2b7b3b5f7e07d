"""Budgets of the benchmark: ``quick`` (the default, minutes on 2 CPU cores) and ``full``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from rlhf_bench.leaderboard.task import TASK_VERSION

__all__ = ["BenchmarkSettings"]


@dataclass(frozen=True)
class BenchmarkSettings:
    """Every size and budget of a benchmark run. Fields marked *artifact* define the cached task."""

    seed: int = 0
    """Seeds the task, the SFT policy and the reward models (artifact), and the first seed of the agents."""
    seeds: int = 1
    """Independent repetitions of the whole agent sweep, with seeds ``seed, seed + 1, ...`` for the agents'
    training and for evaluation sampling; the SFT policy, the reward models and the prompts are built once
    from ``seed`` and shared. With one seed the leaderboard's intervals cover the evaluation prompts only;
    with more, training randomness too (a hierarchical bootstrap, :mod:`rlhf_bench.leaderboard.stats`)."""
    bootstrap_resamples: int = 2000
    """Percentile-bootstrap replicates behind every 95% interval (seeded with ``seed``)."""
    # ---------------------------------------------------------------- the SFT policy (artifacts)
    policy_layers: int = 4
    """GPT-2 blocks of the policy (artifact)."""
    policy_width: int = 128
    """Hidden size of the policy (artifact)."""
    pretrain_texts: int = 6000
    """Generated reviews for language-model pretraining (artifact)."""
    sft_pairs: int = 6000
    """(prompt, review) pairs for supervised fine-tuning (artifact)."""
    sft_lr: float = 3e-3
    """Learning rate of pretraining and SFT (artifact)."""
    # ------------------------------------------------------------- the reward models (artifacts)
    rm_prompts: int = 1600
    """Prompts whose SFT samples are compared for the helpfulness reward model (artifact)."""
    pairs_per_prompt: int = 2
    """Compared pairs per prompt (artifact)."""
    safety_rm_prompts: int = 1600
    """``[kids]`` prompts compared for the safety reward model (artifact). As many as the helpfulness
    model's: its labels (safety first, half the helpfulness gap as tie-break) put most pairs in the two
    lowest preference levels, where annotator noise flips the most labels, so it needs at least as much
    data; with half as many comparisons it reached only 0.69-0.70 held-out accuracy on seeds 0-2."""
    annotator_temperature: float = 0.5
    """Noise of the simulated annotators, Bradley-Terry temperature on the gold scale (artifact)."""
    rm_epochs: int = 2
    """Reward-model training epochs (artifact). With ``rm_lr`` 3e-4 training sat on a plateau near chance
    for about one epoch and needed 4 epochs to flatten out (2 gave 0.64 to 0.79 held-out helpfulness
    accuracy on seeds 0-2); at 1e-3 two epochs reach the same accuracy in half the time (1,200 held-out
    pairs, seeds 0/1/2: helpfulness 0.79/0.81/0.82, safety 0.81/0.83/0.79; 3 epochs at 6e-4:
    0.79 on seed 0), which keeps the quick run, model building included, within 10 minutes."""
    rm_lr: float = 1e-3
    """Reward-model learning rate (artifact); 1e-4 never leaves the initial plateau in 3 epochs."""
    rm_eval_prompts: int = 300
    """Held-out prompts, two pairs each, labelled by the noiseless gold to measure accuracy (artifact);
    the safety model is measured on the same prompts tagged ``[kids]``."""
    # ------------------------------------------------------------------------------------ RL runs
    train_prompts: int = 512
    """Prompts the agents train on."""
    eval_prompts: int = 128
    """Held-out prompts every agent is evaluated on."""
    eval_samples: int = 2
    """Responses per evaluation prompt."""
    max_new_tokens: int = 32
    """Response budget in tokens."""
    num_envs: int = 32
    """Sub-environments stepped in parallel."""
    token_budget: int = 12_000
    """Sampled response tokens per policy-optimisation run (PPO, its sweep, the critic-free agents and online
    DPO): each stops after the update at which its rollouts reach it. Every generated token counts, ReMax's
    greedy baselines and DAPO's dropped groups included; each row records what it actually sampled. 12,000
    is about 10 updates of 64 episodes (about 19 tokens each on the quick task). Measured on the quick task
    (seed 0), PPO, GRPO and RLOO reach most of their gold gain by 12,000 tokens (PPO's gold 0.85 -> 1.72 at
    6,600 -> 2.21 at 12,600 tokens); at 18,000 they gained under 0.1 more, within the intervals, while PPO's
    KL doubled, and the default run, model building included, no longer fitted in 10 minutes. The offline
    DPO row samples nothing and states its data instead."""
    ppo_episodes: int = 64
    """Episodes per update of every policy-optimisation agent (PPO's rollout; prompts x group size)."""
    update_epochs: int = 4
    """Passes over each rollout of PPO (its sweep and the iterative pipeline's PPO stage) and of every
    critic-free agent (``ppo_epochs`` / ``epochs``)."""
    minibatches: int = 4
    """Minibatches (optimizer steps) per pass, of ``ppo_episodes / minibatches`` episodes each. Four passes of
    four minibatches of 16 reuse a rollout of 64 sixteen times, the usual PPO recipe for long responses; on a
    verifiable task with 5-token answers such a minibatch holds two prompts' groups, and the steps mostly
    follow their noise (see the sorting task's settings, :mod:`rlhf_bench.leaderboard.sorting`)."""
    ppo_lr: float = 1e-4
    """Learning rate of PPO (also of the sweep, Stable-Baselines3 and the critic-free agents)."""
    ppo_kl_coef: float = 0.1
    """beta of the main PPO run and of every critic-free agent."""
    group_size: int = 8
    """Responses per prompt of GRPO, Dr. GRPO, DAPO, GSPO and RLOO (``ppo_episodes / group_size`` prompts
    per update); REINFORCE++ and ReMax sample one response for each of ``ppo_episodes`` prompts."""
    sweep_kl_coefs: tuple[float, ...] = (0.002,)
    """Extra PPO runs (for the over-optimisation curves); the smallest shows proxy up, gold down."""
    curve_points: int = 3
    """Evaluations along the training of every agent with a token budget (PPO, its sweep, the critic-free
    agents, online DPO), besides the one before training: after the update that crosses each of ``1/n, 2/n,
    ..., 1`` of the budget. They give the sample-efficiency and KL-frontier curves and the Gao et al. fits."""
    curve_prompts: int = 64
    """Held-out prompts (one draw each) of every evaluation along training."""
    bon_samples: int = 32
    """Samples per evaluation prompt for the best-of-k curve (k up to half of it)."""
    pass_k_samples: int = 16
    """Samples per held-out prompt behind pass@k on a verifiable task (k = 1, 2, 4, ... up to it; the unbiased
    estimator of Chen et al. 2021, :mod:`rlhf_bench.leaderboard.passk`), for every evaluated agent, on every
    held-out prompt. On the quick sorting task 128 x 16 samples took 2.4 to 5.4 s per agent (SB3 PPO, which
    re-reads the whole sequence at every token: 28 s), 60 s for the default run, on 2 busy CPU cores."""
    rs_rounds: int = 2
    """Rejection-sampling rounds."""
    rs_k: int = 8
    """Samples per prompt in rejection sampling."""
    rs_prompts: int = 128
    """Prompts per rejection-sampling round (x ``rs_k`` samples: 2,048 responses over the two rounds)."""
    iterative_rs_rounds: int = 1
    """Rejection-sampling rounds of the iterative (Llama 2) pipeline before its PPO stage."""
    iterative_ppo_updates: int = 15
    """PPO updates of the iterative pipeline."""
    sb3_timesteps: int = 2048
    """Environment steps of the Stable-Baselines3 PPO run."""
    dpo_beta: float = 0.1
    """beta of the offline and online DPO rows (Rafailov et al. 2023; Guo et al. 2024)."""
    dpo_lr: float = 3e-4
    """Learning rate of offline DPO."""
    dpo_epochs: int = 1
    """Passes of offline DPO over the preference data."""
    dpo_batch_size: int = 32
    """Preference pairs per offline DPO step."""
    online_dpo_lr: float = 2e-4
    """Learning rate of online DPO."""
    online_dpo_prompts: int = 32
    """Prompts per online DPO update, each sampled twice (as many episodes as a PPO update)."""
    online_dpo_minibatch: int = 8
    """Pairs per online DPO optimizer step."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1 (repetitions of the agent sweep), got {self.seeds}")
        if self.bootstrap_resamples < 100:
            raise ValueError(
                f"bootstrap_resamples must be >= 100 for a 95% percentile interval, got {self.bootstrap_resamples}"
            )
        if self.curve_points < 1 or self.curve_prompts < 1:
            raise ValueError(
                f"curve_points and curve_prompts must be >= 1, got {self.curve_points} and {self.curve_prompts}"
            )
        if self.update_epochs < 1 or self.minibatches < 1 or self.ppo_episodes % self.minibatches:
            raise ValueError(
                f"update_epochs and minibatches must be >= 1 and minibatches must divide ppo_episodes, got "
                f"{self.update_epochs}, {self.minibatches} and {self.ppo_episodes}"
            )
        if self.token_budget < 1 or self.eval_prompts < 1 or self.eval_samples < 1:
            raise ValueError(
                f"token_budget, eval_prompts and eval_samples must be >= 1, got {self.token_budget}, "
                f"{self.eval_prompts} and {self.eval_samples}"
            )

    def run_seeds(self) -> list[int]:
        """The agents' seeds: ``seed, seed + 1, ..., seed + seeds - 1``."""
        return [self.seed + i for i in range(self.seeds)]

    @classmethod
    def quick(cls, **overrides: Any) -> BenchmarkSettings:
        """The default: the whole benchmark in under 10 minutes on 2 CPU cores."""
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides: Any) -> BenchmarkSettings:
        """The quick task at the statistics a paper reports, in under an hour on 2 CPU cores (measured: 25 min
        building the models, 28 min for the three agent sweeps): three seeds, twice
        the SFT and comparison data, three times the sampled-token budget (where over-optimisation shows), a
        three-point beta sweep and four draws on each of 256 held-out prompts. The policy keeps the quick
        run's 4 x 128 shape and the reward models its proven recipe (2 epochs at 1e-3), so the two
        leaderboards differ in budget and precision, not in the task. For bigger models pass overrides (e.g.
        ``policy_layers=6, policy_width=192``) or bring your own (``llm-env benchmark --policy ...``)."""
        values = dict(
            pretrain_texts=12000,
            sft_pairs=12000,
            rm_prompts=3200,
            safety_rm_prompts=3200,
            train_prompts=2048,
            eval_prompts=256,
            eval_samples=4,
            token_budget=36_000,
            sweep_kl_coefs=(0.002, 0.02),
            seeds=3,
            curve_points=6,
            curve_prompts=128,
            bon_samples=64,
            rs_prompts=256,
            iterative_ppo_updates=30,
            sb3_timesteps=6144,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides: Any) -> BenchmarkSettings:
        """A reduced setting for the test suite: every stage runs, on toy sizes."""
        values = dict(
            policy_layers=2,
            policy_width=32,
            pretrain_texts=400,
            sft_pairs=400,
            rm_prompts=300,
            safety_rm_prompts=300,
            rm_epochs=4,
            rm_lr=2e-3,  # the 2 x 32 policy as backbone: 3e-4 stays on the initial plateau
            rm_eval_prompts=150,
            train_prompts=32,
            eval_prompts=16,
            eval_samples=1,
            max_new_tokens=12,
            num_envs=8,
            token_budget=120,
            ppo_episodes=8,
            group_size=4,
            sweep_kl_coefs=(0.002,),
            bootstrap_resamples=500,
            curve_points=2,
            curve_prompts=8,
            bon_samples=4,
            pass_k_samples=4,
            rs_rounds=1,
            rs_k=2,
            rs_prompts=8,
            iterative_rs_rounds=1,
            iterative_ppo_updates=1,
            sb3_timesteps=64,
            dpo_batch_size=16,
            online_dpo_prompts=4,
            online_dpo_minibatch=4,
        )
        values.update(overrides)
        return cls(**values)

    ARTIFACT_FIELDS = (
        "seed",
        "policy_layers",
        "policy_width",
        "pretrain_texts",
        "sft_pairs",
        "sft_lr",
        "rm_prompts",
        "pairs_per_prompt",
        "safety_rm_prompts",
        "annotator_temperature",
        "rm_epochs",
        "rm_lr",
        "rm_eval_prompts",
    )

    def artifact_key(self, task_version: int = TASK_VERSION) -> str:
        """A short hash of the fields that define a task's cached artifacts, and of the task's version (by
        default the review task's; :func:`~rlhf_bench.leaderboard.tasks.task_directory` passes each task's)."""
        fields = {name: getattr(self, name) for name in self.ARTIFACT_FIELDS}
        fields["task_version"] = task_version
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """Every budget as a plain dictionary (written into ``leaderboard.json``)."""
        return dataclasses.asdict(self)
