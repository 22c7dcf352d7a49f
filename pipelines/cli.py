"""The `adaptive-m3` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def quiet_libraries() -> None:
    """Offline hubs and no library progress bars: our own bars stay, nothing is fetched."""
    for name in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
    ):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_sizes(text: str) -> dict[str, int]:
    """`train=3000,calib=600,test=600` -> {"train": 3000, ...}."""
    sizes = {}
    for part in text.split(","):
        split, _, count = part.partition("=")
        if not count.isdigit():
            raise argparse.ArgumentTypeError(f"expected split=count, got {part!r}")
        sizes[split.strip()] = int(count)
    return sizes


def cmd_make_benchmark(args: argparse.Namespace) -> int:
    from data import make_benchmark

    paths = make_benchmark(args.out, args.sizes, seed=args.seed, image_size=args.image_size)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def cmd_train_lmm(args: argparse.Namespace) -> int:
    from data import load_samples
    from m3core.recipe import Recipe, run_recipe

    recipe = Recipe.load(args.config)
    train_data = load_samples(args.data)
    print(train_data.summary())
    eval_data = None
    if args.eval_data:
        eval_data = load_samples(args.eval_data).dataset
        eval_data = eval_data.select(range(min(args.eval_samples, len(eval_data))))
    run_recipe(recipe, train_data.dataset, args.out, eval_data, device=args.device)
    print(f"model: {Path(args.out) / 'model'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptive-m3",
        description="Spend a Matryoshka multimodal model's visual tokens only where a question "
        "needs them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-benchmark", help="write the synthetic visual-richness VQA benchmark")
    p.add_argument("--out", required=True, help="output folder (one datasets folder per split)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="images per split, e.g. train=3000,calib=600,test=600",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.set_defaults(func=cmd_make_benchmark)

    p = sub.add_parser("train-lmm", help="train a tiny nested LMM from a staged recipe")
    p.add_argument("--config", required=True, help="recipe JSON file or shipped recipe name")
    p.add_argument("--data", required=True, help="training samples (any loadable folder)")
    p.add_argument("--out", required=True, help="output folder; running again resumes")
    p.add_argument("--eval-data", help="held-out samples for per-scale accuracy")
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.set_defaults(func=cmd_train_lmm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"adaptive-m3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
