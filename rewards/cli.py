"""``llm-env train-rm``: train a reward model from a JSONL file of preferences.

    llm-env train-rm --data prefs.jsonl --model path/or/hub-name --out rm/ [--epochs 1 --lr 1e-5 ...]

``--model`` is a causal LM (it gets a new scalar head, as in Llama 2) or a sequence-classification
checkpoint. The trained model is saved to ``--out`` (loadable as the environment's ``reward=``) with
``train_metrics.json``, and the held-out accuracy per preference level is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rewards.data import load_preferences
from rewards.train import RewardTrainingConfig, train_reward_model

__all__ = ["add_parser", "format_metrics", "train_rm"]


def add_parser(subparsers: Any) -> None:
    """Register the ``train-rm`` subcommand."""
    p = subparsers.add_parser(
        "train-rm",
        help="train a reward model on preference pairs or rankings (JSONL)",
        description=(
            "Train a reward model on a JSONL file of preference pairs or rankings. --model is a causal LM "
            "(it gets a new scalar head, as in Llama 2) or a sequence-classification checkpoint. The model is "
            "saved to --out (usable as the environment's reward=) with train_metrics.json, and the held-out "
            "accuracy per preference level is printed at the end."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="JSONL: prompt + chosen/rejected [+ level | margin], or prompt + responses",
    )
    p.add_argument(
        "--model", required=True, help="causal LM or sequence-classification checkpoint (path or hub name)"
    )
    p.add_argument("--out", required=True, help="directory to save the trained reward model in")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument(
        "--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of the prompts)"
    )
    d = RewardTrainingConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="comparisons per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument(
        "--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor, fraction of --lr"
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="clip threshold (0: no clipping)"
    )
    p.add_argument("--margin-table", choices=["small", "large", "none"], default=d.margin_table)
    p.add_argument("--center-coef", type=float, default=d.center_coef, help="reward-centering penalty")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps (0: once per epoch)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-length", type=int, default=d.max_length, help="token budget per text")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 trains all weights")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--checkpoint-dir", default=d.checkpoint_dir)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--device", default=d.device, help="cpu, cuda, auto (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="dtype to load the model in (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=train_rm)


def _config(args: argparse.Namespace) -> RewardTrainingConfig:
    return RewardTrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm or None,
        margin_table=args.margin_table,
        center_coef=args.center_coef,
        eval_fraction=args.eval_fraction,
        eval_every=args.eval_every,
        seed=args.seed,
        max_length=args.max_length,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
    )


def format_metrics(metrics: dict[str, Any] | None) -> str:
    """A small table of accuracy and mean score gap, overall and per preference level."""
    if not metrics:
        return "no held-out data: pass --eval-data or --eval-fraction > 0 to measure accuracy"
    lines = [f"{'level':<22} {'pairs':>6} {'accuracy':>9} {'mean gap':>9}"]
    for level, m in metrics["per_level"].items():
        lines.append(f"{level:<22} {m['count']:>6d} {m['accuracy']:>9.3f} {m['mean_gap']:>9.3f}")
    lines.append(
        f"{'all':<22} {metrics['num_pairs']:>6d} {metrics['accuracy']:>9.3f} {metrics['mean_gap']:>9.3f}"
    )
    return "\n".join(lines)


def train_rm(args: argparse.Namespace) -> int:
    """Run ``train-rm``: train, save to ``--out``, print the held-out accuracy per level."""
    try:  # bad input is reported in one line, not a traceback
        config = _config(args)
        data = load_preferences(args.data)
        eval_data = load_preferences(args.eval_data) if args.eval_data else None
    except (ValueError, FileNotFoundError) as exc:
        print(f"llm-env train-rm: error: {exc}", file=sys.stderr)
        return 2
    result = train_reward_model(
        args.model, data, tokenizer=args.tokenizer, eval_data=eval_data, config=config
    )
    result.model.save_pretrained(args.out, metadata={"config": result.metrics["config"]})
    with open(os.path.join(args.out, "train_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(result.metrics, handle, indent=2)
    m = result.metrics
    print(
        f"trained {m['steps']} steps on {m['num_train']} comparisons in {m['seconds']:.1f}s; "
        f"held-out comparisons: {m['num_eval']}; saved to {args.out}"
    )
    print(format_metrics(m["eval"]))
    return 0
