"""PPOAgent: learning on a tiny task, LoRA, PPO-ptx, adaptive KL, configuration errors, exact resume."""

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.ppo import PPOAgent, PPOConfig

FAST = dict(
    learning_rate=3e-3, episodes_per_update=16, minibatch_size=8, kl_coef=0.01, progress=False, seed=0
)


def make(agent, prompts, reward, **kwargs):
    return agent.make_env(
        prompts, reward, num_envs=8, max_new_tokens=5, autoreset_mode=AutoresetMode.DISABLED, **kwargs
    )


def test_ppo_raises_the_reward_model_score(fresh_policy, tokenizer, task_prompts, task_reward):
    agent = PPOAgent(fresh_policy(), tokenizer, PPOConfig(**FAST))
    history = agent.train(make(agent, task_prompts, task_reward), 10)
    start = np.mean([h["score"] for h in history[:2]])
    end = np.mean([h["score"] for h in history[-2:]])
    assert start < 0.6 and end > start + 1.0, (start, end)  # fails if learning is broken
    assert {"approx_kl", "clipfrac", "explained_variance", "entropy", "value_loss", "policy_loss"} <= set(
        history[0]
    )
    assert history[-1]["kl"] > history[0]["kl"]  # moving towards 'good' costs KL to the reference


def test_ppo_with_lora_learns_and_keeps_the_base_frozen(fresh_policy, tokenizer, task_prompts, task_reward):
    base = fresh_policy()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # 2e-2: 5e-2 overshoots with some rollout orders (the unbiased collector changed them)
    agent = PPOAgent(base, tokenizer, PPOConfig(**{**FAST, "learning_rate": 2e-2}, lora_rank=8))
    env = make(agent, task_prompts, task_reward)
    assert env.fused_policy is agent.policy  # the reference is the base with the adapter switched off
    agent.train(env, 6)
    good = tokenizer.convert_tokens_to_ids("good")
    ids = [torch.tensor([tokenizer(p)["input_ids"]]) for p in task_prompts]
    with torch.no_grad():
        adapted = np.mean([float(agent.policy(i).logits[0, -1].softmax(-1)[good]) for i in ids])
        with agent.policy.disable_adapter():
            reference = np.mean([float(agent.policy(i).logits[0, -1].softmax(-1)[good]) for i in ids])
    assert adapted > 1.3 * reference, (adapted, reference)  # the adapters moved the policy towards the reward
    merged = agent.policy.get_base_model().state_dict()
    for name, value in before.items():  # while the base weights never change
        key = next(k for k in merged if k.replace("base_layer.", "") == name)
        torch.testing.assert_close(merged[key], value)


def test_adaptive_kl_moves_the_env_coefficient(fresh_policy, tokenizer, task_prompts, task_reward):
    config = PPOConfig(**{**FAST, "kl_coef": 0.5}, adaptive_kl=True, kl_target=0.01, kl_horizon=20)
    agent = PPOAgent(fresh_policy(), tokenizer, config)
    env = make(agent, task_prompts, task_reward)
    history = agent.train(env, 3)
    betas = [h["kl_coef"] for h in history]
    # KL ~ 0 at the start (policy == reference), below target: beta shrinks by the clipped 20% * 16/20
    assert betas[0] == 0.5 and betas[1] == pytest.approx(0.5 * (1 - 0.2 * 16 / 20))
    assert env.kl_coef == betas[-1]  # the env paid the coefficient of the last rollout


def test_ppo_ptx_adds_the_pretraining_loss(fresh_policy, tokenizer, task_prompts, task_reward):
    texts = ["the film was good and the actors were great", "a great movie with a good story"]
    agent = PPOAgent(
        fresh_policy(), tokenizer, PPOConfig(**FAST, ptx_coef=1.0, ptx_batch_size=2), ptx_texts=texts
    )
    history = agent.train(make(agent, task_prompts, task_reward), 2)
    assert np.isfinite(history[-1]["ptx_loss"]) and history[-1]["ptx_loss"] > 0
    with pytest.raises(ValueError, match="ptx_texts"):
        PPOAgent(fresh_policy(), tokenizer, PPOConfig(ptx_coef=1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(episodes_per_update=10, minibatch_size=4), "must divide episodes_per_update"),
        (dict(minibatch_size=8, gradient_accumulation_steps=3), "must divide minibatch_size"),
        (dict(learning_rate=0), "learning_rate"),
        (dict(adaptive_kl=True, kl_coef=0.0), "adaptive_kl"),
        (dict(temperature=0), "temperature"),
        (dict(gamma=1.5), "gamma"),
        (dict(value_learning_rate=0.0), "value_learning_rate"),
    ],
)
def test_config_errors_say_how_to_fix_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


def interrupt_and_resume(policy_factory, tokenizer, prompts, reward, config, checkpoint):
    """A run of 4 updates stopped by an exception after update 2 (its checkpoint written), then a fresh agent
    restored from that checkpoint and trained to update 4."""

    class Interrupt(Exception):
        pass

    def stop_after_two(update, stats):
        if update == 2:
            raise Interrupt

    interrupted = PPOAgent(policy_factory(), tokenizer, config)
    with pytest.raises(Interrupt):
        interrupted.train(
            make(interrupted, prompts, reward), 4, checkpoint_dir=checkpoint, callback=stop_after_two
        )
    resumed = PPOAgent(policy_factory(), tokenizer, config)
    resumed.load_checkpoint(checkpoint)
    assert resumed.update == 2
    resumed.train(make(resumed, prompts, reward), 4)
    return resumed


def test_resume_matches_the_uninterrupted_run(tokenizer, task_prompts, task_reward, tmp_path, fresh_policy):
    config = PPOConfig(
        **FAST, gradient_accumulation_steps=2, lr_schedule="cosine", adaptive_kl=True, kl_target=0.5
    )

    straight = PPOAgent(fresh_policy(), tokenizer, config)
    straight.train(make(straight, task_prompts, task_reward), 4)

    resumed = interrupt_and_resume(
        fresh_policy, tokenizer, task_prompts, task_reward, config, tmp_path / "ck"
    )

    assert resumed.kl_controller.value == pytest.approx(straight.kl_controller.value, rel=1e-12)
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(
        straight.value_head.linear.weight, resumed.value_head.linear.weight, atol=0, rtol=0
    )
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    # 4 updates x ppo_epochs x (16 episodes / minibatches of 8): the counter survives the checkpoint.
    assert straight.optimizer_steps == resumed.optimizer_steps == 4 * config.ppo_epochs * 2


def test_reward_model_critic_trains_and_resumes_exactly(
    fresh_policy, tokenizer, task_prompts, task_reward, saved_classifier, tmp_path
):
    config = PPOConfig(**FAST, critic=str(saved_classifier), value_learning_rate=1e-3)
    straight = PPOAgent(fresh_policy(), tokenizer, config)
    assert straight.critic is not None and straight.value_head is straight.critic.head
    assert [g["lr"] for g in straight.optimizer.param_groups] == [3e-3, 1e-3]
    before = {k: v.clone() for k, v in straight.critic.state_dict().items()}
    history = straight.train(make(straight, task_prompts, task_reward), 4)
    assert all(np.isfinite(h["value_loss"]) for h in history)
    moved = [k for k, v in straight.critic.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in moved) and "head.linear.weight" in moved

    resumed = interrupt_and_resume(
        fresh_policy, tokenizer, task_prompts, task_reward, config, tmp_path / "ck"
    )
    for module in ("policy", "critic"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=f"{module}.{name}")
