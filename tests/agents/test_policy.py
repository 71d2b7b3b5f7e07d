"""The agents' LM plumbing: cached sampling, teacher-forced scoring, the LoRA reference."""

import copy

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import llm_env
from agents.policy import Critic, SequenceBatch, TokenSampler, ValueHead, add_lora, response_forward
from llm_env.tiny import tiny_gpt2, tiny_llama


def full_forward_logprob(model, ids, token, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)[None]).logits[0, -1].float() / temperature
    return float(logits.log_softmax(-1)[token])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_full_forward_across_restarts(
    tokenizer, task_prompts, task_reward, temperature
):
    policy = tiny_gpt2(tokenizer, seed=5)
    env = llm_env.TextGenVectorEnv(
        num_envs=3, prompts=task_prompts, tokenizer=tokenizer, reward=task_reward, max_new_tokens=3
    )
    sampler = TokenSampler(policy, temperature=temperature, generator=torch.Generator().manual_seed(0))
    obs, _ = env.reset(seed=0)
    restarted = np.ones(3, dtype=bool)
    for _ in range(8):  # several episodes per row: autoresets in the middle
        action = sampler.act(obs, restarted)
        for row in range(3):
            length = int(obs["attention_mask"][row].sum())
            expected = full_forward_logprob(
                policy, obs["input_ids"][row, :length], int(action.tokens[row]), temperature
            )
            assert float(action.logprobs[row]) == pytest.approx(expected, abs=1e-5)
        obs, _, _, _, info = env.step(action)
        restarted = info.get("_prompt_index", np.zeros(3, dtype=bool))


def test_sequence_batch_scores_every_response_token(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    prompts, responses = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    batch = SequenceBatch.build(prompts, responses, pad_id=0, device="cpu")
    assert batch.positions.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert batch.response_mask.tolist() == [[True, True, False], [True, True, True]]
    head = ValueHead(32)
    torch.nn.init.normal_(head.linear.weight)
    with torch.no_grad():
        scores = response_forward(model, batch, value_head=head, entropy=True)
    for n, (p, r) in enumerate(zip(prompts, responses)):
        for j, token in enumerate(r):
            assert float(scores.logprobs[n, j]) == pytest.approx(
                full_forward_logprob(model, p + r[:j], token), abs=1e-5
            )
            with torch.no_grad():
                hidden = model(torch.tensor([p + r[:j]]), output_hidden_states=True).hidden_states[-1][0, -1]
            assert float(scores.values[n, j]) == pytest.approx(float(head(hidden).detach()), abs=1e-5)
    assert float(scores.logprobs[0, 2]) == 0.0 and float(scores.entropy[0, 2]) == 0.0  # padding
    assert (scores.entropy[batch.response_mask] > 0).all()


def test_lora_adapter_disabled_reference_equals_a_frozen_copy_of_the_base(tokenizer):
    """The PPO reference with LoRA is the base under disable_adapter(): same log-probs as a separate copy."""
    base = tiny_gpt2(tokenizer, seed=6)
    frozen = copy.deepcopy(base)
    policy = add_lora(base, rank=4)
    with torch.no_grad():  # move the adapters away from their zero init, as training would
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    batch = SequenceBatch.build([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], pad_id=0, device="cpu")
    with torch.no_grad():
        with policy.disable_adapter():
            reference = response_forward(policy, batch).logprobs
        separate = response_forward(frozen, batch).logprobs
        adapted = response_forward(policy, batch).logprobs
    torch.testing.assert_close(reference, separate, atol=1e-6, rtol=0)
    assert not torch.allclose(adapted, separate)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_sequence_batch_rejects_empty_examples():
    with pytest.raises(ValueError, match="empty response"):
        SequenceBatch.build([[1, 2]], [[]], pad_id=0, device="cpu")
    with pytest.raises(ValueError, match="as many prompts as responses"):
        SequenceBatch.build([[1]], [[2], [3]], pad_id=0, device="cpu")


def test_disabled_mode_env_is_usable_for_sampling(tokenizer, task_prompts, task_reward):
    env = llm_env.TextGenVectorEnv(
        num_envs=2,
        prompts=task_prompts,
        tokenizer=tokenizer,
        reward=task_reward,
        max_new_tokens=2,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    sampler = TokenSampler(tiny_gpt2(tokenizer), greedy=True)
    obs, _ = env.reset(seed=0)
    first = sampler.act(obs, np.ones(2, dtype=bool))
    obs2, _ = env.reset(seed=0)
    sampler2 = TokenSampler(tiny_gpt2(tokenizer), greedy=True)
    assert torch.equal(
        sampler2.act(obs2, np.ones(2, dtype=bool)).tokens, first.tokens
    )  # greedy is deterministic


def tight_policy(arch, tokenizer, context):
    """A policy whose context is exactly the observation length (see tests/llm_env/test_frozen_rows.py)."""
    if arch == "gpt2":
        return tiny_gpt2(tokenizer, seed=5, n_positions=context)
    return tiny_llama(
        tokenizer,
        seed=5,
        max_position_embeddings=context,
        initializer_range=0.2,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )


def assert_logprobs_match_full_forward(policy, obs, action, rows):
    for row in rows:
        length = int(obs["attention_mask"][row].sum())
        expected = full_forward_logprob(policy, obs["input_ids"][row, :length], int(action.tokens[row]))
        assert float(action.logprobs[row]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampler_does_not_decode_rows_the_env_resets(arch, tokenizer, task_prompts, task_reward):
    """NEXT_STEP: a row that ended is reset one step later; the sampler must not decode it past its end."""
    env = llm_env.TextGenVectorEnv(
        num_envs=3, prompts=task_prompts, tokenizer=tokenizer, reward=task_reward, max_new_tokens=3
    )
    policy = tight_policy(arch, tokenizer, env.max_length)
    sampler = TokenSampler(policy, generator=torch.Generator().manual_seed(0))
    restarted = np.array([True, False, True])  # row 1 starts one step later: the rows' episodes interleave
    obs, _ = env.reset(seed=0, options={"reset_mask": restarted})
    for _ in range(12):
        action = sampler.act(obs, restarted)
        assert_logprobs_match_full_forward(policy, obs, action, np.flatnonzero(obs["attention_mask"].sum(1)))
        obs, _, _, _, info = env.step(action)
        restarted = info.get("_prompt_index", np.zeros(3, dtype=bool))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampler_keeps_frozen_rows_in_place(arch, tokenizer, task_prompts, task_reward):
    """DISABLED: a finished row waits (here 10 steps) for its reset while the other row keeps going."""
    env = llm_env.TextGenVectorEnv(
        num_envs=2, prompts=task_prompts, tokenizer=tokenizer, reward=task_reward, max_new_tokens=3,
        autoreset_mode=AutoresetMode.DISABLED,
    )  # fmt: skip
    policy = tight_policy(arch, tokenizer, env.max_length)
    sampler = TokenSampler(policy, generator=torch.Generator().manual_seed(0))
    obs, _ = env.reset(seed=0)
    restarted, running = np.ones(2, dtype=bool), np.ones(2, dtype=bool)
    frozen_length = None
    for step in range(16):
        action = sampler.act(obs, restarted)
        assert_logprobs_match_full_forward(policy, obs, action, np.flatnonzero(running))
        if running[0]:
            frozen_length = None
        else:  # the frozen row's cache does not move while it waits
            frozen_length = int(sampler.lm.length[0]) if frozen_length is None else frozen_length
            assert int(sampler.lm.length[0]) == frozen_length == int(obs["attention_mask"][0].sum())
        obs, _, terminations, truncations, _ = env.step(action)
        running &= ~(terminations | truncations).numpy()
        restarted = np.array([step == 12, not running[1]])  # row 1 restarts at once, row 0 much later
        if restarted.any():
            obs, _ = env.reset(options={"reset_mask": restarted})
            running |= restarted


def _rm_dir(path, tokenizer, *, stats=None, seed=4):
    """A tiny GPT-2 reward model saved with its tokenizer (and ``reward_model.json`` when ``stats``)."""
    from rewards import RewardModel  # the reward models' own writer, as the benchmark saves them

    model = tiny_gpt2(tokenizer, seed=seed, classifier=True)
    if stats is None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        RewardModel(model, tokenizer, stats=stats).save_pretrained(path)
    return model


@pytest.mark.parametrize("with_stats", [False, True])
def test_critic_values_are_the_reward_models_scores_of_every_prefix(tokenizer, tmp_path, with_stats):
    from llm_env.reward import ScoreStats, sequence_scores

    stats = ScoreStats(mean=0.5, std=2.0) if with_stats else None
    rm = _rm_dir(tmp_path, tokenizer, stats=stats).eval()
    critic = Critic.from_reward_model(tmp_path, tokenizer=tokenizer, device="cpu").eval()
    prompts = [tokenizer("the film was")["input_ids"], tokenizer("a")["input_ids"]]
    responses = [tokenizer(" good and great")["input_ids"], tokenizer(" movie")["input_ids"]]
    batch = SequenceBatch.build(prompts, responses, pad_id=0, device="cpu")
    with torch.no_grad():
        values = critic(batch)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for t in range(len(r)):  # V(s_t): the reward model reading the prompt and the first t tokens
                ids = torch.tensor([p + r[:t]])
                score = float(sequence_scores(rm, ids, torch.ones_like(ids)))
                expected = (score - 0.5) / 2.0 if with_stats else score
                assert float(values[i, t]) == pytest.approx(expected, abs=1e-5), (i, t)
            assert torch.all(values[i, len(r) :] == 0)  # padding


def test_critic_refuses_a_reward_model_with_another_vocabulary(tokenizer, tmp_path):
    from llm_env.tiny import word_tokenizer

    other = word_tokenizer(["some other words entirely"])
    _rm_dir(tmp_path, other)
    with pytest.raises(ValueError, match="different vocabulary"):
        Critic.from_reward_model(tmp_path, tokenizer=tokenizer, device="cpu")
