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
