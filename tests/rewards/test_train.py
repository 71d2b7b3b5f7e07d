"""The trainer: batches, schedule, config checks, and learning a gold rule from simulated preferences."""

from __future__ import annotations

import math
import time

import pytest
import torch

from llm_env.tiny import tiny_gpt2, tiny_llama
from llm_env.training import make_scheduler
from rewards import (
    LEVELS,
    Comparison,
    RewardModel,
    RewardTrainingConfig,
    comparison_loss,
    evaluate_reward_model,
    simulate_preferences,
    simulate_rankings,
    train_reward_model,
)
from rewards.train import batch_loss, collate_comparisons


@pytest.mark.slow
def test_reward_model_learns_a_gold_rule_from_noisy_simulated_preferences(task):
    """Gao et al. (2022) setting: a gold rule labels pairs (Bradley-Terry, T = 0.5), a tiny model learns it.

    Held-out pairs come from other prompts and another policy seed, labelled by the noiseless annotator
    (T = 0) and without exact gold ties (which have no right answer).
    """
    thresholds = (2.0, 1.0, 0.5)
    train = simulate_preferences(
        task.prompts, task.policy(1), task.gold, pairs_per_prompt=4, temperature=0.5,
        level_thresholds=thresholds, seed=1,
    )  # fmt: skip
    held = simulate_preferences(
        task.prompts[:100], task.policy(2), task.gold, pairs_per_prompt=4, temperature=0.0,
        level_thresholds=thresholds, seed=2,
    )  # fmt: skip
    held = [c for c in held if c.gold[0] != c.gold[1]]
    model = tiny_gpt2(task.tokenizer, classifier=True, seed=0)
    assert sum(p.numel() for p in model.parameters()) < 50_000

    start = time.perf_counter()
    result = train_reward_model(
        model, train, tokenizer=task.tokenizer, eval_data=held,
        epochs=6, batch_size=32, lr=3e-3, margin_table="small", progress=False, seed=0,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    metrics = result.metrics["eval"]
    per_level = metrics["per_level"]
    print(f"\nheld-out accuracy {metrics['accuracy']:.3f} in {seconds:.1f}s; per level:")
    for level, m in per_level.items():
        print(
            f"  {level:<22} {m['count']:>4} pairs  accuracy {m['accuracy']:.3f}  mean gap {m['mean_gap']:.3f}"
        )

    assert seconds < 60
    assert metrics["accuracy"] >= 0.9
    assert list(per_level) == list(LEVELS)  # all four levels present and reported, strongest first
    assert sum(m["count"] for m in per_level.values()) == metrics["num_pairs"] == len(held)
    assert per_level["significantly_better"]["accuracy"] >= per_level["negligibly_better"]["accuracy"]
    assert per_level["significantly_better"]["mean_gap"] > per_level["negligibly_better"]["mean_gap"]
    # the model is ready to serve: whitening statistics from the training texts
    stats = result.model.stats
    assert stats is not None and stats.count == len({(c.prompt, r) for c in train for r in c.responses})
    # evaluation after training agrees with what the trainer reported
    assert evaluate_reward_model(result.model, held)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_training_is_reproducible_and_mixes_pairs_and_rankings(task, tmp_path):
    pairs = simulate_preferences(task.prompts[:40], task.policy(3), task.gold, temperature=0.5, seed=3)
    ranks = simulate_rankings(task.prompts[40:80], task.policy(4), task.gold, k=4, temperature=0.5, seed=4)
    data = pairs + ranks

    def run(**kw):
        torch.manual_seed(123)  # the trainer must not depend on the global generator
        return train_reward_model(
            tiny_llama(task.tokenizer, classifier=True, seed=1), data, tokenizer=task.tokenizer,
            epochs=2, batch_size=8, lr=1e-3, eval_fraction=0.25, progress=False, seed=5, **kw,
        )  # fmt: skip

    first, second = run(), run(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3, eval_every=4)
    texts = ([c.prompt for c in data[:5]], [c.chosen for c in data[:5]])
    torch.testing.assert_close(first.model(*texts), second.model(*texts), rtol=0, atol=0)
    assert first.metrics["eval"] == second.metrics["eval"]
    assert "ranking" in first.metrics["eval"]["per_level"]
    assert set(first.metrics["eval"]["per_level"]) - {"ranking"} <= set(LEVELS)
    steps = first.metrics["steps"]
    assert steps == 2 * math.ceil(first.metrics["num_train"] / 8)
    assert [h["step"] for h in first.history if "loss" in h] == list(range(1, steps + 1))
    assert len([h for h in second.history if "eval" in h]) == 2 + steps // 4
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == sorted({f"step-{s}" for s in range(3, steps + 1, 3)} | {"epoch-1", "epoch-2"})
    last = RewardModel.from_pretrained(tmp_path / "ckpt" / "epoch-2")
    torch.testing.assert_close(last(*texts), second.model(*texts))
    assert last.stats == second.model.stats


def test_lora_training_returns_a_merged_model(task):
    data = simulate_preferences(task.prompts[:24], task.policy(5), task.gold, temperature=0.5, seed=5)
    result = train_reward_model(
        tiny_gpt2(task.tokenizer, classifier=True), data, tokenizer=task.tokenizer,
        lora_rank=2, epochs=1, batch_size=8, lr=1e-2, eval_fraction=0, progress=False,
    )  # fmt: skip
    assert not result.model.is_lora and result.metrics["eval"] is None
    assert result.metrics["config"]["lora_rank"] == 2


def test_collate_encodes_each_response_once(tokenizer):
    encoded = [[[1, 2], [3]], [[4], [5, 6, 7], [8]]]  # a pair, then a ranking of 3
    batch = collate_comparisons(encoded, margins=[0.5, 0.0], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 0], [3, 0, 0], [4, 0, 0], [5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.sum(1).tolist() == [2, 1, 1, 3, 1]
    # pair (0, 1); ranking rows 2, 3, 4 give pairs (2, 3), (2, 4), (3, 4)
    assert batch.better.tolist() == [0, 2, 2, 3] and batch.worse.tolist() == [1, 3, 4, 4]
    assert batch.group.tolist() == [0, 1, 1, 1] and batch.margin.tolist() == [0.5, 0.0, 0.0, 0.0]


def test_batch_loss_matches_the_losses_on_the_model_scores(tokenizer):
    rm = RewardModel(tiny_gpt2(tokenizer, classifier=True, seed=2), tokenizer)
    pair = Comparison("the film was", (" good", " bad"), level="better")
    ranking = Comparison("a great", (" movie", " story", " plot"))
    encoded = [rm.encode([c.prompt] * len(c.responses), list(c.responses)) for c in (pair, ranking)]
    batch = collate_comparisons(encoded, [2.0, 0.0], rm.pad_id)
    rm.eval()
    with torch.no_grad():
        loss = batch_loss(rm, batch, center_coef=0.1).item()
        s = rm.score(["the film was"] * 2 + ["a great"] * 3, [" good", " bad", " movie", " story", " plot"])
    nll = lambda d: math.log1p(math.exp(-d))  # noqa: E731
    pair_loss = nll(s[0] - s[1] - 2.0) + 0.1 * (s[0] + s[1]) ** 2
    rank_pairs = [(2, 3), (2, 4), (3, 4)]
    rank_loss = sum(nll(s[i] - s[j]) + 0.1 * (s[i] + s[j]) ** 2 for i, j in rank_pairs) / 3
    assert loss == pytest.approx(float((pair_loss + rank_loss) / 2), rel=1e-5)
    assert comparison_loss(s[[0]], s[[1]], torch.tensor([0])).item() == pytest.approx(
        nll(s[0] - s[1]), rel=1e-5
    )


def test_cosine_schedule_by_hand():
    """The reward models' schedule (llm_env.training.make_scheduler): warmup, then cosine down to 10%."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=10, warmup_steps=2, min_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == [0.5, 1.0]  # linear warmup
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)


def test_evaluation_per_level_by_hand(tokenizer):
    rm = RewardModel(tiny_gpt2(tokenizer, classifier=True, seed=2), tokenizer)
    data = [
        Comparison("the film was", (" good", " bad"), level="better"),
        Comparison("the film was", (" bad", " good"), level="better"),
        Comparison("a", (" movie", " story", " plot")),
        Comparison("i liked the", (" actors", " ending")),
    ]
    s = {(p, r): rm([p], [r]).item() for c in data for p, r in [(c.prompt, x) for x in c.responses]}
    gap = lambda p, a, b: s[(p, a)] - s[(p, b)]  # noqa: E731
    gaps_better = [gap("the film was", " good", " bad"), gap("the film was", " bad", " good")]
    gaps_rank = [gap("a", " movie", " story"), gap("a", " movie", " plot"), gap("a", " story", " plot")]
    m = evaluate_reward_model(rm, data)
    assert list(m["per_level"]) == ["better", "ranking", "unlabeled"]
    assert m["per_level"]["better"]["accuracy"] == 0.5  # exactly one of two opposite labels is right
    assert m["per_level"]["better"]["mean_gap"] == pytest.approx(0.0, abs=1e-6)
    assert m["per_level"]["ranking"]["count"] == 3
    assert m["per_level"]["ranking"]["accuracy"] == pytest.approx(sum(g > 0 for g in gaps_rank) / 3)
    assert m["per_level"]["ranking"]["mean_gap"] == pytest.approx(sum(gaps_rank) / 3, abs=1e-6)
    all_gaps = [*gaps_better, *gaps_rank, gap("i liked the", " actors", " ending")]
    assert m["num_pairs"] == 6 and m["mean_gap"] == pytest.approx(sum(all_gaps) / 6, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"margin_table": "medium"}, "margin_table must be 'small', 'large' or 'none'"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\)"),
        ({"lora_alpha": 16.0}, "set lora_rank > 0"),
        ({"lora_target_modules": ("c_attn",)}, "only apply with LoRA"),
        ({"checkpoint_every": 10}, "checkpoint_every needs checkpoint_dir"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0 or None"),
        ({"lora_rank": -1}, "lora_rank must be >= 0"),
    ],
)
def test_impossible_configs_say_how_to_fix_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardTrainingConfig(**kwargs)


def test_trainer_reports_bad_data_before_training(tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "the film was", "chosen": " good", "rejected": " bad", "level": "meh"}])
    with pytest.raises(ValueError, match=rf"{path}:1: field 'level'"):
        train_reward_model(tiny_gpt2(tokenizer, classifier=True), path, tokenizer=tokenizer, progress=False)
