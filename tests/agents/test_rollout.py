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


class RandomLengthAgent:
    """Ends its response with probability ``p`` at every step: lengths are geometric, truncated at the
    environment's budget ``M``, with mean ``(1 - (1 - p)^M) / p`` and ``P(L = M) = (1 - p)^(M - 1)``."""

    def __init__(self, eos, p, seed=0):
        self.eos, self.p = eos, p
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs, restarted):
        stop = torch.rand(obs["input_ids"].shape[0], generator=self.generator) < self.p
        tokens = torch.where(stop, self.eos, 5)
        return llm_env.TokenActions(tokens, torch.log(torch.where(stop, self.p, 1 - self.p)))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_collected_lengths_are_distributed_as_the_policys(mode, tokenizer, task_prompts, task_reward):
    """The collector keeps every episode it starts: long responses are not dropped in favour of short ones.

    Stopping at the first episodes to finish (the old NEXT_STEP behaviour) collects a mean length of 2.3
    here instead of 3.87: this test fails on it."""
    p, budget = 0.25, 12
    env = llm_env.TextGenVectorEnv(
        num_envs=8,
        prompts=task_prompts,
        tokenizer=tokenizer,
        reward=task_reward,
        max_new_tokens=budget,
        autoreset_mode=mode,
    )
    agent = RandomLengthAgent(tokenizer.eos_token_id, p)
    lengths = np.concatenate(
        [collect_episodes(env, agent, 8, seed=update).lengths for update in range(40)]
    ).astype(float)
    expected_mean = (1 - (1 - p) ** budget) / p  # 3.873
    expected_truncated = (1 - p) ** (budget - 1)  # 0.042
    n = len(lengths)
    assert abs(lengths.mean() - expected_mean) < 3 * lengths.std() / np.sqrt(n), (
        lengths.mean(),
        expected_mean,
    )
    truncated = np.mean(lengths == budget)
    assert abs(truncated - expected_truncated) < 3 * np.sqrt(expected_truncated / n), truncated
    # Fewer episodes than sub-environments: the counted ones are fixed at the reset, whatever their lengths.
    few = np.concatenate([collect_episodes(env, agent, 3, seed=update).lengths for update in range(60)])
    assert abs(few.mean() - expected_mean) < 3 * few.std() / np.sqrt(len(few)), few.mean()


def test_episodes_come_back_in_the_order_they_started(tokenizer, task_prompts, task_reward):
    env = llm_env.TextGenVectorEnv(
        num_envs=2, prompts=task_prompts, tokenizer=tokenizer, reward=task_reward, max_new_tokens=4
    )
    eos = tokenizer.eos_token_id
    # Row 0 answers with 4 tokens, row 1 ends at once: row 1 restarts (NEXT_STEP) twice while row 0 runs.
    agent = FixedAgent(lambda t, b: [5, eos])
    trajectories = collect_episodes(env, agent, 3, seed=0)
    assert trajectories.lengths.tolist() == [4, 1, 1]  # episode 0 started first, though it ended last
    assert trajectories.num_tokens == 6


def test_trajectories_select_and_cat(tokenizer, gpt2, task_prompts, task_reward):
    env = llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=task_prompts,
        tokenizer=tokenizer,
        reference=gpt2,
        reward=task_reward,
        max_new_tokens=4,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    sampler = TokenSampler(gpt2, generator=torch.Generator().manual_seed(1))
    trajectories = collect_episodes(env, sampler, 6, seed=0, prompt_indices=[0, 0, 1, 1, 2, 2])
    assert trajectories.extras["max_new_tokens"] == 4
    picked = trajectories.select([4, 1])
    assert picked.prompt_index.tolist() == [2, 0] and picked.responses == [
        trajectories.responses[4],
        trajectories.responses[1],
    ]
    assert picked.response_ids.shape[1] == int(picked.lengths.max())
    for i, j in enumerate([4, 1]):
        n = int(trajectories.lengths[j])
        assert torch.equal(picked.response_list()[i], trajectories.response_list()[j])
        assert torch.equal(picked.rewards[i, :n], trajectories.rewards[j, :n])
    joined = type(trajectories).cat([trajectories.select([0, 1]), trajectories.select([2, 3, 4, 5])])
    assert joined.responses == trajectories.responses and joined.num_tokens == trajectories.num_tokens
    assert torch.equal(joined.mask, trajectories.mask) and torch.equal(
        joined.response_ids, trajectories.response_ids
    )
    assert torch.allclose(joined.rewards, trajectories.rewards)
    with pytest.raises(IndexError, match="episode indices"):
        trajectories.select([6])
