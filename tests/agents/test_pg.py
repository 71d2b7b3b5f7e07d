"""The critic-free core: loss aggregations and clip-higher by hand, KL in the reward or the loss, LoRA, the
token budget, configuration errors, and exact resume for every algorithm."""

import math
import warnings

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.dapo import DAPOAgent, DAPOConfig
from agents.dr_grpo import DrGRPOAgent, DrGRPOConfig
from agents.grpo import GRPOAgent, GRPOConfig
from agents.gspo import GSPOAgent, GSPOConfig
from agents.losses import aggregate_loss, clipped_surrogate
from agents.pg import PGConfig, clip_loss, group_view, per_token
from agents.policy import SequenceBatch, response_forward
from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce_pp import ReinforcePPAgent, ReinforcePPConfig
from agents.remax import ReMaxAgent, ReMaxConfig
from agents.rloo import RLOOAgent, RLOOConfig
from agents.rollout import collect_episodes
from llm_env.kl import KLGradientBiasWarning, kl_penalty

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])  # padding positions hold garbage on purpose
MASK = torch.tensor([[True, True, True], [True, False, False]])

ALGORITHMS = {
    "grpo": (GRPOAgent, GRPOConfig, {}),
    "dr-grpo": (DrGRPOAgent, DrGRPOConfig, {}),
    "dapo": (DAPOAgent, DAPOConfig, {}),
    "gspo": (GSPOAgent, GSPOConfig, {"clip_range": 0.2, "clip_range_high": 0.2}),
    "rloo": (RLOOAgent, RLOOConfig, {}),
    "reinforce-pp": (ReinforcePPAgent, ReinforcePPConfig, {"group_size": 1, "prompts_per_update": 8}),
    "remax": (ReMaxAgent, ReMaxConfig, {"group_size": 1, "prompts_per_update": 8}),
}
SMALL = dict(prompts_per_update=2, group_size=4, learning_rate=1e-2, kl_coef=0.05, progress=False, seed=3)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),
        ("seq-mean-token-sum", (6 + 4) / 2),
        ("seq-mean-token-sum-norm", (6 + 4) / (2 * 5)),
    ],
)
def test_loss_aggregations_by_hand(mode, expected):
    assert float(aggregate_loss(VALUES, MASK, mode, max_length=5)) == pytest.approx(expected)
    # Two micro-batches given the minibatch's totals add up to the minibatch's loss exactly.
    totals = dict(num_sequences=2, num_tokens=4, max_length=5)
    parts = [aggregate_loss(VALUES[i : i + 1], MASK[i : i + 1], mode, **totals) for i in range(2)]
    assert float(sum(parts)) == pytest.approx(expected)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="must be one of"):
        aggregate_loss(VALUES, MASK, "sum")


def test_clip_higher_by_hand():
    # ratios 1.5, 1.25 with A = +1 and 0.5 with A = -1
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[1.5, 1.25, 0.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    symmetric, ratio, clipped = clipped_surrogate(logprobs, old, advantages, clip_low=0.2)
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 1.25, 0.5]]))
    torch.testing.assert_close(symmetric, torch.tensor([[-1.2, -1.2, 0.8]]))
    assert clipped.tolist() == [[True, True, True]]
    higher, _, clipped = clipped_surrogate(logprobs, old, advantages, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(higher, torch.tensor([[-1.28, -1.25, 0.8]]))  # 1.25 < 1.28: not clipped
    assert clipped.tolist() == [[True, False, True]]


def test_clip_loss_is_reinforce_at_ratio_one():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]], requires_grad=True)
    advantages = per_token(torch.tensor([2.0, -1.0]), MASK)
    assert advantages.tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    loss, stats = clip_loss(logprobs, logprobs.detach(), advantages, MASK, "seq-mean-token-sum", clip_low=0.2)
    loss.backward()
    # d/dlogp of -1/N sum_i A_i sum_t logp_it: -A_i / N on every real token
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, -1.0, -1.0], [0.5, 0.0, 0.0]]))
    assert float(stats["ratio"]) == 1.0 and float(stats["clipfrac"]) == 0.0


def test_group_view_needs_whole_groups():
    assert group_view(torch.arange(6.0), 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="whole groups of 4"):
        group_view(torch.arange(6.0), 4)


def _agent(name, policy, tokenizer, reference=None, **overrides):
    agent_class, config_class, defaults = ALGORITHMS[name]
    config = config_class(**{**SMALL, **defaults, **overrides})
    return agent_class(policy, tokenizer, config, reference=reference)


def test_kl_in_the_reward_is_the_environments_penalty(
    fresh_policy, gpt2, tokenizer, task_prompts, task_reward
):
    agent = _agent("grpo", fresh_policy(), tokenizer, gpt2, kl_in="reward", kl_estimator="k1", kl_coef=0.5)
    env = agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=4)
    assert env.kl_coef == 0.5 and env.config.kl_estimator == "k1"
    assert env.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    trajectories = agent.rollout(env)
    rewards = agent.sequence_rewards(trajectories).double().numpy()
    np.testing.assert_allclose(rewards, trajectories.scores - 0.5 * trajectories.kl, atol=1e-4)
    assert np.abs(trajectories.kl).min() > 0.01  # the reference is another model: the KL is not 0
    with pytest.warns(KLGradientBiasWarning), pytest.raises(ValueError, match="pays the KL with 'k1'"):
        _agent("grpo", fresh_policy(), tokenizer, kl_estimator="k3").train(env, 1)
    next_step = agent.make_env(task_prompts, task_reward, autoreset_mode=AutoresetMode.NEXT_STEP)
    with pytest.raises(ValueError, match="DISABLED"):
        agent.train(next_step, 1)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_in_the_loss_pulls_the_policy_to_the_reference(estimator, fresh_policy, tokenizer, task_prompts):
    """With a constant reward the advantages are 0: only the KL term of the loss moves the policy."""
    reference = fresh_policy()
    policy = fresh_policy()
    with torch.no_grad():
        policy.lm_head.weight.mul_(8)  # a much sharper policy than its reference: a KL of several nats
    with warnings.catch_warnings():  # k3 in the loss: DeepSeekMath's choice, warned about (test_kl_gradients)
        warnings.simplefilter("ignore", KLGradientBiasWarning)
        config = GRPOConfig(
            **{**SMALL, "kl_coef": 1.0, "learning_rate": 3e-3}, kl_in="loss", kl_estimator=estimator
        )
    agent = GRPOAgent(policy, tokenizer, config, reference=reference)
    env = agent.make_env(task_prompts, lambda p, r: [0.0] * len(r), num_envs=8, max_new_tokens=4)
    assert env.kl_coef == 0.0  # the environment does not pay it...
    batch = agent.rollout(env)
    np.testing.assert_allclose(agent.sequence_rewards(batch).numpy(), batch.scores)  # ...so R = score
    # The loss term is beta * mean_i mean_t k(logp - ref_logp), with the untempered reference.
    sequences = SequenceBatch.build(
        batch.prompt_ids, batch.response_list(), pad_id=agent.pad_id, device="cpu"
    )
    with torch.no_grad():
        logp = response_forward(agent.policy, sequences).logprobs
        ref = response_forward(reference, sequences).logprobs
    expected = aggregate_loss(
        kl_penalty(logp, ref, estimator), sequences.response_mask, "seq-mean-token-mean"
    )
    first = agent.learn(batch)  # one epoch, one minibatch: the only step sees exactly `expected`
    assert first["kl_loss"] == pytest.approx(float(expected), rel=1e-5) and first["advantage_std"] == 0
    history = agent.train(env, 8)
    assert history[-1]["kl"] < 0.3 * history[0]["kl"], [h["kl"] for h in history]


def test_lora_reference_is_the_adapter_disabled_base(fresh_policy, tokenizer, task_prompts, task_reward):
    base = fresh_policy()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    agent = _agent("grpo", base, tokenizer, lora_rank=4, kl_in="loss", learning_rate=5e-2)
    env = agent.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=4)
    assert env.fused_policy is agent.policy  # one forward pass decodes policy and reference
    batch = agent.rollout(env)
    sequences = SequenceBatch.build(
        batch.prompt_ids, batch.response_list(), pad_id=agent.pad_id, device="cpu"
    )
    with torch.no_grad():  # LoRA starts as the identity: the reference equals the policy
        torch.testing.assert_close(
            agent._reference_logprobs(sequences), response_forward(agent.policy, sequences).logprobs
        )
    agent.train(env, 3)
    with torch.no_grad():
        moved = agent._reference_logprobs(sequences) - response_forward(agent.policy, sequences).logprobs
    assert moved.abs().max() > 1e-3  # the adapters learned
    merged = agent.policy.get_base_model().state_dict()
    for name, value in before.items():  # the base weights never change
        key = next(k for k in merged if k.replace("base_layer.", "") == name)
        torch.testing.assert_close(merged[key], value)


def test_token_budget_stops_every_policy_optimiser(fresh_policy, tokenizer, task_prompts, task_reward):
    agent = _agent("rloo", fresh_policy(), tokenizer)
    env = agent.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=5)
    history = agent.train(env, total_tokens=60)
    per_update = [
        b["sampled_tokens"] - a for a, b in zip([0] + [h["sampled_tokens"] for h in history], history)
    ]
    assert history[-1]["sampled_tokens"] >= 60 > history[-1]["sampled_tokens"] - per_update[-1]
    assert agent.sampled_tokens == history[-1]["sampled_tokens"]
    assert all(0 < n <= 8 * 5 for n in per_update)  # 8 episodes of at most 5 tokens per update
    more = agent.train(env, 100, total_tokens=100)  # the budget is cumulative: continues to 100
    assert more[-1]["sampled_tokens"] >= 100 and agent.update == len(history) + len(more)

    ppo = PPOAgent(
        fresh_policy(), tokenizer, PPOConfig(episodes_per_update=8, minibatch_size=4, progress=False)
    )
    ppo_env = ppo.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=5)
    ppo_history = ppo.train(ppo_env, 100, total_tokens=60)
    assert ppo.sampled_tokens == ppo_history[-1]["sampled_tokens"] >= 60
    assert ppo.update == len(ppo_history) < 100
    with pytest.raises(ValueError, match="total_updates, total_tokens"):
        agent.train(env)
    cosine = _agent("rloo", fresh_policy(), tokenizer, lr_schedule="cosine")
    with pytest.raises(ValueError, match="decays over total_updates"):
        cosine.train(env, total_tokens=100)


@pytest.mark.parametrize(
    ("config_class", "kwargs", "match"),
    [
        (PGConfig, dict(prompts_per_update=3, group_size=2, minibatch_size=4), "must divide the episodes"),
        (PGConfig, dict(minibatch_size=8, gradient_accumulation_steps=3), "must divide the minibatch"),
        (PGConfig, dict(learning_rate=0), "learning_rate"),
        (PGConfig, dict(kl_in="both"), "kl_in"),
        (PGConfig, dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (PGConfig, dict(kl_coef=-1.0), "kl_coef"),
        (PGConfig, dict(clip_range=1.5), "clip_range"),
        (GRPOConfig, dict(group_size=1), "group_size must be >= 2"),
        (DrGRPOConfig, dict(group_size=1), "group_size must be >= 2"),
        (DAPOConfig, dict(group_size=1), "group_size must be >= 2"),
        (GSPOConfig, dict(group_size=1, minibatch_size=None), "group_size must be >= 2"),
        (RLOOConfig, dict(group_size=1), "group_size must be >= 2"),
        (DAPOConfig, dict(overlong_buffer=-1), "overlong_buffer"),
        (DAPOConfig, dict(max_sampling_rounds=0), "max_sampling_rounds"),
        (ReinforcePPConfig, dict(group_baseline=True), "group_size must be >= 2"),
        (DrGRPOConfig, dict(max_length=0), "max_length"),
    ],
)
def test_config_errors_say_how_to_fix_them(config_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config_class(**kwargs)


@pytest.mark.parametrize("config_class", [ReMaxConfig, ReinforcePPConfig])
def test_baselines_without_groups_accept_one_response_per_prompt(config_class):
    """ReMax's baseline is the greedy response and REINFORCE++ whitens over the batch: no group needed."""
    assert config_class(group_size=1).group_size == 1


def test_agents_check_what_they_are_given(fresh_policy, tokenizer, task_prompts, task_reward, tmp_path):
    with pytest.raises(TypeError, match="needs a GRPOConfig"):
        GRPOAgent(fresh_policy(), tokenizer, RLOOConfig())
    grpo = _agent("grpo", fresh_policy(), tokenizer)
    env = grpo.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=3)
    mixed = collect_episodes(env, grpo, 8, seed=0, prompt_indices=[0, 1, 0, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="groups of group_size=4"):
        grpo.learn(mixed)
    grpo.save_checkpoint(tmp_path / "ck")
    rloo = _agent("rloo", fresh_policy(), tokenizer)
    with pytest.raises(ValueError, match="'grpo' checkpoint"):
        rloo.load_checkpoint(tmp_path / "ck")
    assert rloo.update == 0


def test_tensorboard_logs(fresh_policy, tokenizer, task_prompts, task_reward, tmp_path):
    agent = _agent("grpo", fresh_policy(), tokenizer, log_dir=str(tmp_path / "tb"))
    agent.train(agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=3), 1)
    assert any(path.name.startswith("events.out.tfevents") for path in (tmp_path / "tb").iterdir())


@pytest.mark.parametrize(
    "name",
    [name if name == "grpo" else pytest.param(name, marks=pytest.mark.slow) for name in sorted(ALGORITHMS)],
)
def test_resume_matches_the_uninterrupted_run(
    name, fresh_policy, tokenizer, task_prompts, task_reward, tmp_path
):
    """N updates straight == k updates, checkpoint, a new agent, load, N - k updates: bit for bit."""
    options = dict(epochs=2, minibatch_size=4, gradient_accumulation_steps=2, lr_schedule="cosine")

    def make(agent):
        return agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=3)

    straight = _agent(name, fresh_policy(), tokenizer, **options)
    expected = straight.train(make(straight), 3)

    class Interrupt(Exception):
        pass

    def stop_after_one(update, stats):
        raise Interrupt

    interrupted = _agent(name, fresh_policy(), tokenizer, **options)
    with pytest.raises(Interrupt):
        interrupted.train(make(interrupted), 3, checkpoint_dir=tmp_path / "ck", callback=stop_after_one)
    resumed = _agent(name, fresh_policy(), tokenizer, **options)
    resumed.load_checkpoint(tmp_path / "ck")
    assert resumed.update == 1 and resumed.sampled_tokens == expected[0]["sampled_tokens"]
    rest = resumed.train(make(resumed), 3)

    for (key, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert resumed.optimizer_steps == straight.optimizer_steps == expected[-1]["optimizer_steps"] > 0
    for a, b in zip(expected[1:], rest):
        assert a["sampled_tokens"] == b["sampled_tokens"] and a["optimizer_steps"] == b["optimizer_steps"]
        assert a["score"] == b["score"] and (
            a["policy_loss"] == b["policy_loss"] or math.isnan(a["policy_loss"])
        )
