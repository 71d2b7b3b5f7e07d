"""Prompt sources (list, JSONL, iterables, datasets.Dataset) and reward sources (callable, model, path)."""

import json

import numpy as np
import pytest
import torch

import llm_env
from llm_env.prompts import load_prompts
from llm_env.reward import SequenceClassifierReward, as_reward_function
from llm_env.tiny import tiny_gpt2, tiny_llama

PROMPTS = ["the film was", "a great movie", "i liked the"]


def test_prompt_sources_agree(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    assert load_prompts(str(path)) == PROMPTS
    assert load_prompts(path) == PROMPTS  # PathLike
    assert load_prompts(iter(PROMPTS)) == PROMPTS
    with pytest.raises(ValueError, match="missing field 'prompt'"):
        load_prompts({"text": p} for p in PROMPTS)
    assert load_prompts(({"text": p} for p in PROMPTS), key="text") == PROMPTS


def test_datasets_dataset_is_a_prompt_source(make_env):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "label": [0, 1, 2]})
    assert load_prompts(dataset) == PROMPTS
    env = make_env(prompts=dataset)
    _, info = env.reset(options={"prompt_index": 2})
    assert env.unwrapped.prompt_text(info["prompt_index"]) == "i liked the"


def naive_scores(model, tokenizer, prompts, responses):
    """One text at a time, no padding at all: the ground truth for the batched scorer."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([tokenizer(p + r)["input_ids"]])
        with torch.no_grad():
            out.append(float(model(ids).logits[0, 0]))
    return out


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_classifier_score_is_read_at_the_last_real_token(build, tokenizer):
    model = build(tokenizer, seed=5, classifier=True)
    scorer = SequenceClassifierReward(model, tokenizer, batch_size=2)
    prompts = ["the film was", "a", "this book is long but"]
    responses = [" good and fun", " great movie with a good story", " fun"]
    scores = scorer(prompts, responses)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), naive_scores(model, tokenizer, prompts, responses), atol=1e-5)


def test_classifier_from_path_matches_object(saved_classifier, tokenizer):
    from_path = as_reward_function(str(saved_classifier))
    from_object = SequenceClassifierReward(tiny_gpt2(tokenizer, seed=4, classifier=True), tokenizer)
    prompts, responses = ["the film was", "a great"], [" good", " movie"]
    torch.testing.assert_close(from_path(prompts, responses), from_object(prompts, responses))


def test_reward_model_object_needs_its_tokenizer(tokenizer):
    model = tiny_gpt2(tokenizer, classifier=True)
    with pytest.raises(ValueError, match="reward_tokenizer"):
        as_reward_function(model)


def test_env_with_model_object_reward(tokenizer, gpt2):
    rm = tiny_gpt2(tokenizer, seed=5, classifier=True)
    env = llm_env.TextGenEnv(
        prompts=PROMPTS, tokenizer=tokenizer, reward=rm, reference=gpt2, max_new_tokens=2
    )
    env.reset(seed=0, options={"prompt_index": 0})
    env.step(5)
    *_, info = env.step(6)
    completion = info["completion"]
    expected = naive_scores(rm, tokenizer, [completion["prompt"]], [completion["response"]])[0]
    assert completion["score"] == pytest.approx(expected, abs=1e-5)


def test_reward_tokenizer_mismatch_is_reported(tokenizer):
    from llm_env.tiny import word_tokenizer

    big = word_tokenizer([" ".join(f"w{i}" for i in range(100))])
    with pytest.raises(ValueError, match="do not belong together"):
        SequenceClassifierReward(tiny_gpt2(tokenizer, classifier=True), big)
