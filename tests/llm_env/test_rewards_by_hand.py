"""Per-token rewards recomputed by hand from separate full forwards of the policy and the reference."""

import math
import warnings

import numpy as np
import pytest
import torch

import llm_env
from llm_env import TokenActions


def policy_step(policy, obs, generator):
    """Sample a token from ``policy`` by a full forward over the observation (no cache): (token, logprob)."""
    length = int(obs["attention_mask"].sum())
    ids = torch.as_tensor(obs["input_ids"][:length])[None]
    with torch.no_grad():
        logp = policy(ids).logits[0, -1].float().log_softmax(-1)
    token = int(torch.multinomial(logp.exp(), 1, generator=generator))
    return token, float(logp[token])


def reference_logprobs(reference, prompt_ids, response_ids):
    sequence = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = reference(sequence).logits[0].float().log_softmax(-1)
    start = len(prompt_ids) - 1
    return [float(logp[start + t, tok]) for t, tok in enumerate(response_ids)]


def estimator(d, kind):
    return {"k1": d, "k2": 0.5 * d * d, "k3": math.expm1(-d) + d}[kind]


def run(env, policy, *, eos_at=None, seed=0, with_logprobs=True):
    generator = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    prompt_ids = obs["input_ids"][: int(obs["attention_mask"].sum())].tolist()
    tokens, logprobs, rewards = [], [], []
    eos = env.unwrapped.tokenizer.eos_token_id
    while True:
        token, logprob = policy_step(policy, obs, generator)
        if token == eos and len(tokens) != eos_at:
            token = (eos + 3) % env.action_space.n  # keep EOS for the step where we force it
            length = int(obs["attention_mask"].sum())
            with torch.no_grad():
                lp = (
                    policy(torch.as_tensor(obs["input_ids"][:length])[None])
                    .logits[0, -1]
                    .float()
                    .log_softmax(-1)
                )
            logprob = float(lp[token])
        if eos_at is not None and len(tokens) == eos_at:
            length = int(obs["attention_mask"].sum())
            with torch.no_grad():
                lp = (
                    policy(torch.as_tensor(obs["input_ids"][:length])[None])
                    .logits[0, -1]
                    .float()
                    .log_softmax(-1)
                )
            token, logprob = eos, float(lp[eos])
        action = TokenActions(token, logprob) if with_logprobs else token
        obs, reward, terminated, truncated, info = env.step(action)
        tokens.append(token)
        logprobs.append(logprob)
        rewards.append(reward)
        if terminated or truncated:
            return prompt_ids, tokens, logprobs, rewards, terminated, truncated, info


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("ending", ["eos", "truncation"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_per_token_rewards_match_hand_computation(
    arch, ending, kind, request, tokenizer, gpt2_policy, reward_fn
):
    reference = request.getfixturevalue(arch)
    beta, penalty = 0.1, 0.25
    env = llm_env.TextGenEnv(
        prompts=["the film was", "a great movie"],
        tokenizer=tokenizer,
        reward=reward_fn,
        reference=reference,
        kl_coef=beta,
        kl_estimator=kind,
        max_new_tokens=6,
        missing_eos_penalty=penalty,
    )
    eos_at = 3 if ending == "eos" else None
    prompt_ids, tokens, logprobs, rewards, terminated, truncated, info = run(env, gpt2_policy, eos_at=eos_at)
    assert (terminated, truncated) == ((True, False) if ending == "eos" else (False, True))
    assert len(tokens) == (4 if ending == "eos" else 6)

    ref_lp = reference_logprobs(reference, prompt_ids, tokens)
    completion = info["completion"]
    prompt_text = tokenizer.decode(prompt_ids)
    response_text = tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)[len(prompt_text) :]
    score = reward_fn([prompt_text], [response_text])[0]
    expected = [-beta * estimator(lp - rl, kind) for lp, rl in zip(logprobs, ref_lp)]
    expected[-1] += score - (penalty if ending == "truncation" else 0.0)  # on the last token, not one past it

    np.testing.assert_allclose(rewards, expected, atol=1e-5, rtol=0)
    assert completion["score"] == pytest.approx(score)
    assert completion["response"] == response_text
    assert completion["length"] == len(tokens)
    assert completion["eos"] is (ending == "eos")
    assert completion["kl"] == pytest.approx(
        sum(estimator(lp - rl, kind) for lp, rl in zip(logprobs, ref_lp)), abs=1e-5
    )
    assert completion["return"] == pytest.approx(sum(expected), abs=1e-5)


def test_without_logprobs_the_reward_is_beta_times_reference_logprob(tokenizer, gpt2, gpt2_policy, reward_fn):
    """A plain action (e.g. from SB3) gets r_t = beta * log pi_ref(a_t|s_t); the entropy half is the agent's."""
    beta = 0.2
    env = llm_env.TextGenEnv(
        prompts=["the film was"],
        tokenizer=tokenizer,
        reward=reward_fn,
        reference=gpt2,
        kl_coef=beta,
        max_new_tokens=5,
    )
    prompt_ids, tokens, _, rewards, _, _, info = run(env, gpt2_policy, with_logprobs=False)
    ref_lp = reference_logprobs(gpt2, prompt_ids, tokens)
    prompt_text = tokenizer.decode(prompt_ids)
    response_text = tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)[len(prompt_text) :]
    expected = [beta * rl for rl in ref_lp]
    expected[-1] += reward_fn([prompt_text], [response_text])[0]
    np.testing.assert_allclose(rewards, expected, atol=1e-5, rtol=0)
    assert "kl" not in info["completion"]  # unknown without the policy's log-probabilities


def test_without_reference_only_the_final_score_is_rewarded(tokenizer, gpt2_policy, reward_fn):
    env = llm_env.TextGenEnv(
        prompts=["the film was"], tokenizer=tokenizer, reward=reward_fn, max_new_tokens=5
    )
    assert env.kl_coef == 0.0
    _, tokens, _, rewards, _, _, info = run(env, gpt2_policy)
    assert rewards[:-1] == [0.0] * (len(tokens) - 1)
    assert rewards[-1] == pytest.approx(info["completion"]["score"])
    assert "kl" not in info["completion"]


def test_kl_coef_can_change_between_steps(make_env, gpt2, gpt2_policy):
    env = make_env(kl_coef=0.1)
    generator = torch.Generator().manual_seed(0)
    obs, _ = env.reset(seed=0)
    token, logprob = policy_step(gpt2_policy, obs, generator)
    _, r1, *_ = env.step(TokenActions(token, logprob))
    env.kl_coef = 0.3
    prompt_ids = obs["input_ids"][: int(obs["attention_mask"].sum())].tolist()
    obs2, _ = env.reset(seed=0)
    _, r2, *_ = env.step(TokenActions(token, logprob))
    assert r2 == pytest.approx(3 * r1, rel=1e-5)
    assert prompt_ids == obs2["input_ids"][: int(obs2["attention_mask"].sum())].tolist()
    with pytest.raises(ValueError, match="kl_coef"):
        env.kl_coef = -1.0


@pytest.mark.parametrize(("kind", "warns"), [("k1", False), ("k2", True), ("k3", True)])
def test_estimators_whose_reward_gradient_is_not_the_kls_warn(kind, warns, tokenizer, gpt2, reward_fn):
    """The environment pays the KL as a reward: only k1's score-function gradient is grad KL (the exact
    expectations are in tests/agents/test_kl_gradients.py); k2 and k3 still run, with a warning."""
    options = dict(prompts=["the film was"], tokenizer=tokenizer, reference=gpt2, reward=reward_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm_env.TextGenEnv(kl_estimator=kind, **options)
        llm_env.TextGenEnv(kl_estimator=kind, kl_coef=0.0, **options)  # no penalty paid: nothing to warn
    biased = [w for w in caught if issubclass(w.category, llm_env.kl.KLGradientBiasWarning)]
    assert len(biased) == int(warns)
    if warns:
        assert "kl_estimator='k1'" in str(biased[0].message)
        assert biased[0].filename == __file__  # the user's line, not the library's
