"""Multi-turn episodes (llm_env.multiturn): a responder answers the agent's turns, its reply joins the context.

Checked by hand against one full forward pass of the reference over the whole conversation (replies in the
context, the KL only at the agent's positions), by Gymnasium's and SB3's checkers, against SyncVectorEnv,
and on the failure paths (a responder that raises, replies too long for the context, turn limits)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import llm_env
from llm_env import TokenActions
from llm_env.multiturn import Conversation, Reply, ReplyRenderer, Transcript
from llm_env.tiny import chat_tokenizer, numbered_tokenizer, tiny_causal_lm, tiny_gpt2

VOCAB = 40
EOS = 1
PROMPTS = ["w5 w6", "w7 w8 w9 w10", "w11", "w12 w13 w14"]
BETA = 0.1


@pytest.fixture(scope="module")
def tok():
    return numbered_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def ref(tok):
    return tiny_causal_lm("llama", tok, seed=0)


def scripted_responder(conversation: Conversation) -> Reply | None:
    """Answers with as many words as the agent's turn had tokens (capped), ends after three agent turns;
    pays 0.5 per turn. Stateless: everything it needs is in the conversation."""
    n = len(conversation.agent_turns)
    if n >= 3:
        return Reply(None, reward=1.0)
    words = " ".join(f"w{20 + i}" for i in range(min(4, len(conversation.turns[-1].token_ids))))
    return Reply(words, reward=0.5)


def length_reward(prompts, responses):
    return [float(len(r.split())) / 10 for r in responses]


def make_vec(tok, ref, num_envs=3, **kwargs):
    options = dict(
        prompts=PROMPTS,
        tokenizer=tok,
        reference=ref,
        reward=length_reward,
        kl_coef=BETA,
        max_new_tokens=24,
        responder=scripted_responder,
        device="cpu",
    )
    options.update(kwargs)
    return llm_env.TextGenVectorEnv(num_envs=num_envs, **options)


def full_ref_logprobs(model, contexts):
    width = max(map(len, contexts))
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    mask = torch.zeros(len(contexts), width, dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    last = torch.tensor([len(c) - 1 for c in contexts])
    return torch.log_softmax(logits[torch.arange(len(contexts)), last], dim=-1)


def actions(rng, batch):
    tokens = rng.integers(3, VOCAB, size=batch)
    tokens[rng.random(batch) < 0.3] = EOS
    return torch.as_tensor(tokens), torch.as_tensor(-rng.uniform(0.5, 4.0, size=batch), dtype=torch.float32)


def test_rewards_equal_a_full_forward_pass_over_the_conversation(tok, ref):
    """r_t = -beta * (logp - log pi_ref(a_t | whole context, replies included)) on every agent token, plus
    the reply's per-turn reward on the turn's last token and the final score on the episode's last."""
    envs = make_vec(tok, ref, autoreset_mode=AutoresetMode.NEXT_STEP)
    obs, _ = envs.reset(seed=0)
    rng = np.random.default_rng(0)
    ended = np.zeros(3, dtype=bool)
    replies = finished = 0
    for _ in range(80):
        contexts = [ids[m.bool()].tolist() for ids, m in zip(obs["input_ids"], obs["attention_mask"])]
        ref_lp = full_ref_logprobs(ref, contexts)
        tokens, logprobs = actions(rng, 3)
        obs_next, reward, term, trunc, info = envs.step(TokenActions(tokens, logprobs))
        for row in range(3):
            if ended[row]:  # the autoreset step
                assert reward[row] == 0
                continue
            expected = -BETA * (logprobs[row] - ref_lp[row, tokens[row]])
            if tokens[row] == EOS:
                conv_turns = None
                if "_reply" in info and info["_reply"][row]:
                    expected += 0.5
                    replies += 1
                    n = len(info["injected_ids"][row])
                    # The reply's tokens follow the agent's stop token in the next observation.
                    length = int(obs_next["attention_mask"][row].sum())
                    assert obs_next["input_ids"][row, length - n : length].tolist() == list(
                        info["injected_ids"][row]
                    )
                    assert obs_next["input_ids"][row, length - n - 1] == EOS
                    assert obs_next["agent_mask"][row, length - n - 1 : length].tolist() == [1] + [0] * n
                else:
                    conv_turns = info["completion"]["turns"][row]
                    expected += 1.0 if conv_turns == 3 and term[row] else 0.5
            if "_completion" in info and info["_completion"][row]:
                expected += info["completion"]["score"][row]
                finished += 1
            assert abs(float(reward[row]) - float(expected)) < 1e-4, (row, reward[row], expected)
        ended = (term | trunc).numpy()
        obs = obs_next
    assert replies >= 5 and finished >= 3


def test_the_agent_mask_marks_exactly_the_agents_tokens(tok, ref):
    envs = make_vec(tok, ref, num_envs=2, autoreset_mode=AutoresetMode.DISABLED)
    obs, _ = envs.reset(seed=1)
    rng = np.random.default_rng(1)
    placed = [[], []]
    prompt_len = obs["attention_mask"].sum(1).tolist()
    done = np.zeros(2, dtype=bool)
    while not done.all():
        before = obs["attention_mask"].sum(1).tolist()
        tokens, logprobs = actions(rng, 2)
        obs, _, term, trunc, info = envs.step(TokenActions(tokens, logprobs))
        for row in range(2):
            if not done[row]:
                placed[row].append(before[row])
        done |= (term | trunc).numpy()
    for row in range(2):
        agent = np.flatnonzero(obs["agent_mask"][row].numpy()).tolist()
        assert agent == placed[row]
        assert min(agent) == prompt_len[row]
        conversation = info["completion"]["conversation"][row] if info["_completion"][row] else None
        if conversation is not None:
            assert (
                sum(len(t.token_ids) for t in conversation.turns)
                == int(obs["attention_mask"][row].sum()) - prompt_len[row]
            )


def test_single_turn_is_unchanged_when_the_responder_always_ends(tok, ref):
    """A responder returning None gives the single-turn environment's rewards and observations back."""
    runs = []
    for responder in (None, lambda conversation: None):
        envs = make_vec(tok, ref, num_envs=2, responder=responder)
        obs, _ = envs.reset(seed=3)
        rng = np.random.default_rng(3)
        trace = []
        for _ in range(30):
            obs, reward, term, trunc, info = envs.step(TokenActions(*actions(rng, 2)))
            trace.append((obs["input_ids"].clone(), reward.clone(), term.clone(), trunc.clone()))
        runs.append(trace)
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_vector_env_equals_sync_vector_env_over_autoresets(tok, ref):
    """Rows in different turns, restarting at different steps: the native vector env equals
    SyncVectorEnv over single environments, observation for observation (agent masks included)."""
    kwargs = dict(
        prompts=PROMPTS,
        tokenizer=tok,
        reference=ref,
        reward=length_reward,
        kl_coef=BETA,
        max_new_tokens=14,
        responder=scripted_responder,
        device="cpu",
    )
    native = llm_env.TextGenVectorEnv(num_envs=3, **kwargs)
    sync = gym.vector.SyncVectorEnv([lambda: llm_env.TextGenEnv(**kwargs) for _ in range(3)])
    obs_n, _ = native.reset(seed=5)
    obs_s, _ = sync.reset(seed=5)
    rng = np.random.default_rng(5)
    turns_seen = set()
    for _ in range(60):
        for key in ("input_ids", "attention_mask", "agent_mask"):
            np.testing.assert_array_equal(obs_n[key].numpy(), obs_s[key])
        tokens, _ = actions(rng, 3)  # bare tokens: SyncVectorEnv splits arrays, not TokenActions
        obs_n, r_n, te_n, tr_n, info_n = native.step(tokens)
        obs_s, r_s, te_s, tr_s, info_s = sync.step(tokens.numpy())
        np.testing.assert_allclose(r_n.numpy(), r_s, atol=1e-5)
        np.testing.assert_array_equal(te_n.numpy(), te_s)
        np.testing.assert_array_equal(tr_n.numpy(), tr_s)
        for key in ("reply", "injected_ids", "_reply"):
            assert (key in info_n) == (key in info_s)
            if key in info_n:
                assert list(info_n[key]) == list(info_s[key])
        if "completion" in info_n:
            np.testing.assert_array_equal(info_n["completion"]["turns"], info_s["completion"]["turns"])
            turns_seen.update(info_n["completion"]["turns"][info_n["_completion"]].tolist())
    assert len(turns_seen) >= 2  # episodes of different numbers of turns were compared


def test_gymnasium_and_sb3_check_env(tok, ref):
    env = llm_env.TextGenEnv(
        prompts=PROMPTS,
        tokenizer=tok,
        reference=ref,
        reward=length_reward,
        max_new_tokens=12,
        responder=scripted_responder,
        device="cpu",
    )
    check_env(env, skip_render_check=True)
    assert "agent_mask" in env.observation_space.spaces
    sb3 = pytest.importorskip("stable_baselines3.common.env_checker")
    sb3.check_env(env, warn=True)


def test_a_responder_that_raises_leaves_the_environment_as_it_was(tok, ref):
    calls = {"n": 0}

    def flaky(conversation):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("tool crashed")
        return scripted_responder(conversation)

    envs = make_vec(tok, ref, num_envs=2, responder=flaky)
    twin = make_vec(tok, ref, num_envs=2)
    obs, _ = envs.reset(seed=7)
    twin.reset(seed=7)
    rng = np.random.default_rng(7)
    raised = False
    for _ in range(40):
        tokens, logprobs = actions(rng, 2)
        try:
            obs, reward, term, trunc, _ = envs.step(TokenActions(tokens, logprobs))
        except RuntimeError as exc:
            assert "responder raised KeyError('tool crashed')" in str(exc) and "as it was" in str(exc)
            raised = True
            obs, reward, term, trunc, _ = envs.step(TokenActions(tokens, logprobs))  # the same step again
        expected = twin.step(TokenActions(tokens, logprobs))
        assert torch.equal(obs["input_ids"], expected[0]["input_ids"])
        assert torch.allclose(reward, expected[1], atol=1e-5)
    assert raised


def test_a_reply_longer_than_the_remaining_context_truncates(tok, ref):
    long = " ".join(f"w{i}" for i in range(3, 33))  # 30 tokens never fit a 12-token budget
    env = llm_env.TextGenEnv(
        prompts=PROMPTS,
        tokenizer=tok,
        reference=ref,
        reward=length_reward,
        max_new_tokens=12,
        responder=lambda c: Reply(long, reward=0.25),
        device="cpu",
    )
    obs, _ = env.reset(seed=0, options={"prompt_index": 0})
    env.step(TokenActions(7, -1.0))
    obs, reward, terminated, truncated, info = env.step(TokenActions(EOS, -1.0))
    assert truncated and not terminated
    assert "reply" not in info and info["completion"]["turns"] == 1
    assert obs["attention_mask"].sum() == 2 + 2  # nothing was injected
    assert env.batch.tokens.shape[1] == env.max_length + 1


def test_a_reply_that_fits_leaves_room_for_the_agent(tok, ref):
    """A reply is injected only when one agent token still fits after it; then the budget truncates."""
    env = llm_env.TextGenEnv(
        prompts=["w5"],
        tokenizer=tok,
        reference=ref,
        reward=length_reward,
        max_new_tokens=6,
        responder=lambda c: "w20 w21 w22 w23",
        device="cpu",
    )
    env.reset(seed=0)
    obs, _, terminated, truncated, info = env.step(TokenActions(EOS, -1.0))
    assert not (terminated or truncated) and info["injected_ids"] == (20, 21, 22, 23)
    assert obs["agent_mask"][:6].tolist() == [0, 1, 0, 0, 0, 0]
    obs, _, terminated, truncated, info = env.step(TokenActions(9, -1.0))
    assert truncated and not terminated and info["completion"]["length"] == 2  # agent tokens
    assert info["completion"]["response"].split() == ["w20", "w21", "w22", "w23", "w9"]


def test_max_turns_truncates_after_the_last_answer(tok, ref):
    env = llm_env.TextGenEnv(
        prompts=["w5"],
        tokenizer=tok,
        reference=ref,
        reward=length_reward,
        max_new_tokens=30,
        max_turns=2,
        responder=lambda c: Reply("w20", reward=1.0),
        kl_coef=0.0,
        device="cpu",
    )
    env.reset(seed=0)
    _, r1, te, tr, _ = env.step(EOS)
    assert not (te or tr) and r1 == pytest.approx(1.0)
    _, r2, te, tr, info = env.step(EOS)
    assert tr and not te
    assert info["completion"]["turns"] == 2
    assert r2 == pytest.approx(1.0 + info["completion"]["score"])  # the last answer is paid too
    with pytest.raises(ValueError, match="max_turns needs a responder"):
        llm_env.EnvConfig(prompts=["w5"], tokenizer=tok, reward=length_reward, max_turns=2)


def test_bad_replies_are_named(tok, ref):
    for bad, error, message in [
        (lambda c: 3, TypeError, "must return a Reply, a str or None, got int"),
        (lambda c: Reply("w20", reward=float("nan")), ValueError, "finite number"),
    ]:
        env = llm_env.TextGenEnv(
            prompts=["w5"], tokenizer=tok, reference=ref, reward=length_reward, responder=bad, device="cpu"
        )
        env.reset(seed=0)
        with pytest.raises(RuntimeError, match=message) as info:
            env.step(EOS)
        assert isinstance(info.value.__cause__, error)
        obs, *_ = env.step(7)  # still usable
        assert obs["attention_mask"].sum() == 2


def test_the_reward_source_sees_the_transcript_and_the_conversation(tok, ref):
    seen = {}

    def reward(prompts, responses):
        seen["responses"] = list(responses)
        return [0.0] * len(responses)

    env = llm_env.TextGenEnv(
        prompts=["w5"],
        tokenizer=tok,
        reference=ref,
        reward=reward,
        responder=scripted_responder,
        device="cpu",
    )
    env.reset(seed=0)
    for token in (7, EOS, 8, EOS, EOS):
        *_, info = env.step(token)
    (transcript,) = seen["responses"]
    assert isinstance(transcript, Transcript)
    assert transcript.split() == ["w7", "w20", "w21", "w8", "w20", "w21"]
    assert [t.role for t in transcript.conversation.turns] == ["assistant", "user"] * 2 + ["assistant"]
    assert transcript.conversation.agent_turns == ["w7", "w8", ""]


def test_chat_replies_are_framed_by_the_template():
    tok = chat_tokenizer(["guess higher lower the number is"])
    renderer = ReplyRenderer(tok, chat=True)
    before, after = renderer.frame("user")
    assert before == "\n<|im_start|>user\n" and after == "<|im_end|>\n<|im_start|>assistant\n"
    ids = renderer(Reply("higher"))
    assert tok.decode(ids).split() == [
        "<|im_start|>",
        "user",
        "higher",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
    ]
    model = tiny_gpt2(tok, seed=0)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    env = llm_env.TextGenVectorEnv(
        num_envs=1,
        prompts=[[{"role": "user", "content": "guess the number"}]],
        tokenizer=tok,
        reference=model,
        reward=lambda p, r: [0.0] * len(r),
        responder=lambda c: "higher",
        device="cpu",
        max_new_tokens=30,
    )
    assert eot in env.stop_token_ids
    obs, _ = env.reset(seed=0)
    number = tok.convert_tokens_to_ids("number")
    for token in (number, eot):
        obs, *_ = env.step(torch.tensor([token]))
    length = int(obs["attention_mask"][0].sum())
    text = tok.decode(obs["input_ids"][0, :length])
    assert text.split()[-8:] == [
        "number",
        "<|im_end|>",
        "<|im_start|>",
        "user",
        "higher",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
    ]


def test_same_seed_same_conversations(tok, ref):
    runs = []
    for _ in range(2):
        envs = make_vec(tok, ref, num_envs=2)
        envs.reset(seed=11)
        rng = np.random.default_rng(11)
        rewards = [envs.step(TokenActions(*actions(rng, 2)))[1] for _ in range(40)]
        runs.append(torch.stack(rewards))
    assert torch.equal(*runs)
