"""Offline DPO / IPO: the losses by hand, the reference term, the data errors, learning on a tiny task, exact
resume."""

import json
import math

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.dpo import (
    DPOAgent,
    DPOConfig,
    dpo_loss,
    load_preference_pairs,
    pair_batch,
    preference_loss,
    sequence_logprobs,
)
from agents.policy import add_lora
from agents.rollout import collect_episodes
from llm_env import TextGenVectorEnv

# Three pairs with given sequence log-probabilities. h = (pc - rc) - (pr - rr):
#   pair 0: (-5.0 + 5.5) - (-6.0 + 5.5) =  0.5 + 0.5 =  1.0
#   pair 1: (-3.0 + 3.0) - (-2.0 + 2.5) =  0.0 - 0.5 = -0.5
#   pair 2: (-7.0 + 6.0) - (-7.5 + 8.0) = -1.0 - 0.5 = -1.5
POLICY_CHOSEN = torch.tensor([-5.0, -3.0, -7.0])
POLICY_REJECTED = torch.tensor([-6.0, -2.0, -7.5])
REF_CHOSEN = torch.tensor([-5.5, -3.0, -6.0])
REF_REJECTED = torch.tensor([-5.5, -2.5, -8.0])
BETA = 0.5


def test_dpo_loss_by_hand_including_the_reference_term():
    loss, stats = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)
    # -log sigmoid(0.5 h) = log(1 + exp(-0.5 h)) for h = 1, -0.5, -1.5:
    # log(1 + e^-0.5) = 0.474077, log(1 + e^0.25) = 0.825939, log(1 + e^0.75) = 1.136871
    assert float(loss) == pytest.approx((0.474077 + 0.825939 + 1.136871) / 3, abs=1e-6)
    assert float(stats["reward_accuracy"]) == pytest.approx(1 / 3)  # only pair 0 has h > 0
    assert float(stats["reward_margin"]) == pytest.approx(0.5 * (1.0 - 0.5 - 1.5) / 3)
    assert float(stats["chosen_reward"]) == pytest.approx(0.5 * (0.5 + 0.0 - 1.0) / 3)
    assert float(stats["rejected_reward"]) == pytest.approx(0.5 * (-0.5 + 0.5 + 0.5) / 3)
    # Without the reference term the log-ratios are 1, -1, 0.5: another loss (so the reference counts).
    no_ref, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, torch.zeros(3), torch.zeros(3), beta=BETA)
    assert float(no_ref) == pytest.approx(
        (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-0.25))) / 3
    )
    # The gradient with respect to log pi(y_w): -beta * sigmoid(-beta h) / N, 0 for the reference.
    chosen = POLICY_CHOSEN.clone().requires_grad_(True)
    dpo_loss(chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)[0].backward()
    h = torch.tensor([1.0, -0.5, -1.5])
    torch.testing.assert_close(chosen.grad, -BETA * torch.sigmoid(-BETA * h) / 3)


def test_ipo_loss_by_hand():
    loss, stats = dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="ipo"
    )
    # (h - 1 / (2 * 0.5))^2 = (h - 1)^2 for h = 1, -0.5, -1.5: 0, 2.25, 6.25
    assert float(loss) == pytest.approx((0.0 + 2.25 + 6.25) / 3)
    # beta = 0.25 moves the target margin to 2: (1 - 2)^2, (-0.5 - 2)^2, (-1.5 - 2)^2 = 1, 6.25, 12.25
    loss, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.25, loss_type="ipo")
    assert float(loss) == pytest.approx((1.0 + 6.25 + 12.25) / 3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.0)


def test_sequence_logprobs_sum_or_average_response_tokens_of_chosen_then_rejected(tokenizer, gpt2):
    batch = pair_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], [[13], [14, 15, 16]], pad_id=0, device="cpu")
    with torch.no_grad():
        total = sequence_logprobs(gpt2, batch)
        mean = sequence_logprobs(gpt2, batch, average=True)
        expected = []
        for prompt, response in (
            ([5, 6, 7], [10, 11]),
            ([8, 9], [12]),
            ([5, 6, 7], [13]),
            ([8, 9], [14, 15, 16]),
        ):
            logp = gpt2(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            expected.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(response)))
    torch.testing.assert_close(total, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        mean, torch.tensor(expected) / torch.tensor([2.0, 1.0, 1.0, 3.0]), atol=1e-5, rtol=0
    )


def test_the_lora_reference_is_the_base_with_the_adapter_disabled(tokenizer, fresh_policy):
    base = fresh_policy()
    batch = pair_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], [[13], [14, 15, 16]], pad_id=0, device="cpu")
    with torch.no_grad():
        expected = sequence_logprobs(base, batch)
    policy = add_lora(base, rank=2)
    with torch.no_grad():  # move the adapters away from zero: the policy now differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loss, stats = preference_loss(policy, None, batch, beta=0.1, loss_type="dpo", average=False)
    with torch.no_grad(), policy.disable_adapter():
        torch.testing.assert_close(sequence_logprobs(policy, batch), expected)
    logps = sequence_logprobs(policy, batch).detach()
    h = (logps[:2] - expected[:2]) - (logps[2:] - expected[2:])
    assert float(loss.detach()) == pytest.approx(
        float(-torch.nn.functional.logsigmoid(0.1 * h).mean()), abs=1e-6
    )
    assert float(stats["chosen_logp"]) == pytest.approx(float(logps[:2].mean()), abs=1e-6)


def test_preference_data_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "the film was", "chosen": " good", "rejected": " bad", "level": "better"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:3: missing field 'rejected'"):
        load_preference_pairs(path)
    path.write_text(json.dumps({**good, "rejected": " good"}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:1: the chosen and rejected responses are identical"):
        load_preference_pairs(path)
    path.write_text(json.dumps({**good, "chosen": 3}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:1: field 'chosen' must be a string, got int"):
        load_preference_pairs(path)
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({"prompt": "p", "responses": [" a", " b", " c"]}) + "\n"
    )
    assert load_preference_pairs(path) == [
        ("the film was", " good", " bad"),
        ("p", " a", " b"),
        ("p", " a", " c"),
        ("p", " b", " c"),
    ]
    assert load_preference_pairs(path, [("x", " y", " z")])[-1] == ("x", " y", " z")
    with pytest.raises(ValueError, match=r"pair 1: field 'rejected' is empty"):
        load_preference_pairs([("x", " y", " z"), ("x", " y", " ")])
    with pytest.raises(ValueError, match="pair 0: expected a"):
        load_preference_pairs([("x", " y")])
    with pytest.raises(FileNotFoundError):
        load_preference_pairs(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=0.0), "beta must be > 0"),
        (dict(loss_type="hinge"), "loss_type"),
        (dict(batch_size=0), "batch_size"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(warmup_ratio=1.0), "warmup_ratio"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kwargs)


def task_pairs(prompts, reward, tokenizer, n=64, seed=0):
    """Preference pairs derived from the tiny task's reward: two random word strings answer a prompt, the
    one the reward scores higher (more 'good') is chosen; equal scores get a 'good' appended to one."""
    words = sorted({w for w in tokenizer.get_vocab() if w.isalpha()})
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        prompt = prompts[len(pairs) % len(prompts)]
        a, b = (" " + " ".join(rng.choice(words, size=int(rng.integers(2, 6)))) for _ in range(2))
        score_a, score_b = reward([prompt] * 2, [a, b])
        if score_a == score_b:
            a, score_a = a + " good", score_a + 1
        pairs.append((prompt, a, b) if score_a > score_b else (prompt, b, a))
    return pairs


def mean_score(agent, prompts, reward, tokenizer, seed=123):
    """The agent's mean reward on fresh samples, 8 per prompt, through the environment."""
    env = TextGenVectorEnv(
        num_envs=8,
        prompts=prompts,
        tokenizer=tokenizer,
        reward=reward,
        max_new_tokens=5,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    agent._generator.manual_seed(seed)
    agent.policy.eval()
    queue = np.repeat(np.arange(len(prompts)), 8)
    return float(np.mean(collect_episodes(env, agent, len(queue), seed=seed, prompt_indices=queue).scores))


FAST = dict(learning_rate=1e-2, batch_size=16, epochs=4, lr_schedule="constant", progress=False)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_offline_dpo_raises_the_reward_on_the_tiny_task(
    loss_type, fresh_policy, tokenizer, task_prompts, task_reward
):
    agent = DPOAgent(fresh_policy(), tokenizer, DPOConfig(**FAST, loss_type=loss_type))
    before = mean_score(agent, task_prompts, task_reward, tokenizer)
    history = agent.train(task_pairs(task_prompts, task_reward, tokenizer))
    after = mean_score(agent, task_prompts, task_reward, tokenizer)
    assert history[0]["loss"] == pytest.approx(math.log(2) if loss_type == "dpo" else (1 / (2 * 0.1)) ** 2)
    assert history[0]["reward_margin"] == 0.0  # policy == reference before the first step: h = 0 exactly
    assert history[-1]["reward_accuracy"] == 1.0 and history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert after > before + 0.4, (before, after)  # fails if learning is broken (noise ~0.1)
    assert len(history) == 4 * 4 and history[-1]["step"] == 16


def test_offline_dpo_with_lora_trains_only_the_adapters(
    fresh_policy, tokenizer, task_prompts, task_reward, tmp_path
):
    base = fresh_policy()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    options = {**FAST, "epochs": 1, "learning_rate": 3e-2}
    agent = DPOAgent(base, tokenizer, DPOConfig(**options, lora_rank=4, log_dir=str(tmp_path / "tb")))
    assert agent.reference is None  # the adapter-disabled base
    history = agent.train(task_pairs(task_prompts, task_reward, tokenizer))
    assert history[0]["loss"] == pytest.approx(math.log(2))
    assert history[-1]["reward_margin"] > 0
    assert all("lora_" in n for n, p in agent.policy.named_parameters() if p.requires_grad)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard logs
    merged = agent.policy.get_base_model().state_dict()
    for name, value in before.items():
        key = next(k for k in merged if k.replace("base_layer.", "") == name)
        torch.testing.assert_close(merged[key], value)


def test_resume_mid_epoch_matches_the_uninterrupted_run(
    fresh_policy, tokenizer, task_prompts, task_reward, tmp_path
):
    config = DPOConfig(**{**FAST, "epochs": 2, "batch_size": 5, "lr_schedule": "cosine"}, warmup_ratio=0.2)
    pairs = task_pairs(task_prompts, task_reward, tokenizer, n=16)  # 4 steps per epoch, 8 in all
    straight = DPOAgent(fresh_policy(), tokenizer, config)
    full = straight.train(pairs)

    class Interrupt(Exception):
        pass

    def stop(step, stats):
        if step == 3:
            raise Interrupt

    interrupted = DPOAgent(fresh_policy(), tokenizer, config)
    with pytest.raises(Interrupt):
        interrupted.train(pairs, checkpoint_dir=tmp_path / "ck", checkpoint_every=1, callback=stop)
    resumed = DPOAgent(fresh_policy(), tokenizer, config)
    resumed.load_checkpoint(tmp_path / "ck")
    assert resumed.step == 3
    rest = resumed.train(pairs)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[3:]]
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    other = DPOAgent(fresh_policy(), tokenizer, config)
    other.load_checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match="other preference pairs"):
        other.train(pairs[:-1])
