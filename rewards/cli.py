"""``llm-env train-rm``: train a reward model from a JSONL file of preferences.

    llm-env train-rm --data prefs.jsonl --model path/or/hub-name --out rm/ [--epochs 1 --lr 1e-5 ...]

Every field of :class:`~rewards.train.RewardTrainingConfig` is an option with the config's own default.

``--model`` is a causal LM (it gets a new scalar head, as in Llama 2) or a sequence-classification
checkpoint. The trained model is saved to ``--out`` (loadable as the environment's ``reward=``) with
``train_metrics.json``, and the held-out accuracy per preference level is printed at the end.
Under ``torchrun --nproc-per-node N -m rlhf_bench train-rm ...`` every rank trains on its share of each
batch and rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from llm_env.config_cli import add_dataclass_arguments, dataclass_from_args
from llm_env.distributed import is_main_process
from rewards.data import load_preferences
from rewards.train import RewardTrainingConfig, train_reward_model

__all__ = ["add_parser", "format_metrics", "train_rm"]


def add_parser(subparsers: Any) -> None:
    """Register the ``train-rm`` subcommand: the data and model options, then one option per field of
    :class:`RewardTrainingConfig` (``--epochs``, ``--lr``, ``--margin-table``, ``--lora-rank``, ...)."""
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
    add_dataclass_arguments(p, RewardTrainingConfig)
    p.set_defaults(func=train_rm)


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
        config = dataclass_from_args(RewardTrainingConfig, args)
        data = load_preferences(args.data)
        eval_data = load_preferences(args.eval_data) if args.eval_data else None
    except (ValueError, FileNotFoundError) as exc:
        print(f"llm-env train-rm: error: {exc}", file=sys.stderr)
        return 2
    result = train_reward_model(
        args.model, data, tokenizer=args.tokenizer, eval_data=eval_data, config=config
    )
    if not is_main_process():  # under torchrun every rank trained; rank 0 writes
        return 0
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
