"""A tiny RLHF task for the agents: the reward counts the word 'good' in the response."""

import pytest

from llm_env.tiny import tiny_gpt2

TASK_PROMPTS = ["the film was", "a great movie", "i liked the", "this book is"]


def good_count(prompts, responses):
    return [float(r.split().count("good")) for r in responses]


@pytest.fixture
def task_reward():
    return good_count


@pytest.fixture
def task_prompts():
    return list(TASK_PROMPTS)


@pytest.fixture
def fresh_policy(tokenizer):
    """A new tiny GPT-2 policy per call (agents train it in place)."""

    def make(seed=2):
        return tiny_gpt2(tokenizer, seed=seed)

    return make


LEARNING = dict(learning_rate=1e-2, epochs=2, minibatch_size=8, kl_coef=0.01, progress=False, seed=0)
"""Critic-free agents on the tiny task: strong enough to lift the score by more than 1 in 10 updates."""


@pytest.fixture
def pg_learning_run(fresh_policy, tokenizer, task_prompts, task_reward):
    """Train a critic-free agent for ``updates`` updates on the tiny task; return (agent, history, start, end)
    with the mean score of the first and last two updates (``score_key``: the statistic to read)."""

    def run(agent_class, config_class, updates=10, score_key="score", **overrides):
        agent = agent_class(fresh_policy(), tokenizer, config_class(**{**LEARNING, **overrides}))
        env = agent.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=5)
        history = agent.train(env, updates)
        start = sum(h[score_key] for h in history[:2]) / 2
        end = sum(h[score_key] for h in history[-2:]) / 2
        return agent, history, start, end

    return run
