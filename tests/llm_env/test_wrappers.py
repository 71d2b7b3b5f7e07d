"""Gymnasium's own numpy vector wrappers on the native vector env, through llm_env.TorchToNumpy."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import ClipReward, DictInfoToList, NormalizeReward, RecordEpisodeStatistics

import llm_env
from llm_env import TokenActions

PROMPTS = ["the film was", "a great movie", "i liked the", "this book is", "the food was cold and"]


@pytest.fixture
def options(tokenizer, gpt2, reward_fn):
    return dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=gpt2, max_new_tokens=3)


def actions(tokenizer, steps, num_envs, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        tokens = rng.integers(3, len(tokenizer), size=num_envs)
        tokens[rng.random(num_envs) < 0.25] = tokenizer.eos_token_id
        yield tokens


def test_record_episode_statistics_matches_sync_vector_env(options, tokenizer):
    """The wrapped native env and SyncVectorEnv of single envs give the same episode statistics."""
    native = RecordEpisodeStatistics(llm_env.TorchToNumpy(llm_env.TextGenVectorEnv(num_envs=3, **options)))
    sync = RecordEpisodeStatistics(
        gym.vector.SyncVectorEnv([lambda: llm_env.TextGenEnv(**options) for _ in range(3)])
    )
    obs_a, _ = native.reset(seed=4)
    obs_b, _ = sync.reset(seed=4)
    np.testing.assert_array_equal(obs_a["input_ids"], obs_b["input_ids"])
    episodes = 0
    for tokens in actions(tokenizer, 20, 3):
        obs_a, r_a, te_a, tr_a, info_a = native.step(tokens)
        obs_b, r_b, te_b, tr_b, info_b = sync.step(tokens)
        assert isinstance(obs_a["input_ids"], np.ndarray) and obs_a["input_ids"].dtype == np.int64
        assert r_a.dtype == r_b.dtype == np.float64 and te_a.dtype == tr_a.dtype == np.bool_
        np.testing.assert_allclose(r_a, r_b, atol=1e-6)
        np.testing.assert_array_equal(te_a, te_b)
        np.testing.assert_array_equal(tr_a, tr_b)
        np.testing.assert_array_equal(obs_a["attention_mask"], obs_b["attention_mask"])
        assert ("episode" in info_a) == ("episode" in info_b)
        if "episode" in info_b:
            np.testing.assert_array_equal(info_a["_episode"], info_b["_episode"])
            np.testing.assert_allclose(info_a["episode"]["r"], info_b["episode"]["r"], atol=1e-5)
            np.testing.assert_array_equal(info_a["episode"]["l"], info_b["episode"]["l"])
            done = info_a["_episode"]
            np.testing.assert_allclose(  # the statistic is the environment's own episode return
                info_a["episode"]["r"][done], info_a["completion"]["return"][done], atol=1e-5
            )
            episodes += int(done.sum())
    assert episodes >= 6 and native.episode_count == sync.episode_count == episodes
    np.testing.assert_allclose(list(native.return_queue), list(sync.return_queue), atol=1e-5)


def test_reward_wrappers_and_info_to_list_stack_on_top(options, tokenizer):
    def stack(env):
        return DictInfoToList(ClipReward(NormalizeReward(env), -0.5, 0.5))

    native = stack(llm_env.TorchToNumpy(llm_env.TextGenVectorEnv(num_envs=2, **options)))
    sync = stack(gym.vector.SyncVectorEnv([lambda: llm_env.TextGenEnv(**options) for _ in range(2)]))
    native.reset(seed=1)
    sync.reset(seed=1)
    finished = 0
    for tokens in actions(tokenizer, 12, 2, seed=1):
        _, r_a, *_, infos_a = native.step(tokens)
        _, r_b, *_, infos_b = sync.step(tokens)
        np.testing.assert_allclose(r_a, r_b, atol=1e-5)
        assert r_a.max() <= 0.5 and r_a.min() >= -0.5
        for a, b in zip(infos_a, infos_b):  # one dict per sub-environment
            assert ("completion" in a) == ("completion" in b)
            if "completion" in a:
                assert a["completion"]["response"] == b["completion"]["response"]
                finished += 1
    assert finished >= 2


def test_token_actions_and_reset_options_pass_through(options):
    envs = llm_env.TorchToNumpy(
        llm_env.TextGenVectorEnv(num_envs=2, autoreset_mode=AutoresetMode.DISABLED, **options)
    )
    native = llm_env.TextGenVectorEnv(num_envs=2, autoreset_mode=AutoresetMode.DISABLED, **options)
    obs, info = envs.reset(seed=0, options={"prompt_indices": [4, 1]})
    native.reset(seed=0, options={"prompt_indices": [4, 1]})
    assert info["prompt_index"].tolist() == [4, 1] and isinstance(obs["attention_mask"], np.ndarray)
    for tokens in ([5, 6], [7, 8], [9, 10]):
        logprobs = np.array([-1.0, -2.5])
        _, rewards, _, truncations, info = envs.step(TokenActions(np.array(tokens), logprobs))
        expected = native.step(TokenActions(torch.tensor(tokens), torch.from_numpy(logprobs)))
        np.testing.assert_allclose(rewards, expected[1].numpy(), atol=1e-6)
    assert truncations.all() and "kl" in info["completion"]  # the log-probabilities reached the env
    obs, info = envs.reset(options={"reset_mask": np.array([False, True]), "prompt_indices": [0]})
    assert info["_prompt_index"].tolist() == [False, True] and obs["input_ids"].shape == (
        2,
        envs.unwrapped.max_length,
    )
