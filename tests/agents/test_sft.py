"""SFT: the loss covers response tokens only, training lowers it, data errors name line and field."""

import json

import pytest
import torch

from agents.policy import SequenceBatch
from agents.sft import SFTConfig, load_sft_data, sft_loss, sft_train, tokenize_pairs
from llm_env.tiny import tiny_gpt2


def test_loss_is_mean_nll_of_response_tokens_only(tokenizer):
    model = tiny_gpt2(tokenizer, seed=3)
    batch = SequenceBatch.build([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=0, device="cpu")
    with torch.no_grad():
        loss = sft_loss(model, batch)
        nll = []
        for prompt, response in (([5, 6, 7], [10, 11]), ([8, 9], [12])):
            logp = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            nll += [-float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response)]
    assert float(loss) == pytest.approx(sum(nll) / len(nll), abs=1e-5)


def test_sft_training_lowers_the_loss(tokenizer):
    model = tiny_gpt2(tokenizer, seed=3)
    pairs = [("the film was", " good and fun"), ("a great movie", " with a good story")] * 4
    model, metrics = sft_train(
        model,
        pairs,
        SFTConfig(learning_rate=1e-2, epochs=20, batch_size=4, lr_schedule="constant", progress=False),
        tokenizer=tokenizer,
    )
    assert metrics["epoch_loss"][-1] < 0.5 * metrics["epoch_loss"][0]
    prompt_ids, response_ids = tokenize_pairs(tokenizer, ["the film was"], [" good and fun"])
    assert response_ids[0][-1] == tokenizer.eos_token_id


def test_sft_with_lora_trains_only_adapters(tokenizer):
    model, _ = sft_train(
        tiny_gpt2(tokenizer),
        [("the film was", " good")] * 4,
        SFTConfig(lora_rank=2, progress=False),
        tokenizer=tokenizer,
    )
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_sft_data_errors(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"sft.jsonl:2: missing field 'response'"):
        load_sft_data(path)
    path.write_text(json.dumps({"prompt": "a", "response": ""}) + "\n")
    with pytest.raises(ValueError, match=r"sft.jsonl:1: field 'response' must be a non-empty string"):
        load_sft_data(path)
    path.write_text(json.dumps({"prompt": "a", "response": " b"}) + "\n")
    assert load_sft_data(path) == [("a", " b")]
    with pytest.raises(ValueError, match="epochs"):
        SFTConfig(epochs=0)
