"""Agents on multi-turn episodes: the sampler keeps its KV cache in step with the replies, the collector
keeps the exact tokens and the agent mask, and every loss scores the agent's tokens only (replies are
context), so PPO's ratio starts at 1 and one update of each agent family runs."""

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from peft import LoraConfig, get_peft_model

import llm_env
from agents.grpo import GRPOAgent, GRPOConfig
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig
from agents.policy import SequenceBatch, TokenSampler, response_forward
from agents.ppo import PPOAgent, PPOConfig
from agents.rejection import RejectionSamplingAgent, RejectionSamplingConfig
from agents.rloo import RLOOAgent, RLOOConfig
from agents.rollout import Trajectories, collect_episodes
from agents.sft import SFTConfig, sft_loss
from llm_env import AdapterDisabled
from llm_env.multiturn import Reply
from llm_env.tiny import numbered_tokenizer, tiny_causal_lm

PROMPTS = ["w5 w6", "w7 w8 w9", "w11", "w12 w13 w14 w15"]
STOPS = [1, *range(30, 36)]  # a stop token one draw in seven: turns of different lengths


@pytest.fixture(scope="module")
def tok():
    return numbered_tokenizer(40)


def responder(conversation):
    """Replies with 1-3 words depending on the turn, ends after three turns; 0.1 per turn."""
    n = len(conversation.agent_turns)
    if n >= 3:
        return None
    return Reply(" ".join(["w21", "w22", "w23"][: n + 1]), reward=0.1)


def low_words(prompts, responses):
    return [float(sum(int(w[1:]) < 20 for w in r.split() if w[1:].isdigit())) / 5 for r in responses]


def make_env(tok, num_envs=3, reference=None, **kwargs):
    options = dict(
        prompts=PROMPTS,
        tokenizer=tok,
        reference=reference if reference is not None else tiny_causal_lm("llama", tok, seed=0),
        reward=low_words,
        max_new_tokens=20,
        stop_token_ids=STOPS,
        responder=responder,
        device="cpu",
    )
    return llm_env.TextGenVectorEnv(num_envs=num_envs, **{**options, **kwargs})


def test_sampler_and_collector_keep_the_exact_tokens(tok):
    """The sampler's log-probabilities (its cache extended by each reply) equal one teacher-forced pass over
    the conversation at the agent's positions; the conversation is the environment's own record."""
    policy = tiny_causal_lm("llama", tok, seed=1)
    env = make_env(tok)
    episodes = collect_episodes(env, TokenSampler(policy, seed=0), 8, seed=0)
    assert episodes.multi_turn and episodes.turns.max() >= 2 and len(set(episodes.turns.tolist())) > 1
    lengths = episodes.conversation_lengths()
    assert (lengths > episodes.lengths).any()  # replies are in the conversations
    assert episodes.agent_mask.sum(1).tolist() == episodes.lengths.tolist()
    for n in range(len(episodes)):
        agent_tokens = episodes.conversation_ids[n, : lengths[n]][episodes.agent_mask[n, : lengths[n]]]
        assert agent_tokens.tolist() == episodes.response_list()[n].tolist()
    batch = episodes.sequences(pad_id=env.pad_token_id, device="cpu")
    with torch.no_grad():
        forced = response_forward(policy, batch).logprobs
    torch.testing.assert_close(forced[episodes.mask], episodes.logprobs[episodes.mask], atol=1e-4, rtol=0)
    # Without the replies in the context the log-probabilities differ: they are really conditioned on.
    flat = SequenceBatch.build(episodes.prompt_ids, episodes.response_list(), pad_id=0, device="cpu")
    with torch.no_grad():
        wrong = response_forward(policy, flat).logprobs
    assert (wrong[episodes.mask] - episodes.logprobs[episodes.mask]).abs().max() > 1e-2


def test_selected_and_concatenated_episodes_keep_their_conversations(tok):
    env = make_env(tok, num_envs=2)
    episodes = collect_episodes(env, TokenSampler(tiny_causal_lm("llama", tok, seed=1), seed=0), 4, seed=1)
    part = episodes.select([2, 0])
    assert part.conversation_list()[0][0].tolist() == episodes.conversation_list()[0][2].tolist()
    both = Trajectories.cat([part, episodes.select([1])])
    ids, masks = both.conversation_list()
    assert ids[2].tolist() == episodes.conversation_list()[0][1].tolist()
    assert masks[2].tolist() == episodes.conversation_list()[1][1].tolist()
    assert both.turns.tolist() == [episodes.turns[2], episodes.turns[0], episodes.turns[1]]


def test_fused_sampler_equals_the_unfused_one_across_replies(tok):
    base = tiny_causal_lm("llama", tok, seed=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(base, config)
    runs = []
    for fuse in (False, True):
        env = make_env(tok, reference=AdapterDisabled(policy, fuse=fuse))
        sampler = TokenSampler(policy, seed=0, env=env if fuse else None)
        runs.append(collect_episodes(env, sampler, 6, seed=2))
    a, b = runs
    assert a.conversation_ids.tolist() == b.conversation_ids.tolist()
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.rewards, b.rewards, atol=1e-4, rtol=0)


def test_sft_loss_counts_only_the_agents_tokens(tok):
    model = tiny_causal_lm("llama", tok, seed=1)
    prompt, conversation = [5, 6], [7, 1, 21, 22, 8, 9, 1]
    mask = [True, True, False, False, True, True, True]
    batch = SequenceBatch.build([prompt], [conversation], pad_id=0, device="cpu", agent_masks=[mask])
    assert batch.response_ids[0].tolist() == [7, 1, 8, 9, 1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + conversation])).logits.float()
    logp = torch.log_softmax(logits[0], -1)
    positions = [1 + i for i, m in enumerate(mask) if m]  # the logit before each agent token
    expected = -torch.stack([logp[p, t] for p, t in zip(positions, batch.response_ids[0])]).mean()
    with torch.no_grad():
        assert sft_loss(model, batch).item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="one entry per response token"):
        SequenceBatch.build([prompt], [conversation], pad_id=0, device="cpu", agent_masks=[mask[:-1]])


def _moved(model, before) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("family", ["ppo", "grpo", "rloo"])
def test_one_update_of_each_family_on_conversations(tok, family):
    common = dict(learning_rate=1e-3, kl_coef=0.05, progress=False, seed=0)
    if family == "ppo":
        agent = PPOAgent(
            tiny_causal_lm("llama", tok, seed=1),
            tok,
            PPOConfig(**common, episodes_per_update=4, minibatch_size=4, ppo_epochs=1),
        )
    else:
        cls, cfg = (GRPOAgent, GRPOConfig) if family == "grpo" else (RLOOAgent, RLOOConfig)
        agent = cls(
            tiny_causal_lm("llama", tok, seed=1), tok, cfg(**common, prompts_per_update=2, group_size=2)
        )
    env = agent.make_env(
        PROMPTS,
        low_words,
        num_envs=4,
        max_new_tokens=16,
        stop_token_ids=STOPS,
        responder=responder,
        autoreset_mode=AutoresetMode.DISABLED,
        device="cpu",
    )
    before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    (stats,) = agent.train(env, 1)
    assert np.isfinite(stats["policy_loss"]) and _moved(agent.policy, before)
    # One epoch of one minibatch is on-policy: the teacher-forced log-probabilities at the agent's positions
    # (replies in the context) equal the sampled ones, so the ratio is 1 and the approximate KL 0.
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and abs(stats["approx_kl"]) < 1e-6
    assert stats["response_length"] < stats.get("sampled_tokens", 1e9)


def test_online_dpo_and_rejection_sampling_learn_from_conversations(tok):
    dpo = OnlineDPOAgent(
        tiny_causal_lm("llama", tok, seed=1),
        tok,
        OnlineDPOConfig(prompts_per_update=4, minibatch_size=4, learning_rate=1e-3, progress=False, seed=0),
    )
    env = dpo.make_env(
        PROMPTS,
        low_words,
        num_envs=4,
        max_new_tokens=16,
        stop_token_ids=STOPS,
        responder=responder,
        device="cpu",
    )
    trajectories = dpo.sample(env, np.arange(4), seed=0)
    assert trajectories.multi_turn
    batch, stats = dpo.pairs(trajectories)
    if batch is not None:
        assert int(batch.response_mask.sum()) < int(batch.attention_mask.sum())
        assert int(batch.response_mask.sum()) <= int(trajectories.lengths.sum())
    rs = RejectionSamplingAgent(
        tiny_causal_lm("llama", tok, seed=1),
        tok,
        RejectionSamplingConfig(
            k=2, prompts_per_round=2, sft=SFTConfig(epochs=1, batch_size=2), progress=False
        ),
    )
    env = rs.make_env(
        PROMPTS,
        low_words,
        num_envs=4,
        max_new_tokens=16,
        stop_token_ids=STOPS,
        responder=responder,
        device="cpu",
    )
    rs.run_round(env)
    assert rs.pool and all("agent_mask" in item for item in rs.pool)
    item = rs.pool[0]
    assert len(item["agent_mask"]) == len(item["response_ids"]) and not all(item["agent_mask"])


def test_the_sampler_fills_the_whole_budget_across_many_replies(tok):
    """Every token ends a turn and every turn is answered, until the replies no longer fit: the sampler's
    cache follows the context to its last position (its host bound of each row's end must not drift with
    the replies) and its log-probabilities stay those of a teacher-forced pass."""
    policy = tiny_causal_lm("llama", tok, seed=1)
    env = make_env(tok, stop_token_ids=list(range(40)), responder=lambda c: "w21 w22")
    episodes = collect_episodes(env, TokenSampler(policy, seed=0), 6, seed=0)
    assert episodes.turns.min() >= 6 and (episodes.conversation_lengths() >= 18).all()
    batch = episodes.sequences(pad_id=env.pad_token_id, device="cpu")
    with torch.no_grad():
        forced = response_forward(policy, batch).logprobs
    torch.testing.assert_close(forced[episodes.mask], episodes.logprobs[episodes.mask], atol=1e-4, rtol=0)
