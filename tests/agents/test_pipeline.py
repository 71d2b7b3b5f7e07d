"""Llama 2's iterative pipeline: rejection-sampling rounds, then PPO from the last round."""

import pytest

from agents.pipeline import IterativeConfig, iterative_rlhf
from agents.ppo import PPOConfig
from agents.rejection import RejectionSamplingConfig
from agents.sft import SFTConfig


@pytest.mark.parametrize("reference", ["sft", "previous"])
def test_rejection_rounds_then_ppo(fresh_policy, tokenizer, task_prompts, task_reward, reference):
    config = IterativeConfig(
        rs_rounds=2,
        ppo_updates=2,
        reference=reference,
        num_envs=8,
        rejection=RejectionSamplingConfig(
            k=4, kl_groups=1, sft=SFTConfig(learning_rate=1e-2, epochs=4, progress=False), progress=False
        ),
        ppo=PPOConfig(
            learning_rate=3e-3, episodes_per_update=8, minibatch_size=8, kl_coef=0.01, progress=False
        ),
    )
    sft = fresh_policy()
    result = iterative_rlhf(sft, tokenizer, task_prompts, task_reward, config, max_new_tokens=4)
    assert [h["round"] for h in result.rejection_history] == [1.0, 2.0]
    assert len(result.ppo_history) == 2
    # PPO starts from the rejection-sampling model: its first rollout's KL to an SFT reference is already
    # positive, while with the previous round as reference it starts at zero.
    first_kl = result.ppo_history[0]["kl"]
    if reference == "sft":
        assert first_kl > 0.01
    else:
        assert abs(first_kl) < 1e-4
    assert result.policy is not sft


def test_config_errors():
    with pytest.raises(ValueError, match="not both 0"):
        IterativeConfig(rs_rounds=0, ppo_updates=0)
    with pytest.raises(ValueError, match="reference"):
        IterativeConfig(reference="base")
