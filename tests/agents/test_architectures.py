"""The architecture conformance matrix, agents' half: for every tiny architecture of
:data:`llm_env.tiny.TINY_ARCHITECTURES`, the log-probabilities :class:`agents.TokenSampler` samples with (its
own slot KV cache, across autoresets) equal the teacher-forced ones of ``response_forward`` (so PPO's ratio
starts at 1), and one PPO and one GRPO update run and move the weights. The environment's half is
``tests/llm_env/test_architectures.py``.
"""

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import llm_env
from agents.grpo import GRPOAgent, GRPOConfig
from agents.policy import SequenceBatch, TokenSampler, response_forward
from agents.ppo import PPOAgent, PPOConfig
from agents.rollout import collect_episodes
from llm_env.tiny import TINY_ARCHITECTURES, numbered_tokenizer, tiny_causal_lm

ARCHITECTURES = sorted(TINY_ARCHITECTURES)
PROMPTS = ["w5 w6", "w7 w8 w9 w10 w11 w12", "w13 w14 w15", "w20", "w21 w22 w23 w24 w25"]


@pytest.fixture(scope="module")
def tok():
    return numbered_tokenizer(48)


def low_words(prompts, responses):
    """How many of the response's words have an id below 20: a score that differs between responses."""
    return [float(sum(w[1:].isdigit() and int(w[1:]) < 20 for w in r.split())) for r in responses]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sampler_logprobs_equal_the_teacher_forced_ones(arch, tok):
    policy = tiny_causal_lm(arch, tok, seed=1)
    env = llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=PROMPTS,
        tokenizer=tok,
        reference=tiny_causal_lm(arch, tok, seed=0),
        reward=low_words,
        max_new_tokens=10,  # longer than the sliding windows (4)
        stop_token_ids=[1, *range(30, 36)],  # a stop one step in seven: rows end at different steps
        device="cpu",
    )
    sampler = TokenSampler(policy, seed=0)
    episodes = collect_episodes(env, sampler, 9, seed=0)  # 3 per row: autoresets, rows ending apart
    assert len(set(episodes.lengths.tolist())) > 1
    batch = SequenceBatch.build(
        episodes.prompt_ids, episodes.response_list(), pad_id=env.pad_token_id, device="cpu"
    )
    with torch.no_grad():
        forced = response_forward(policy, batch).logprobs
    mask = episodes.mask
    torch.testing.assert_close(forced[mask], episodes.logprobs[mask], atol=1e-4, rtol=0)


def _moved(model, before) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_ppo_and_one_grpo_update_run(arch, tok):
    common = dict(learning_rate=1e-3, kl_coef=0.05, progress=False, seed=0)
    env_options = dict(num_envs=4, max_new_tokens=6, autoreset_mode=AutoresetMode.DISABLED, device="cpu")
    for agent in (
        PPOAgent(
            tiny_causal_lm(arch, tok, seed=1),
            tok,
            PPOConfig(**common, episodes_per_update=4, minibatch_size=4, ppo_epochs=1),
        ),
        GRPOAgent(
            tiny_causal_lm(arch, tok, seed=1),
            tok,
            GRPOConfig(**common, prompts_per_update=2, group_size=2),
        ),
    ):
        before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
        history = agent.train(agent.make_env(PROMPTS, low_words, **env_options), 1)
        assert len(history) == 1 and np.isfinite(history[0]["policy_loss"]), (type(agent), history)
        assert _moved(agent.policy, before), type(agent)
