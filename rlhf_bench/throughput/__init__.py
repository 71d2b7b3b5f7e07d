"""``llm-env bench-throughput``: does the Gym API cost anything? Rollout throughput, side by side.

The promise of this project is that stepping :class:`~llm_env.TextGenVectorEnv` token by token is not
slower than the monolithic rollout RLHF libraries use. This benchmark measures it in one process, on the
same randomly initialised models (built from configs, nothing is downloaded), batch and lengths:

======================  ====================================================================================
``generate``            (a) the policy's Hugging Face ``generate`` alone (sampling, no log-probabilities).
``monolithic``          (b) the TRL-style rollout: ``generate`` (recording the sampled tokens'
                        log-probabilities), then one reference forward over the whole batch for the
                        reference log-probabilities of the generated tokens, the per-token KL reward, and
                        one reward-model forward.
``monolithic-greedy``   (b0) as (b) with greedy decoding: generate without sampling, an upper bound of the
                        baseline's speed (Hugging Face samples with ``torch.multinomial``, which costs ~12
                        ms per step on 2 CPU cores at V = 50257, more than the environment agents' sampler).
``env``                 (c) :class:`agents.PPOAgent` (full fine-tune, separate frozen reference copy)
                        through ``TextGenVectorEnv`` with :func:`agents.collect_episodes`: dense per-token
                        KL reward computed by the environment, reward model scoring the finished responses.
``monolithic-lora``     (b') as (b) with a LoRA policy and its base (adapter disabled) as the reference.
``env-lora``            (c') as (c) with a LoRA policy and ``AdapterDisabled(policy)`` as the reference.
``env-fused``           (c'') as (c') with ``AdapterDisabled(policy, fuse=True)``: policy and reference rows
                        decoded in one forward pass (see :class:`llm_env.fused.FusedDecoder`).
``env-graphs``          (c, CUDA only) as (c) with ``cuda_graphs``: the agent's and the reference's decode
                        steps replayed as CUDA graphs (see :class:`llm_env.IncrementalLM`).
``env-fused-graphs``    (c'', CUDA only) as (c'') with the fused decode step replayed as a CUDA graph.
``no-cache``            (d) RL4LMs-style: every step re-encodes the whole sequence with the policy and the
                        reference (no KV cache; only the last position's logits are computed).
``floor``               (f) the unavoidable work alone: per token one batched forward of the policy and one
                        of the reference, each with its KV cache, sampling, and the reward model once at the
                        end; no environment, no agent, no text (:class:`~.baselines.Floor`). Every variant
                        is also reported as a ratio of it (``ratio_to_floor``).
``floor-graphs``        (f, CUDA only) as (f) with the decode steps replayed as CUDA graphs.
``trl-grpo``            TRL's GRPO rollout built from TRL's API (:mod:`~.peers`): ``generate`` under GRPO's
                        generation config, the reference log-probabilities through TRL's fused LM head, the
                        reward model on the decoded and re-tokenized texts. Optional, run when named.
``torchrl``             TorchRL's LLM rollout (:mod:`~.peers`): ``ChatEnv`` in tokens mode, a generating
                        ``TransformersWrapper``, ``KLRewardTransform`` with the reference and a
                        ``ModuleTransform`` of ``HFRewardModelWrapper``. Optional, run when named.
``ppo-update``          PPO update throughput (tokens per second per optimisation epoch) of the full and the
                        LoRA agent on the episodes of one rollout.
``lora-memory``         peak memory of a LoRA policy alone, with its adapter-disabled reference, and with a
                        separate reference copy (one rollout and one PPO update each).
======================  ====================================================================================

All variants generate exactly ``batch_size * new_tokens`` tokens: ``generate`` gets
``min_new_tokens=max_new_tokens`` and the environments ``stop_token_ids=[]`` (no stop token), so the
counts and the work are identical; ``tests/rlhf_bench/test_throughput_peers.py`` checks that the floor,
the environment, the baselines and the peers return the same tokens, reference log-probabilities and
scores. Throughput is generated tokens per second, the median over ``--repeats`` timed runs after
``--warmup`` untimed runs; the repetitions of all variants are interleaved (round-robin) so that a change of
machine load affects them alike, and the ratios are computed from medians measured in the same process.

The code splits at its seams: :mod:`~rlhf_bench.throughput.settings` (the options),
:mod:`~rlhf_bench.throughput.models` (random-weight models and prompts),
:mod:`~rlhf_bench.throughput.baselines` (generate, the monolithic pipeline, no cache, the floor),
:mod:`~rlhf_bench.throughput.peers` (TRL's and TorchRL's rollouts), :mod:`~rlhf_bench.throughput.variants`
(the registry of rollout variants and the reported ratios), :mod:`~rlhf_bench.throughput.measure` (memory,
timing, the run), :mod:`~rlhf_bench.throughput.report`, :mod:`~rlhf_bench.throughput.cli` and
:mod:`~rlhf_bench.throughput.scaling` (the ratios to the floor across batch sizes and lengths). ``cpu.sh``
and ``gpu.sh`` in this directory run the configurations of ``docs/results/throughput.md`` and ``check_targets.py`` checks
the targets; the recorded reports are in ``results/``.

Usage::

    llm-env bench-throughput --shape gpt2-small --batch-size 16 --prompt-length 32 --new-tokens 48 \\
        --json results.json
"""

from rlhf_bench.throughput.measure import run_throughput
from rlhf_bench.throughput.models import SHAPES, ModelShape
from rlhf_bench.throughput.report import format_report
from rlhf_bench.throughput.settings import ThroughputSettings
from rlhf_bench.throughput.variants import CUDA_ONLY, OPTIONAL, RATIOS, ROLLOUTS, VARIANTS, rollout_variant

__all__ = [
    "CUDA_ONLY",
    "OPTIONAL",
    "RATIOS",
    "ROLLOUTS",
    "SHAPES",
    "VARIANTS",
    "ModelShape",
    "ThroughputSettings",
    "format_report",
    "rollout_variant",
    "run_throughput",
]
