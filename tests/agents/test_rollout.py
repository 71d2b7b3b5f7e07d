"""collect_episodes: any agent through the env, in both autoreset modes, episodes assembled exactly."""

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import llm_env
from agents.policy import TokenSampler
from agents.rollout import Agent, LearningAgent, collect_episodes


class FixedAgent:
    """Emits a scripted token per row per call, with a fixed log-probability."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def act(self, obs, restarted):
        tokens = torch.as_tensor(
            self.script(self.calls, obs.shape[0] if hasattr(obs, "shape") else obs["input_ids"].shape[0])
        )
        self.calls += 1
        return llm_env.TokenActions(tokens, torch.full(tokens.shape, -1.5))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_episodes_are_assembled_exactly(mode, tokenizer, gpt2, task_prompts, task_reward):
    env = llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=task_prompts,
        tokenizer=tokenizer,
        reference=gpt2,
        reward=task_reward,
        max_new_tokens=4,
        autoreset_mode=mode,
    )
    sampler = TokenSampler(gpt2, generator=torch.Generator().manual_seed(1))
    trajectories = collect_episodes(env, sampler, 7, seed=3)
    assert len(trajectories) == 7
    assert isinstance(sampler, Agent)
    for n in range(7):
        length = int(trajectories.lengths[n])
        assert int(trajectories.mask[n].sum()) == length
        response = trajectories.response_ids[n, :length].tolist()
        prompt = trajectories.prompt_ids[n].tolist()
        text = tokenizer.decode(prompt + response, skip_special_tokens=True)[len(tokenizer.decode(prompt)) :]
        assert text == trajectories.responses[n]
        assert float(trajectories.rewards[n].sum()) == pytest.approx(trajectories.returns[n], abs=1e-5)
        assert trajectories.scores[n] == task_reward([""], [text])[0]
        assert (length == 4) or trajectories.eos[n]


def test_forced_prompts_in_order(tokenizer, task_prompts, task_reward):
    env = llm_env.TextGenVectorEnv(
        num_envs=2,
        prompts=task_prompts,
        tokenizer=tokenizer,
        reward=task_reward,
        max_new_tokens=3,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    agent = FixedAgent(lambda t, b: [5 + t % 3] * b)
    queue = [3, 3, 1, 0, 2]
    trajectories = collect_episodes(env, agent, 5, seed=0, prompt_indices=queue)
    assert trajectories.prompt_index.tolist() == queue  # episode i answers prompt_indices[i]
    assert trajectories.prompts == [task_prompts[i] for i in queue]
    assert all(np.isnan(trajectories.kl))  # no reference: the KL is unknown, not zero


def test_collect_rejects_bad_arguments(tokenizer, task_prompts, task_reward):
    env = llm_env.TextGenVectorEnv(num_envs=2, prompts=task_prompts, tokenizer=tokenizer, reward=task_reward)
    with pytest.raises(ValueError, match="DISABLED"):
        collect_episodes(env, FixedAgent(lambda t, b: [5] * b), 2, prompt_indices=[0, 1])
    with pytest.raises(ValueError, match="num_episodes"):
        collect_episodes(env, FixedAgent(lambda t, b: [5] * b), 0)


def test_protocols_are_runtime_checkable():
    class Learner:
        def act(self, obs, restarted):
            return None

        def learn(self, trajectories):
            return {}

    assert isinstance(Learner(), LearningAgent)
    assert not isinstance(object(), Agent)
