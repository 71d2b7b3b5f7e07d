"""Every bad input raises an exception that names the problem, and the environment stays usable."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import llm_env
from llm_env import TokenActions
from llm_env.tiny import tiny_gpt2, tiny_llama, word_tokenizer

PROMPTS = ["the film was", "a great movie"]


def test_step_before_reset(make_env, make_vec_env):
    with pytest.raises(RuntimeError, match="reset"):
        make_env().step(5)
    with pytest.raises(RuntimeError, match="reset"):
        make_vec_env().step(torch.tensor([5, 5, 5]))


def test_step_after_the_episode_ended(make_env, tokenizer):
    env = make_env()
    env.reset(seed=0)
    env.step(tokenizer.eos_token_id)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(5)


@pytest.mark.parametrize(
    ("action", "error", "match"),
    [
        (10_000, ValueError, "out of the vocabulary"),
        (-1, ValueError, "out of the vocabulary"),
        (3.0, TypeError, "integer"),
        ("5", TypeError, "integer"),
        (True, TypeError, "integer"),
        (np.array([5, 6]), ValueError, "single token"),
        (TokenActions(5, float("nan")), ValueError, "finite"),
        (TokenActions(5, 0.7), ValueError, "<= 0"),
    ],
)
def test_single_env_rejects_bad_actions_and_stays_usable(make_env, action, error, match):
    env, twin = make_env(), make_env()
    env.reset(seed=0)
    twin.reset(seed=0)
    env.step(5)
    twin.step(5)
    with pytest.raises(error, match=match):
        env.step(action)
    # The failed step changed nothing: both envs continue identically.
    a = env.step(TokenActions(6, -1.0))
    b = twin.step(TokenActions(6, -1.0))
    assert a[1] == pytest.approx(b[1], abs=1e-6)
    np.testing.assert_array_equal(a[0]["input_ids"], b[0]["input_ids"])


@pytest.mark.parametrize(
    ("actions", "error", "match"),
    [
        (torch.tensor([5, 10_000, 5]), ValueError, r"sub-envs \[1\]"),
        (torch.tensor([5.0, 6.0, 7.0]), TypeError, "integer"),
        (torch.tensor([5, 6]), ValueError, r"shape \(3,\)"),
        (np.array([[5, 6, 7]]), ValueError, r"shape \(3,\)"),
        (
            TokenActions(torch.tensor([5, 6, 7]), torch.tensor([-1.0, float("inf"), -1.0])),
            ValueError,
            "finite",
        ),
        (
            TokenActions(torch.tensor([5, 6, 7]), torch.tensor([-1.0, -1.0])),
            ValueError,
            "logprobs must have shape",
        ),
        (TokenActions(torch.tensor([5, 6, 7]), torch.tensor([1, 1, 1])), TypeError, "floating point"),
    ],
)
def test_vector_env_rejects_bad_actions_and_stays_usable(make_vec_env, actions, error, match):
    envs, twin = make_vec_env(), make_vec_env()
    envs.reset(seed=0)
    twin.reset(seed=0)
    with pytest.raises(error, match=match):
        envs.step(actions)
    good = TokenActions(torch.tensor([5, 6, 7]), torch.tensor([-1.0, -2.0, -3.0]))
    a, b = envs.step(good), twin.step(good)
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[0]["input_ids"], b[0]["input_ids"])


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (lambda n: [1.0] * (n + 1), r"shape \(\d+,\)"),
        (lambda n: np.ones((n, 1)), r"expected \(\d+,\)"),
        (lambda n: [float("nan")] * n, "NaN or inf"),
        (lambda n: [float("inf")] * n, "NaN or inf"),
        (lambda n: ["good"] * n, "numbers"),
    ],
)
def test_bad_reward_source_output(make_env, scores, match):
    calls = {"bad": True}

    def reward(prompts, responses):
        return scores(len(prompts)) if calls["bad"] else [0.5] * len(prompts)

    env = make_env(reward=reward, max_new_tokens=2)
    env.reset(seed=0)
    env.step(5)
    with pytest.raises((ValueError, TypeError), match=match):
        env.step(6)
    calls["bad"] = False  # the episode was not committed: the same step can be retried
    _, reward_value, _, truncated, info = env.step(TokenActions(6, -1.0))
    assert truncated and info["completion"]["score"] == 0.5
    env.reset(seed=1)  # and the env resets normally


def test_missing_prompt_file(make_env, tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        make_env(prompts=str(tmp_path / "nope.jsonl"))


def test_malformed_jsonl_reports_line_and_field(make_env, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "the film was"}) + "\n\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:3: invalid JSON"):
        make_env(prompts=str(path))
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        make_env(prompts=str(path))
    path.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: field 'prompt' must be a string"):
        make_env(prompts=str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: expected a JSON object"):
        make_env(prompts=str(path))
    path.write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        make_env(prompts=str(path))


def test_bad_prompt_iterables(make_env):
    with pytest.raises(ValueError, match="item 1: field 'prompt' is empty"):
        make_env(prompts=["ok", "   "])
    with pytest.raises(ValueError, match="item 0: missing field 'prompt'"):
        make_env(prompts=[{"question": "x"}])
    with pytest.raises(TypeError, match="path or an iterable"):
        make_env(prompts=42)


def test_prompt_too_long_without_truncation(make_env):
    with pytest.raises(ValueError, match="prompt 4 has 5 tokens, more than max_prompt_length=3"):
        make_env(
            prompts=["the film was", "a great", "i liked", "this book", "the food was cold and"],
            max_prompt_length=3,
        )


def test_tokenizer_larger_than_model_vocabulary(reward_fn):
    small = word_tokenizer(["a b c"])
    large = word_tokenizer(["a b c d e f g h i j"])
    with pytest.raises(ValueError, match="do not belong together"):
        llm_env.TextGenEnv(prompts=["a b"], tokenizer=large, reward=reward_fn, reference=tiny_gpt2(small))


def test_inconsistent_options(tokenizer, reward_fn, gpt2):
    with pytest.raises(ValueError, match="needs a reference model"):
        llm_env.TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        llm_env.TextGenEnv(
            prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=gpt2, kl_estimator="k4"
        )
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm_env.TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        llm_env.TextGenEnv(prompts=PROMPTS, reward=reward_fn, reference=gpt2)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm_env.TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, stop_token_ids=[10_000])
    with pytest.raises(TypeError, match="reward must be"):
        llm_env.TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llm_env.TextGenEnv(
            prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference="./no/such/model"
        )


def test_bad_reset_options(make_env, make_vec_env):
    env = make_env()
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"prompt": 1})
    with pytest.raises(ValueError, match="out of range"):
        env.reset(options={"prompt_index": 99})
    envs = make_vec_env()
    with pytest.raises(ValueError, match="reset_mask"):
        envs.reset(options={"reset_mask": np.array([True, False])})
    with pytest.raises(ValueError, match="prompt_indices"):
        envs.reset(options={"prompt_indices": np.array([0, 1])})
    obs, info = envs.reset(seed=0)  # still usable
    assert info["_prompt_index"].all()


def test_stepping_or_resetting_after_close_raises(make_env, make_vec_env):
    """close() drops the reference model: a later step would silently pay no KL, so it must raise."""
    envs = make_vec_env(num_envs=2)
    envs.reset(seed=0)
    envs.step(TokenActions(torch.tensor([5, 6]), torch.tensor([-1.0, -1.0])))
    envs.close()
    envs.close()  # closing twice is allowed, as Gymnasium requires
    with pytest.raises(RuntimeError, match="closed"):
        envs.step(TokenActions(torch.tensor([5, 6]), torch.tensor([-1.0, -1.0])))
    with pytest.raises(RuntimeError, match="closed"):
        envs.reset(seed=0)
    env = make_env()
    env.reset(seed=0)
    env.close()
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(TokenActions(5, -1.0))
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(seed=0)


@pytest.mark.parametrize(
    "options",
    [{"prompt_index": 99}, {"prompt_index": 1.5}, {"prompt_index": 1, "typo": 0}],
)
def test_a_failed_reset_changes_nothing(make_env, options):
    """reset(seed=s, options=bad) raises before re-seeding: the prompt order continues as if never called."""
    env, twin = make_env(), make_env()
    env.reset(seed=3)
    twin.reset(seed=3)
    with pytest.raises((ValueError, TypeError)):
        env.reset(seed=7, options=options)
    for _ in range(7):  # more than one epoch of the 5 prompts
        assert env.reset()[1]["prompt_index"] == twin.reset()[1]["prompt_index"]


@pytest.mark.parametrize(
    ("seed", "options"),
    [
        ([7, 8, 9], {"prompt_indices": [0, 99, 1]}),
        ([7, 8, 9], {"prompt_indices": [0, 1]}),
        ([7, 8, 9], {"prompt_indices": [0.0, 1.0, 2.0]}),
        ([7, 8, 9], {"reset_mask": np.array([True, False]), "prompt_indices": [0, 1]}),
        ([7, 8, 9], {"prompt_indices": [0, 1, 2], "typo": 0}),
        ([7, -1, 9], None),  # a bad seed after a good one
    ],
)
def test_a_failed_vector_reset_changes_nothing(make_vec_env, seed, options):
    envs, twin = make_vec_env(num_envs=3, max_new_tokens=1), make_vec_env(num_envs=3, max_new_tokens=1)
    envs.reset(seed=3)
    twin.reset(seed=3)
    with pytest.raises((ValueError, TypeError, gym.error.Error)):
        envs.reset(seed=seed, options=options)
    for _ in range(4):  # autoresets draw from the same prompt orders as the twin's
        a, b = envs.step(torch.tensor([5, 5, 5])), twin.step(torch.tensor([5, 5, 5]))
        np.testing.assert_array_equal(a[4].get("prompt_index"), b[4].get("prompt_index"))
        torch.testing.assert_close(a[0]["input_ids"], b[0]["input_ids"])
    np.testing.assert_array_equal(envs.reset()[1]["prompt_index"], twin.reset()[1]["prompt_index"])


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda tok: tiny_gpt2(tok, n_positions=8), "n_positions"),
        (lambda tok: tiny_llama(tok, max_position_embeddings=8), "max_position_embeddings"),
    ],
)
def test_a_budget_longer_than_the_reference_context_is_rejected_at_construction(
    tokenizer, reward_fn, build, field
):
    reference = build(tokenizer)
    options = dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=reference)
    # max_prompt_length defaults to the longest prompt (3 tokens): 3 + 6 = 9 > 8
    match = (
        rf"max_prompt_length \+ max_new_tokens = 3 \+ 6 = 9 tokens exceed the reference model's context "
        rf"of 8 positions \(config.{field};.*\): lower max_new_tokens to <= 5"
    )
    with pytest.raises(ValueError, match=match):
        llm_env.TextGenEnv(max_new_tokens=6, **options)
    with pytest.raises(ValueError, match=match):
        llm_env.TextGenVectorEnv(num_envs=2, max_new_tokens=6, **options)
    with pytest.raises(ValueError, match=r"4 \+ 6 = 10 .*max_prompt_length to <= 2"):
        llm_env.TextGenEnv(max_new_tokens=6, max_prompt_length=4, **options)
    llm_env.TextGenEnv(max_new_tokens=5, **options).reset(seed=0)  # exactly the context fits
    # Without a reference there is no context to respect.
    llm_env.TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, max_new_tokens=500)
