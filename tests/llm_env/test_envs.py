"""TextGenEnv / TextGenVectorEnv against Gymnasium's and SB3's own checkers and against each other."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import llm_env
from llm_env import TokenActions
from llm_env.tiny import tiny_gpt2

PROMPTS = ["the film was", "a great movie", "i liked the", "this book is", "the food was cold and"]


def made(tokenizer, gpt2, reward_fn, **kwargs):
    options = dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=gpt2, max_new_tokens=4)
    options.update(kwargs)
    return gym.make("llm_env/TextGen-v0", **options)


def test_gymnasium_check_env_passes_without_warnings(tokenizer, gpt2, reward_fn):
    env = made(tokenizer, gpt2, reward_fn, render_mode="ansi").unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env)


def test_sb3_check_env_passes_without_warnings(tokenizer, gpt2, reward_fn):
    env = made(tokenizer, gpt2, reward_fn).unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_check_env(env, warn=True)


def test_spaces_are_integer_and_sized_to_the_vocabulary(make_env, tokenizer):
    env = make_env()
    assert env.action_space == gym.spaces.Discrete(len(tokenizer))
    for key in ("input_ids", "attention_mask"):
        space = env.observation_space[key]
        assert space.dtype == np.int64
        assert space.shape == (env.unwrapped.max_length,)
    obs, _ = env.reset(seed=0)
    assert obs["input_ids"].dtype == np.int64 and obs in env.observation_space


def test_make_and_make_vec(tokenizer, gpt2, reward_fn):
    env = made(tokenizer, gpt2, reward_fn)
    assert isinstance(env.unwrapped, llm_env.TextGenEnv)
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert isinstance(reward, float) and isinstance(terminated, bool)
    envs = gym.make_vec(
        "llm_env/TextGen-v0",
        num_envs=4,
        prompts=PROMPTS,
        tokenizer=tokenizer,
        reward=reward_fn,
        reference=gpt2,
    )
    assert isinstance(envs, llm_env.TextGenVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert envs.action_space == gym.spaces.MultiDiscrete([len(tokenizer)] * 4)
    obs, _ = envs.reset(seed=0)
    assert obs["input_ids"].shape == (4, envs.max_length)
    obs, rewards, terminations, truncations, _ = envs.step(torch.zeros(4, dtype=torch.long) + 5)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32
    assert terminations.dtype == torch.bool and truncations.dtype == torch.bool


def test_same_seed_gives_same_prompt_order(make_env):
    def order(env, seed):
        out = [env.reset(seed=seed)[1]["prompt_index"]]
        out += [env.reset()[1]["prompt_index"] for _ in range(9)]
        return out

    env = make_env()
    first = order(env, 7)
    assert first == order(env, 7) == order(make_env(), 7)
    assert sorted(first[:5]) == list(range(5)) == sorted(first[5:])  # a permutation per epoch
    assert first != order(env, 8)


def to_numpy(tree):
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.cpu().numpy()
    return tree


def assert_info_equal(native, reference):
    assert set(native) == set(reference), (sorted(native), sorted(reference))
    for key, value in reference.items():
        if isinstance(value, dict):
            assert_info_equal(native[key], value)
        elif value.dtype == object:
            assert list(native[key]) == list(value), key
        else:
            assert native[key].dtype == value.dtype, key
            np.testing.assert_allclose(native[key], value, atol=1e-5, err_msg=key)


def test_vector_env_matches_sync_vector_env_of_single_envs(tokenizer, gpt2, reward_fn):
    """Same seed: same prompts, observations, rewards, flags and infos, through many autoresets."""
    options = dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=gpt2, max_new_tokens=4)
    num_envs = 3
    native = llm_env.TextGenVectorEnv(num_envs=num_envs, **options)
    sync = gym.vector.SyncVectorEnv([lambda: llm_env.TextGenEnv(**options) for _ in range(num_envs)])
    obs_a, info_a = native.reset(seed=11)
    obs_b, info_b = sync.reset(seed=11)
    assert_info_equal(to_numpy(obs_a), obs_b)
    assert_info_equal(info_a, info_b)
    rng = np.random.default_rng(0)
    eos = tokenizer.eos_token_id
    finished = 0
    for _ in range(30):
        actions = rng.integers(0, len(tokenizer), size=num_envs)
        actions[rng.random(num_envs) < 0.2] = eos  # some episodes end early, by EOS
        obs_a, r_a, te_a, tr_a, info_a = native.step(torch.as_tensor(actions))
        obs_b, r_b, te_b, tr_b, info_b = sync.step(actions)
        assert_info_equal(to_numpy(obs_a), obs_b)
        np.testing.assert_allclose(r_a.numpy(), r_b, atol=1e-5)
        np.testing.assert_array_equal(te_a.numpy(), te_b)
        np.testing.assert_array_equal(tr_a.numpy(), tr_b)
        assert_info_equal(info_a, info_b)
        finished += int(info_b.get("_completion", np.zeros(1)).sum())
    assert finished >= 10


def test_vector_env_matches_single_envs_with_logprobs(make_vec_env, make_env, tokenizer):
    num_envs = 3
    native = make_vec_env(num_envs=num_envs)
    singles = [make_env() for _ in range(num_envs)]
    native.reset(seed=3)
    for i, env in enumerate(singles):
        env.reset(seed=3 + i)
    rng = np.random.default_rng(1)
    single_done = [False] * num_envs
    for _ in range(20):
        tokens = rng.integers(0, len(tokenizer), size=num_envs)
        logprobs = -rng.random(num_envs) * 3
        _, rewards, terminations, truncations, info = native.step(
            TokenActions(torch.as_tensor(tokens), torch.as_tensor(logprobs))
        )
        for i, env in enumerate(singles):
            if single_done[i]:  # next-step autoreset: this step restarts the sub-env
                env.reset()
                single_done[i] = False
                assert float(rewards[i]) == 0.0
                continue
            obs, reward, terminated, truncated, single_info = env.step(
                TokenActions(int(tokens[i]), float(logprobs[i]))
            )
            assert float(rewards[i]) == pytest.approx(reward, abs=1e-5)
            assert bool(terminations[i]) == terminated and bool(truncations[i]) == truncated
            single_done[i] = terminated or truncated
            if single_done[i]:
                assert info["completion"]["kl"][i] == pytest.approx(single_info["completion"]["kl"], abs=1e-5)
                assert info["completion"]["response"][i] == single_info["completion"]["response"]


def test_next_step_autoreset_semantics(make_vec_env, tokenizer):
    envs = make_vec_env(num_envs=2, max_new_tokens=3)
    obs, info = envs.reset(seed=0)
    eos = tokenizer.eos_token_id
    obs, rewards, terminations, truncations, info = envs.step(torch.tensor([eos, 7]))
    assert terminations.tolist() == [True, False] and info["_completion"].tolist() == [True, False]
    # The next step resets sub-env 0: its action is ignored, reward 0, a new prompt is observed.
    obs, rewards, terminations, truncations, info = envs.step(torch.tensor([9, 7]))
    assert rewards[0] == 0.0 and not terminations[0] and not truncations[0]
    assert info["_prompt_index"].tolist() == [True, False]
    new_prompt = envs.prompt_token_ids(int(info["prompt_index"][0])).tolist()
    assert obs["attention_mask"][0].tolist() == [1] * len(new_prompt) + [0] * (8 - len(new_prompt))
    assert obs["input_ids"][0, : len(new_prompt)].tolist() == new_prompt
    assert (obs["input_ids"][0, len(new_prompt) :] == tokenizer.pad_token_id).all()
    obs, rewards, terminations, truncations, info = envs.step(torch.tensor([9, 7]))
    assert truncations.tolist() == [False, True]  # sub-env 1 reached max_new_tokens = 3


def test_disabled_autoreset_keeps_finished_envs_frozen(make_vec_env, tokenizer):
    envs = make_vec_env(num_envs=2, max_new_tokens=3, autoreset_mode=AutoresetMode.DISABLED)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    envs.reset(seed=0, options={"prompt_indices": np.array([1, 1])})
    eos = tokenizer.eos_token_id
    obs_before = envs.step(torch.tensor([eos, 7]))[0]["input_ids"][0].clone()
    for _ in range(2):
        obs, rewards, terminations, _, info = envs.step(torch.tensor([9, 7]))
        assert rewards[0] == 0.0 and bool(terminations[0])
        assert torch.equal(obs["input_ids"][0], obs_before)
    assert bool(envs.step(torch.tensor([9, 7]))[3][1])  # sub-env 1 truncated by now (sticky)
    obs, info = envs.reset(options={"reset_mask": np.array([True, False]), "prompt_indices": np.array([2])})
    assert info["_prompt_index"].tolist() == [True, False] and info["prompt_index"][0] == 2


def test_sequential_order_visits_every_prompt_once_per_pass(make_vec_env):
    envs = make_vec_env(num_envs=2, prompt_order="sequential", autoreset_mode="Disabled", max_new_tokens=1)
    seen = list(envs.reset(seed=0)[1]["prompt_index"])
    for _ in range(2):
        envs.step(torch.tensor([5, 5]))
        seen += list(envs.reset()[1]["prompt_index"])
    assert seen[:5] == [0, 1, 2, 3, 4]


def test_forced_prompts_for_best_of_k(make_vec_env):
    envs = make_vec_env(num_envs=4)
    obs, info = envs.reset(seed=0, options={"prompt_indices": [2, 2, 2, 2]})
    assert info["prompt_index"].tolist() == [2, 2, 2, 2]
    assert (obs["input_ids"] == obs["input_ids"][0]).all()


def test_ansi_render(make_env, make_vec_env):
    env = make_env(render_mode="ansi")
    env.reset(seed=0, options={"prompt_index": 0})
    env.step(5)
    prompt, response = env.render().split("\u2502")
    assert prompt == "the film was" and len(response.split()) == 1
    envs = make_vec_env(num_envs=2, render_mode="ansi")
    envs.reset(seed=0)
    assert len(envs.render()) == 2


def test_models_loaded_by_path(saved_gpt2, saved_classifier, tokenizer, gpt2):
    """Reference, tokenizer (inferred from the reference path) and reward model all loaded from disk."""
    env = llm_env.TextGenEnv(
        prompts=PROMPTS, reference=str(saved_gpt2), reward=str(saved_classifier), max_new_tokens=3
    )
    in_memory = llm_env.TextGenEnv(
        prompts=PROMPTS,
        reference=gpt2,
        tokenizer=tokenizer,
        reward=llm_env.SequenceClassifierReward(tiny_gpt2(tokenizer, seed=4, classifier=True), tokenizer),
        max_new_tokens=3,
    )
    results = []
    for e in (env, in_memory):
        e.reset(seed=0)
        results.append([e.step(TokenActions(t, -1.0)) for t in (5, 6, 7)])
    for a, b in zip(*results):
        assert a[1] == pytest.approx(b[1], abs=1e-5)
    assert results[0][-1][4]["completion"]["score"] == pytest.approx(
        results[1][-1][4]["completion"]["score"], abs=1e-5
    )


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer, gpt2, reward_fn):
    no_pad = type(tokenizer)(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", unk_token="<unk>"
    )
    assert no_pad.pad_token is None
    env = llm_env.TextGenEnv(
        prompts=PROMPTS, tokenizer=no_pad, reward=reward_fn, reference=gpt2, max_new_tokens=3
    )
    obs, _ = env.reset(seed=0)
    length = int(obs["attention_mask"].sum())
    assert (obs["input_ids"][length:] == no_pad.eos_token_id).all()
    assert no_pad.pad_token is None  # the user's tokenizer is not modified


def test_prompt_truncation_sides(make_env, tokenizer):
    ids = tokenizer("the food was cold and")["input_ids"]
    for side, expected in (("left", ids[-3:]), ("right", ids[:3])):
        env = make_env(max_prompt_length=3, truncation_side=side)
        obs, _ = env.reset(options={"prompt_index": 4})
        assert obs["input_ids"][:3].tolist() == expected
        assert obs["input_ids"].shape == (3 + 6,)


def test_device_tensors_stay_on_the_env_device(make_vec_env):
    envs = make_vec_env(num_envs=2, device="cpu")
    obs, _ = envs.reset(seed=0)
    out = envs.step(torch.tensor([5, 6]))
    assert all(t.device.type == "cpu" for t in (*obs.values(), *out[0].values(), *out[1:4]))


def test_adapter_disabled_reference_matches_a_frozen_copy_of_the_base(tokenizer, reward_fn):
    """With LoRA, the reference is the policy's own base weights under disable_adapter(): no second copy."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = tiny_gpt2(tokenizer, seed=7)
    frozen_copy = copy.deepcopy(base)
    policy = get_peft_model(
        base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    )
    policy.train()
    options = dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, max_new_tokens=5, kl_coef=0.5)
    shared = llm_env.TextGenVectorEnv(num_envs=2, reference=llm_env.AdapterDisabled(policy), **options)
    separate = llm_env.TextGenVectorEnv(num_envs=2, reference=frozen_copy, **options)
    shared.reset(seed=0)
    separate.reset(seed=0)
    for tokens in ([5, 6], [7, 8], [9, 10]):
        action = TokenActions(torch.tensor(tokens), torch.tensor([-1.0, -2.0]))
        torch.testing.assert_close(shared.step(action)[1], separate.step(action)[1], atol=1e-6, rtol=0)
    assert policy.training  # the policy's mode is restored after each reference forward
    assert any(p.requires_grad for p in policy.parameters())
    with torch.no_grad():  # and the adapter really changes the policy, so the test can tell them apart
        ids = torch.tensor([[5, 6, 7]])
        assert not torch.allclose(policy(ids).logits, frozen_copy(ids).logits)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_a_first_reset_of_some_sub_envs_leaves_the_others_waiting(make_vec_env, mode):
    envs = make_vec_env(num_envs=3, autoreset_mode=mode, render_mode="ansi")
    obs, info = envs.reset(seed=0, options={"reset_mask": np.array([True, False, True])})
    assert obs["attention_mask"][1].sum() == 0 and info["_prompt_index"].tolist() == [True, False, True]
    assert envs.render()[1] == ""
    obs, rewards, terminations, truncations, info = envs.step(torch.tensor([5, 5, 5]))
    if mode == AutoresetMode.NEXT_STEP:  # a waiting sub-env is started by the next step, like a finished one
        assert info["_prompt_index"].tolist() == [False, True, False] and obs["attention_mask"][1].sum() > 0
    else:  # with autoreset disabled it waits for an explicit reset, frozen
        assert "_prompt_index" not in info and obs["attention_mask"][1].sum() == 0
    assert rewards[1] == 0.0 and not terminations[1] and not truncations[1]


def test_logprobs_that_carry_autograd_are_read_as_numbers(make_vec_env, tokenizer):
    """An agent may pass its policy's output straight in: the env must not keep (or return) its graph."""
    envs, twin = make_vec_env(num_envs=2, max_new_tokens=2), make_vec_env(num_envs=2, max_new_tokens=2)
    envs.reset(seed=0)
    twin.reset(seed=0)
    weight = torch.ones(2, requires_grad=True)  # stands in for a policy parameter
    eos = tokenizer.eos_token_id
    for tokens in ([5, eos], [6, 7], [8, 9]):  # episodes end on every row along the way
        raw = torch.tensor([-1.0, -2.0])
        action = torch.tensor(tokens)
        out = envs.step(TokenActions(action, raw * weight))
        expected = twin.step(TokenActions(action, raw))
        assert not out[1].requires_grad
        torch.testing.assert_close(out[1], expected[1], atol=0, rtol=0)
        assert_info_equal(out[4], expected[4])
    envs.reset(seed=1)  # and later episodes, with bare actions, still end normally
    for _ in range(2):
        _, rewards, _, _, info = envs.step(torch.tensor([5, 6]))
        assert not rewards.requires_grad
    assert info["_completion"].all()  # both truncated after max_new_tokens = 2
    assert weight.grad is None


def padded_vocab_reference(tokenizer, extra=8):
    """A reference whose output layer is padded beyond the tokenizer, as many released models are."""
    model = tiny_gpt2(tokenizer, seed=1)
    model.resize_token_embeddings(len(tokenizer) + extra)
    return model


def test_ids_beyond_the_tokenizer_are_actions_that_decode_to_no_text(make_env, tokenizer):
    """action_vocab="model" (the default): every row of the model's output layer is an action."""
    env = make_env(reference=padded_vocab_reference(tokenizer), max_new_tokens=2)
    assert env.action_space == gym.spaces.Discrete(len(tokenizer) + 8)
    obs, _ = env.reset(seed=0, options={"prompt_index": 0})
    padding_id = len(tokenizer) + 3
    obs, reward, *_ = env.step(padding_id)
    assert obs["input_ids"][3] == padding_id and reward < 0  # observed, and the reference's log-prob paid
    *_, info = env.step(tokenizer.convert_tokens_to_ids("good"))
    assert info["completion"]["response"].split() == ["good"]  # but the reward model never sees it


def test_action_vocab_tokenizer_rejects_ids_the_tokenizer_cannot_decode(make_env, make_vec_env, tokenizer):
    reference = padded_vocab_reference(tokenizer)
    env = make_env(reference=reference, action_vocab="tokenizer")
    assert env.action_space == gym.spaces.Discrete(len(tokenizer))
    assert env.observation_space["input_ids"].high.max() == len(tokenizer) - 1
    env.reset(seed=0)
    with pytest.raises(
        ValueError, match=rf"out of the vocabulary \[0, {len(tokenizer)}\).*action_vocab='tokenizer'"
    ):
        env.step(len(tokenizer) + 3)
    env.step(5)  # and the env is still usable
    envs = make_vec_env(num_envs=2, reference=reference, action_vocab="tokenizer")
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"sub-envs \[1\]"):
        envs.step(torch.tensor([5, len(tokenizer)]))
    with pytest.raises(ValueError, match="action_vocab"):
        make_env(action_vocab="vocab")


def test_a_time_limit_shorter_than_max_new_tokens_cuts_before_the_reward_model_pays(
    tokenizer, gpt2, reward_fn
):
    """Documented sharp edge: gymnasium.make's max_episode_steps is a TimeLimit outside the env."""
    env = made(tokenizer, gpt2, reward_fn, max_episode_steps=2)  # max_new_tokens=4
    env.reset(seed=0)
    env.step(5)
    _, _, terminated, truncated, info = env.step(6)
    assert truncated and not terminated and "completion" not in info  # cut, never scored
    env = made(tokenizer, gpt2, reward_fn, max_episode_steps=4)  # equal to max_new_tokens: harmless
    env.reset(seed=0)
    for token in (5, 6, 7, 8):
        _, _, _, truncated, info = env.step(token)
    assert truncated and "score" in info["completion"]
    with pytest.raises(ValueError, match="max_new_tokens"):  # make_vec hands it to the env: say what to use
        gym.make_vec(
            "llm_env/TextGen-v0", num_envs=2, prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn,
            max_episode_steps=2,
        )  # fmt: skip
