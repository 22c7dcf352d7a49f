"""The `adaptive-m3` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
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

    paths = make_benchmark(
        args.out, args.sizes, seed=args.seed, image_size=args.image_size, progress=True
    )
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
    run_recipe(
        recipe,
        train_data.dataset,
        args.out,
        eval_data,
        device=args.device,
        vision_from=args.vision_from,
        init_from=args.init_from,
    )
    print(f"model: {Path(args.out) / 'model'}")
    return 0


def ray_options(args: argparse.Namespace):
    """None (in-process) for --workers 0, else Ray with one model per actor."""
    from pipelines.shards import RayOptions

    if args.workers == 0:
        return None
    gpus = args.gpus_per_worker
    if gpus is None:
        import torch

        gpus = 1.0 / args.workers if torch.cuda.is_available() else 0.0
    return RayOptions(workers=args.workers, address=args.ray_address, gpus_per_worker=gpus)


def job_from_args(job_class, args: argparse.Namespace):
    """A job dataclass from the parsed arguments that share its field names."""
    names = {f.name for f in dataclasses.fields(job_class)}
    return job_class(**{k: v for k, v in vars(args).items() if k in names})


# label options that only one of its two sources reads; the runs fix scales, samples, prompts
LABEL_DATA_ONLY = ("preset", "scales", "probe_scales", "limit", "ray_address", "gpus_per_worker")
LABEL_LMMS_ONLY = ("lmms_metric", "threshold", "include_path")


def cmd_label(args: argparse.Namespace) -> int:
    from pipelines.labels import read_labels
    from pipelines.report import granularity

    if (args.data is None) == (args.from_lmms_eval is None):
        raise ValueError("give either --data (and optionally --preset) or --from-lmms-eval")
    source, foreign = (
        ("--from-lmms-eval", LABEL_DATA_ONLY)
        if args.from_lmms_eval is not None
        else ("--data", LABEL_LMMS_ONLY)
    )
    given = [o for o in foreign if getattr(args, o) is not None]
    if args.from_lmms_eval is not None and args.mode != "full":
        given.append("mode")
    if given:
        options = ", ".join("--" + o.replace("_", "-") for o in given)
        raise ValueError(f"{options} cannot be used with {source}")
    if args.from_lmms_eval is not None:
        from pipelines.lmms_labels import LmmsLabelJob, label_from_lmms_eval

        given = {k: v for k, v in vars(args).items() if v is not None}
        given["runs"] = tuple(args.from_lmms_eval)
        job = job_from_args(LmmsLabelJob, argparse.Namespace(**given))
        label_from_lmms_eval(job)
    else:
        from pipelines.labelling import LabelJob, run_labelling

        run_labelling(job_from_args(LabelJob, args), ray_options(args))
    labels = read_labels(args.out)
    summary = granularity(labels)["all"]
    print(f"labelled {len(labels)} samples ({len(labels.skipped)} skipped) into {args.out}")
    print(json.dumps(summary))
    return 0


def cmd_lmms_task(args: argparse.Namespace) -> int:
    from pipelines.lmms_tasks import write_task

    folder = write_task(
        args.data,
        args.out,
        preset=args.preset,
        name=args.name,
        metric=args.metric,
        max_new_tokens=args.max_new_tokens,
        image_root=args.image_root,
    )
    task = next(folder.glob("*.yaml")).stem
    print(
        f"wrote {folder}; run: lmms-eval --model adaptive_m3 --include_path {folder} --tasks {task}"
    )
    return 0


METRIC_HELP = "vqa | exact | mc | anls | relaxed | yesno"


def add_preset_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=None,
        help="read a benchmark release's layout, prompt and metric: textvqa | docvqa | "
        "chartqa | gqa | vqav2 | pope | mmbench | scienceqa | seed",
    )


def cmd_granularity(args: argparse.Namespace) -> int:
    from pipelines.labels import read_labels
    from pipelines.report import write_granularity

    paths = write_granularity(read_labels(args.labels), args.out)
    print(paths["granularity_md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    from pipelines.labels import read_labels
    from pipelines.routing import train_probe_router, train_router

    labels = read_labels(args.labels)
    if args.probe is not None:
        router, _ = train_probe_router(
            labels, args.out, args.probe, cv=args.cv, seed=args.seed, progress=True
        )
        parts = ", ".join(
            f"{name} {part.estimator}"
            for name, part in (("gate", router.gate), *router.stages.items())
        )
        print(
            f"probe router ({args.probe}, gate threshold {router.gate_threshold:g}; {parts}) -> "
            f"{args.out}; tune its knob with `adaptive-m3 tune`"
        )
        return 0
    selection = train_router(labels, args.out, cv=args.cv, seed=args.seed, progress=True)
    report = selection.report
    print(f"cross-validation ({report['cv']} folds, {report['n']} samples): {report['metric']}")
    for i, candidate in enumerate(report["candidates"]):
        mark = "*" if i == report["best_index"] else " "
        print(
            f"{mark} {candidate['fold_log_loss_mean']:.4f} +- {candidate['fold_log_loss_se']:.4f}"
            f"  {json.dumps(candidate['params'])}"
        )
    print(f"* chosen: {report['rule']}")
    print(f"router: {selection.router!r} -> {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipelines.labels import read_labels
    from pipelines.routing import (
        calibration_scores,
        probe_calibration_scores,
        tune_router,
        write_routing_report,
    )

    labels = read_labels(args.labels)
    result = tune_router(labels, args.router, args.target, args.policy)
    print(json.dumps(result.to_dict(), indent=1, default=str))
    if args.report:
        from predictor import ProbeRouter, load_router

        router = load_router(args.router, expected_scales=labels.scales)
        if isinstance(router, ProbeRouter):
            P = probe_calibration_scores(router, labels, args.router)
        else:
            P = calibration_scores(router, labels, args.router)
        paths = write_routing_report(router, labels, args.report, "router on the tuning split", P)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.batch import RunJob, run_dataset

    job = job_from_args(RunJob, args)
    summary = run_dataset(job, ray_options(args))
    print(json.dumps(summary, indent=1))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from pipelines.quickstart import QuickstartConfig, run_quickstart
    from pipelines.report import quickstart_markdown

    config = QuickstartConfig(
        out=args.out,
        model=args.model,
        workers=args.workers,
        seed=args.seed,
        extra_test_seed=args.extra_test_seed,
        policy=args.policy,
        calib_images=args.calib_images,
        test_images=args.test_images,
        targets=args.targets,
        probe=not args.no_probe,
    )
    if args.small:
        config.calib_images, config.test_images, config.cv = 12, 12, 2
    started = time.perf_counter()
    report = run_quickstart(config)
    print(quickstart_markdown(report))
    print(
        f"wrote {args.out}/report.json, report.md, pareto.png in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from m3core.convert import convert

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = convert(args.format, args.src, args.out, vision_tower=args.vision_tower, dtype=dtype)
    print(f"converted {args.src} ({args.format}) into {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from m3core.shipped import resolve_model
    from pipelines.serve import ServeConfig, serve_forever

    resolve_model(args.model)  # a wrong name fails here, not in every replica
    if args.gpus_per_replica is None:
        import torch

        args.gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    serve_forever(job_from_args(ServeConfig, args))
    return 0


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Ray actors, one model each (0: run in this process without Ray)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="join an existing Ray cluster (e.g. auto or ray://host:10001)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per actor (default: 1/workers when CUDA is present, else 0)",
    )


def scale_list(text: str) -> tuple[int, ...]:
    """`1,9,36` -> (1, 9, 36); anything else is a usage error before any work starts."""
    parts = [s.strip() for s in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected scales like 1,9,36, got {text!r}")
    return tuple(int(p) for p in parts)


def scale_arg(text: str) -> str:
    """`auto` or an integer scale (checked against the model before anything is written)."""
    from pipelines.batch import scale_text

    try:
        return scale_text(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def optional_int(text: str) -> int | None:
    """An integer, or "none"."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def count_arg(text: str) -> int:
    """A count >= 1 (shard and batch sizes, token limits, --limit)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.targets import DEFAULT_TARGETS
    from predictor.policies import PROBE_POLICIES, ROUTER_POLICIES

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
    p.add_argument(
        "--vision-from",
        default=None,
        help="reuse the vision tower of a finished model instead of the dense stages",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from a finished model's weights (folder or shipped name), overriding the "
        "recipe's init_from; parts it lacks (MQT queries) start fresh, dense stages are skipped",
    )
    p.set_defaults(func=cmd_train_lmm)

    p = sub.add_parser(
        "convert",
        help="convert a released LLaVA-1.5 / M3, LLaVA-NeXT or MQT-LLaVA checkpoint (original "
        "format, local files) into a folder this project loads",
    )
    p.add_argument("--format", required=True, choices=["llava", "llava-next", "mqt-llava"])
    p.add_argument("--src", required=True, help="the downloaded checkpoint folder")
    p.add_argument(
        "--vision-tower",
        default=None,
        help="the downloaded CLIP folder (default: config.json's mm_vision_tower, if local)",
    )
    p.add_argument("--out", required=True, help="a new folder for the converted model")
    p.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="weights' dtype (default: the checkpoint's torch_dtype)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("label", help="run the model at every scale: oracle labels + features")
    p.add_argument("--model", required=True, help="NestedLMM folder (ours or stock llava-hf)")
    p.add_argument("--data", default=None, help="samples: datasets folder, parquet, jsonl, ...")
    p.add_argument(
        "--from-lmms-eval",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="instead of --data: lmms-eval runs of adaptive_m3 at fixed scales (--log_samples)",
    )
    p.add_argument("--out", required=True, help="labels folder; running again resumes")
    add_preset_argument(p)
    p.add_argument(
        "--mode",
        choices=["full", "cascade"],
        default="full",
        help="full: every scale; cascade: stop at the first correct scale",
    )
    p.add_argument("--scales", type=scale_list, default=None, help="e.g. 1,9,36,144")
    p.add_argument(
        "--probe-scales",
        type=scale_list,
        default=None,
        help="scales whose prefill is recorded as probe features (default: the two smallest)",
    )
    p.add_argument("--shard-size", type=count_arg, default=128)
    p.add_argument("--batch-size", type=count_arg, default=64)
    p.add_argument("--max-new-tokens", type=count_arg, default=6)
    p.add_argument(
        "--metric",
        default=None,
        help=f"{METRIC_HELP} (default: the preset's, else vqa); with --from-lmms-eval it "
        "scores the logged answers instead of the task's own per-sample metric",
    )
    p.add_argument("--limit", type=count_arg, default=None, help="label only the first N samples")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--lmms-metric",
        default=None,
        help="--from-lmms-eval: the per-sample metric of the task's logs (default: its first)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="--from-lmms-eval: a sample is correct when its metric reaches this (0.5)",
    )
    p.add_argument(
        "--include-path",
        default=None,
        help="--from-lmms-eval: lmms-eval --include_path of local tasks (default: the runs')",
    )
    add_ray_arguments(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("granularity", help="per-scale / oracle / budgeted-oracle report")
    p.add_argument("--labels", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_granularity)

    p = sub.add_parser(
        "train-router",
        help="cross-validated router on a labels folder (cheapest within 1 SE of the best)",
    )
    p.add_argument("--labels", required=True, help="labels of the calib split (--mode full)")
    p.add_argument("--out", required=True, help="router folder (ONNX + router.json)")
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--probe",
        choices=PROBE_POLICIES,
        default=None,
        help="train a probe router folder for this policy instead (gate + a router per probe "
        "scale on the labels' probe features)",
    )
    p.set_defaults(func=cmd_train_router)

    p = sub.add_parser("tune", help="choose the router's knob for a budget or accuracy loss")
    p.add_argument("--labels", required=True, help="labels of the calib split")
    p.add_argument("--router", required=True, help="router folder; router.json is updated")
    p.add_argument(
        "--target", required=True, help="tokens<=N | flops<=F | latency<=S | loss<=EPS@DELTA"
    )
    p.add_argument(
        "--policy",
        choices=ROUTER_POLICIES + PROBE_POLICIES,
        default=None,
        help="utility by default; a probe router folder's own probe policy for one",
    )
    p.add_argument("--report", default=None, help="write the curve report to this folder")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="answer a whole dataset at a fixed scale or routed")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    add_preset_argument(p)
    p.add_argument("--out", required=True, help="results folder; running again resumes")
    p.add_argument("--router", default=None, help="router folder (for --scale auto)")
    p.add_argument(
        "--scale",
        type=scale_arg,
        default="auto",
        help="a scale of the model, or auto (router; confidence cascade without one)",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="call-time budget, e.g. tokens<=20 or loss<=0.01@0.1 (needs tune)",
    )
    p.add_argument(
        "--on-drift",
        choices=["warn", "conservative"],
        default="warn",
        help="when inputs drift from the router's calibration data: warn, or also serve "
        "routed samples at the largest scale",
    )
    p.add_argument("--shard-size", type=count_arg, default=256)
    p.add_argument("--batch-size", type=count_arg, default=32)
    p.add_argument("--max-new-tokens", type=count_arg, default=6)
    p.add_argument(
        "--metric", default=None, help=f"{METRIC_HELP} (default: the preset's, else vqa)"
    )
    p.add_argument("--limit", type=count_arg, default=None)
    p.add_argument("--device", default=None)
    add_ray_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "lmms-task", help="write an lmms-eval task folder for a local parquet benchmark copy"
    )
    p.add_argument("--data", required=True, help="a parquet file or a folder of them")
    p.add_argument("--out", required=True, help="task folder (lmms-eval --include_path)")
    add_preset_argument(p)
    p.add_argument("--name", default=None, help="task name (default adaptive_m3_<preset>)")
    p.add_argument("--metric", default=None, help=f"{METRIC_HELP} (default: the preset's)")
    p.add_argument("--max-new-tokens", type=count_arg, default=16)
    p.add_argument("--image-root", default=None, help="folder of image files (GQA)")
    p.set_defaults(func=cmd_lmms_task)

    p = sub.add_parser("quickstart", help="the main job: label, route, evaluate, serve")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument(
        "--model",
        default="tiny-m3",
        help="shipped checkpoint (tiny-m3, tiny-mqt) or a model folder",
    )
    p.add_argument("--policy", choices=ROUTER_POLICIES, default="utility")
    p.add_argument("--workers", type=int, default=2, help="Ray actors for labelling (0: no Ray)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--calib-images",
        type=int,
        default=1200,
        help="images in the calib split, 4 questions each (the router and its knob learn here)",
    )
    p.add_argument(
        "--test-images",
        type=int,
        default=600,
        help="images in the test split, 4 questions each (every reported number)",
    )
    p.add_argument(
        "--targets",
        default=None,
        help=f"what the run is graded against, each replacing the default of its name "
        f"({DEFAULT_TARGETS}); accuracy_loss is also the loss the knob is tuned for. "
        "E.g. gap_closed>=0.4,speedup>=1.5",
    )
    p.add_argument(
        "--extra-test-seed",
        type=optional_int,
        default=1,
        help="generator seed of a second test split that every number is also reported on "
        "(none: no second split)",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="leave out the probe routers (probe, probe-cascade), which the default includes",
    )
    p.add_argument("--small", action="store_true", help="a few dozen samples (for tests)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP endpoint on Ray Serve")
    p.add_argument("--model", required=True, help="model folder or shipped name (tiny-m3)")
    p.add_argument("--router", default=None, help="router folder (else: confidence cascade)")
    p.add_argument("--budget", default=None, help="default budget for scale auto, e.g. tokens<=20")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (Ray Serve)")
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs per replica (default: 1 when CUDA is present here, else 0)",
    )
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (e.g. auto)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allow-local-files",
        default=None,
        metavar="DIR",
        help="accept image paths (or file:// URLs) that resolve inside DIR",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per shared batch")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="how long an idle replica waits for more requests before answering (those that "
        "arrive while it computes batch together anyway)",
    )
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=256,
        help="requests a replica holds (queued for its batches) before the proxy queues more",
    )
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body")
    p.add_argument(
        "--max-tokens", type=int, default=64, help="largest max_tokens a request may ask"
    )
    p.add_argument("--model-name", default="adaptive-m3", help="the name clients send as model")
    p.set_defaults(func=cmd_serve)
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
