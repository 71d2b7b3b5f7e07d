"""RewardModel: scoring at the last real token, saving and loading, LoRA, and use as the env's reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import llm_env
from llm_env.reward import SequenceClassifierReward, as_reward_function
from llm_env.tiny import tiny_gpt2, tiny_llama
from rewards.model import RewardModel, ScoreStats, load_reward_model, right_align

PROMPTS = ["the film was", "a", "this book is long but", "i liked the"]
RESPONSES = [" good and fun", " great movie with a good story", " fun", " actors"]


def unpadded_scores(model, tokenizer, prompts, responses):
    """transformers' own forward, one unpadded text at a time."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([tokenizer(p + r)["input_ids"]])
            out.append(model(input_ids=ids).logits[0, 0].item())
    return np.array(out)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_batched_score_is_read_at_the_last_real_token(build, tokenizer):
    model = build(tokenizer, seed=5, classifier=True)
    rm = RewardModel(model, tokenizer, batch_size=3)  # batches of 3 and 1, right-padded inside
    scores = rm(PROMPTS, RESPONSES)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and not scores.requires_grad
    np.testing.assert_allclose(
        scores.numpy(), unpadded_scores(model, tokenizer, PROMPTS, RESPONSES), atol=1e-5
    )


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_left_and_right_padding_give_the_same_scores(build, tokenizer):
    rm = RewardModel(build(tokenizer, seed=5, classifier=True), tokenizer)
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    batches = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        try:
            enc = tokenizer(texts, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = "right"
        assert (enc["attention_mask"][:, 0 if side == "left" else -1] == 0).any()  # really padded
        with torch.no_grad():
            batches[side] = rm.forward_ids(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(batches["left"], batches["right"])
    torch.testing.assert_close(batches["right"], rm.score(PROMPTS, RESPONSES))


def test_right_align_by_hand():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    new_ids, new_mask = right_align(ids, mask)
    assert new_ids[:, :3].tolist() == [[5, 6, 0], [7, 8, 9], [1, 2, 3]]
    assert new_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_forward_ids_has_gradients(rm, tokenizer):
    enc = tokenizer([p + r for p, r in zip(PROMPTS, RESPONSES)], padding=True, return_tensors="pt")
    rm.forward_ids(enc["input_ids"], enc["attention_mask"]).sum().backward()
    assert rm.model.score.weight.grad is not None


def test_score_restores_training_mode(rm):
    rm.train()
    first = rm.score(PROMPTS, RESPONSES)
    assert rm.model.training  # restored
    torch.testing.assert_close(first, rm.score(PROMPTS, RESPONSES))  # dropout was off while scoring


def test_save_and_load_round_trip(rm, tmp_path):
    rm.stats = ScoreStats(mean=0.5, std=2.0, count=10)
    before = rm(PROMPTS, RESPONSES)
    rm.save_pretrained(tmp_path / "rm", metadata={"note": "test"})
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert {"model.safetensors", "config.json", "reward_model.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["format_version"] == 1 and meta["stats"] == {"mean": 0.5, "std": 2.0, "count": 10}
    assert meta["metadata"] == {"note": "test"}

    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.stats == rm.stats and loaded.batch_size == rm.batch_size
    assert torch.equal(loaded(PROMPTS, RESPONSES), before)
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES, whiten=True), (before - 0.5) / 2.0)
    # whitened by default when asked, at load time
    whitened = RewardModel.from_pretrained(tmp_path / "rm", whiten=True)
    torch.testing.assert_close(whitened(PROMPTS, RESPONSES), (before - 0.5) / 2.0)


def test_saved_directory_is_a_plain_sequence_classifier(rm, tmp_path, tokenizer):
    rm.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id is not None
    np.testing.assert_allclose(
        unpadded_scores(plain, tokenizer, PROMPTS, RESPONSES), rm(PROMPTS, RESPONSES).numpy(), atol=1e-6
    )


def test_env_accepts_the_loaded_model_as_its_reward(rm, tmp_path, tokenizer, gpt2):
    rm.calibrate(PROMPTS, RESPONSES)
    rm.whiten = True
    rm.save_pretrained(tmp_path / "rm")
    served = as_reward_function(str(tmp_path / "rm"))  # the environment's loader: llm_env alone
    assert isinstance(served, SequenceClassifierReward) and not isinstance(served, RewardModel)
    assert served.stats == rm.stats and served.whiten  # reward_model.json: statistics and whitening
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(served(PROMPTS, RESPONSES), loaded(PROMPTS, RESPONSES))
    torch.testing.assert_close(served(PROMPTS, RESPONSES), rm.score(PROMPTS, RESPONSES, whiten=True))
    for reward in (str(tmp_path / "rm"), loaded):  # a path, and the object itself
        env = llm_env.TextGenEnv(
            prompts=PROMPTS, tokenizer=tokenizer, reward=reward, reference=gpt2, max_new_tokens=3, kl_coef=0.0
        )
        env.reset(seed=0)
        token = tokenizer.convert_tokens_to_ids("good")
        for _ in range(3):
            _, reward_t, terminated, truncated, info = env.step(token)
        assert truncated and not terminated
        done = info["completion"]
        expected = loaded([done["prompt"]], [done["response"]])[0].item()
        assert done["score"] == pytest.approx(expected, abs=1e-6)
        assert reward_t == pytest.approx(expected, abs=1e-6)  # kl_coef=0: the final reward is the score


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_from_causal_lm_object_keeps_the_backbone(build, tokenizer):
    causal = build(tokenizer, seed=9)
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(causal, tokenizer)
    seq = rm.model
    assert type(seq).__name__.endswith("ForSequenceClassification") and seq.config.num_labels == 1
    for name, value in causal.base_model.state_dict().items():
        assert torch.equal(seq.base_model.state_dict()[name], value), name
    # the score is the new head applied to the causal LM's last hidden state
    ids = torch.tensor([tokenizer("the film was good")["input_ids"]])
    with torch.no_grad():
        hidden = causal.base_model(input_ids=ids).last_hidden_state[0, -1]
    expected = (seq.score.weight @ hidden).item()
    assert rm(["the film was"], [" good"]).item() == pytest.approx(expected, abs=1e-5)


def test_from_causal_lm_path_and_load_reward_model(saved_gpt2, saved_classifier, tokenizer, gpt2):
    torch.manual_seed(0)
    from_path = load_reward_model(str(saved_gpt2))  # a causal LM checkpoint gets a new head
    for name, value in gpt2.base_model.state_dict().items():
        assert torch.equal(from_path.model.base_model.state_dict()[name], value), name
    as_is = load_reward_model(str(saved_classifier))  # a classifier checkpoint is used as it is
    reference = tiny_gpt2(tokenizer, seed=4, classifier=True)
    torch.testing.assert_close(
        as_is(PROMPTS, RESPONSES), RewardModel(reference, tokenizer)(PROMPTS, RESPONSES)
    )
    assert load_reward_model(as_is) is as_is
    with pytest.raises(ValueError, match="tokenizer"):
        load_reward_model(gpt2)


def test_lora_trains_only_the_adapter_and_the_head_and_merges_on_save(rm, tmp_path):
    before = rm(PROMPTS, RESPONSES)
    rm.add_lora(4)
    assert rm.is_lora
    trainable = [n for n, p in rm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    torch.testing.assert_close(rm(PROMPTS, RESPONSES), before)  # LoRA B starts at zero
    with torch.no_grad():  # move the adapter so that merging matters
        for n, p in rm.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    adapted = rm(PROMPTS, RESPONSES)
    assert not torch.allclose(adapted, before)
    rm.save_pretrained(tmp_path / "rm")
    assert rm.is_lora  # saving merged a copy
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert not loaded.is_lora
    torch.testing.assert_close(loaded(PROMPTS, RESPONSES), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.merge_lora()(PROMPTS, RESPONSES), adapted, atol=1e-5, rtol=1e-5)


def test_bad_construction_and_use(tokenizer, tmp_path, rm):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    three = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=8, n_head=2, num_labels=3)
    )
    with pytest.raises(ValueError, match=r"num_labels=1.*from_causal_lm"):
        RewardModel(three, tokenizer)
    with pytest.raises(ValueError, match=r"no score statistics.*calibrate"):
        rm.score(PROMPTS, RESPONSES, whiten=True)
    with pytest.raises(ValueError, match="4 prompts but 1 responses"):
        rm(PROMPTS, RESPONSES[:1])
    with pytest.raises(TypeError, match="lists of strings"):
        rm("the film", " was good")
    with pytest.raises(FileNotFoundError, match=r"reward_model\.json"):
        RewardModel.from_pretrained(tmp_path)
    rm.save_pretrained(tmp_path / "rm")
    meta = tmp_path / "rm" / "reward_model.json"
    meta.write_text(meta.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ValueError, match="format_version 99"):
        RewardModel.from_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="positive std"):
        ScoreStats(0.0, 0.0)


def test_calibrate_measures_the_score_statistics(rm):
    scores = rm(PROMPTS, RESPONSES).double()
    stats = rm.calibrate(PROMPTS, RESPONSES)
    assert stats.count == 4
    assert stats.mean == pytest.approx(float(scores.mean()), abs=1e-6)
    assert stats.std == pytest.approx(float(scores.std(correction=0)), abs=1e-6)
    whitened = rm.score(PROMPTS, RESPONSES, whiten=True)
    assert float(whitened.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(whitened.std(correction=0)) == pytest.approx(1.0, abs=1e-5)
