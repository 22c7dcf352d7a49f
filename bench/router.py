"""Router speed: decisions per second (1 and 10,000 rows), ONNX vs native, side by side,
and the routing overhead as a fraction of a generate call at the smallest scale.

Part 1 times the routers alone on synthetic arrays (predictor knows no model) against an
assumed generate time (--generate-ms / --generate-batch; default 90 ms for a batch of 8 at 1
visual token, a tiny Llava on 2 CPU cores). Part 2 (--model, default the shipped
tiny-m3; `--model none` skips it) measures everything on the model itself, side by side in one
run: a batch of benchmark samples is labelled at every scale, each router is fitted on those
labels and m3core's features, then generate at the smallest scale, feature extraction and the
ONNX router are timed on the same call of each batch size.

    python bench/router.py [--model tiny-m3|DIR|none] [--batch 32,256] [--estimators ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from predictor import ScaleRouter

PARAMS = {
    "lightgbm": {"n_estimators": 100, "num_leaves": 15},
    "logreg": {"C": 1.0},
    "mlp": {"hidden": (64,), "epochs": 30},
}


def synthetic_rows(
    n: int, width: int, scales: tuple[int, ...], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Features and a correctness matrix where a few features set how many tokens a sample
    needs: something for the routers to learn, so their fit and trees are realistic."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, width)).astype(np.float32)
    need = X[:, :4] @ np.linspace(1.0, 0.4, 4) + rng.normal(scale=0.5, size=n)
    t = np.linspace(-1.0, 1.5, len(scales))
    correct = need[:, None] + rng.normal(scale=0.3, size=(n, len(scales))) < t[None, :]
    return X, correct | (rng.random(correct.shape) < 0.15)


def seconds_per_call(fn: Callable[[], object], min_time: float, max_calls: int) -> float:
    """Median seconds per call over repeated calls (after one warm-up call)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=64, help="router feature width")
    ap.add_argument("--train", type=int, default=4000, help="training rows")
    ap.add_argument("--estimators", default="lightgbm,logreg,mlp")
    ap.add_argument("--generate-ms", type=float, default=90.0, help="generate time of a batch")
    ap.add_argument("--generate-batch", type=int, default=8, help="batch size of that time")
    ap.add_argument("--batches", default="1,8,10000", help="routing batch sizes to time")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--model", default="tiny-m3", help="shipped name or folder; 'none' skips")
    ap.add_argument("--batch", default="32,256", help="samples per call in part 2")
    ap.add_argument("--label-samples", type=int, default=256, help="part 2's router training")
    ap.add_argument("--out", type=Path, default=None, help="also write results as JSON")
    args = ap.parse_args(argv)

    gen_ms = args.generate_ms / args.generate_batch
    batches = [int(b) for b in args.batches.split(",")]
    scales = (1, 9, 36, 144)
    X, correct = synthetic_rows(args.train + max(batches), args.features, scales)
    X_tr, y_tr = X[: args.train], correct[: args.train]
    X_te = X[args.train :]
    rows = []
    print(
        f"router features: {args.features}; scales {scales}; generate at the smallest scale: "
        f"{gen_ms:.2f} ms per sample ({args.generate_ms:g} ms / batch of {args.generate_batch})"
    )
    for est in args.estimators.split(","):
        t0 = time.perf_counter()
        native = ScaleRouter(est, scales=scales, **PARAMS[est]).fit(X_tr, y_tr)
        fit_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            native.save(tmp)
            save_s = time.perf_counter() - t0
            onnx = ScaleRouter.load(tmp, expected_scales=scales)
            diff = float(np.abs(onnx.predict_proba(X_te) - native.predict_proba(X_te)).max())
            for b in batches:
                X = np.ascontiguousarray(X_te[:b])
                calls = 2000 if b < 100 else 50
                t_nat = seconds_per_call(partial(native.route, X), args.min_time, calls)
                t_onx = seconds_per_call(partial(onnx.route, X), args.min_time, calls)
                rows.append(
                    {
                        "estimator": est,
                        "rows": b,
                        "native_decisions_per_s": b / t_nat,
                        "onnx_decisions_per_s": b / t_onx,
                        "onnx_over_native": t_nat / t_onx,
                        "native_overhead": t_nat * 1e3 / b / gen_ms,
                        "onnx_overhead": t_onx * 1e3 / b / gen_ms,
                        "native_ms_per_call": t_nat * 1e3,
                        "onnx_ms_per_call": t_onx * 1e3,
                    }
                )
        print(
            f"{est}: fit {fit_s:.2f} s, save (ONNX export) {save_s:.2f} s, "
            f"max |P_onnx - P_native| = {diff:.1e}, providers {onnx.providers}"
        )

    head = (
        f"{'estimator':<9} {'rows':>6} | {'native dec/s':>12} {'onnx dec/s':>11} "
        f"{'onnx/native':>11} | {'native ms':>9} {'onnx ms':>8} | "
        f"{'overhead/sample native':>22} {'onnx':>7}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['estimator']:<9} {r['rows']:>6} | {r['native_decisions_per_s']:>12,.0f} "
            f"{r['onnx_decisions_per_s']:>11,.0f} {r['onnx_over_native']:>10.2f}x | "
            f"{r['native_ms_per_call']:>9.3f} {r['onnx_ms_per_call']:>8.3f} | "
            f"{r['native_overhead']:>21.3%} {r['onnx_overhead']:>8.3%}"
        )
    print(
        "\noverhead/sample = routing time per sample / generate time per sample at the "
        "smallest scale (target: <= 1 %, features not included)"
    )
    result = {"generate_ms_per_sample": gen_ms, "features": args.features, "rows": rows}
    if args.model != "none":
        result["model"] = model_overhead(args)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def model_overhead(args: argparse.Namespace) -> dict:
    """Features + ONNX routing against generate at the smallest scale, per call of a batch.

    Each call encodes its own samples' images and tokenizes its prompts, as
    `AdaptiveLMM.generate` does (the benchmark asks four questions per image); the features
    read those prompt ids, the generate call (the questions as text) tokenizes its own.
    """
    from data.scoring import is_correct
    from data.synthetic import make_split
    from m3core import NestedLMM
    from m3core.features import router_features
    from m3core.shipped import resolve_model

    lmm = NestedLMM.from_pretrained(resolve_model(args.model))
    sizes = [int(b) for b in str(args.batch).split(",")]
    rows = make_split("calib", max(args.label_samples, *sizes) // 4 + 1, seed=1)
    images, questions = list(rows["image"]), list(rows["question"])
    encoded = lmm.encode(images)
    answers = list(rows["answers"])
    correct = np.array(
        [
            [is_correct(r.text, gold) for r, gold in zip(records, answers, strict=True)]
            for records in (lmm.generate(encoded, questions, s, batch_size=64) for s in lmm.scales)
        ]
    ).T
    X = router_features(lmm, encoded, questions)
    onnx = {}
    with tempfile.TemporaryDirectory() as tmp:
        for est in args.estimators.split(","):
            router = ScaleRouter(est, scales=lmm.scales, **PARAMS[est]).fit(X, correct)
            router.save(f"{tmp}/{est}")
            onnx[est] = ScaleRouter.load(f"{tmp}/{est}", expected_scales=lmm.scales)
    smallest = lmm.scales[0]
    print(
        f"\nmodel {args.model} ({lmm.describe()['parameters']:,} parameters), {X.shape[1]} "
        f"features; per call: generate at {smallest} token(s), features, ONNX route"
    )
    out = {"model": args.model, "calls": []}
    for size in sizes:
        batch = lmm.encode(images[:size])
        batch_questions = questions[:size]
        prompts = lmm.tokenize(batch_questions)  # shared with generate, as AdaptiveLMM does
        generate_s = seconds_per_call(
            partial(lmm.generate, batch, batch_questions, smallest), args.min_time, 200
        )
        features_s = seconds_per_call(
            partial(router_features, lmm, batch, prompts), args.min_time, 2000
        )
        call = {
            "batch": size,
            "images": len(batch.distinct),
            "generate_ms": generate_s * 1e3,
            "features_ms": features_s * 1e3,
            "routers": [],
        }
        print(
            f"batch {size} ({call['images']} images): generate {generate_s * 1e3:.2f} ms, "
            f"features {features_s * 1e3:.2f} ms ({features_s / generate_s:.2%})"
        )
        for est, router in onnx.items():
            route_s = seconds_per_call(partial(router.route, X[:size]), args.min_time, 2000)
            overhead = (features_s + route_s) / generate_s
            print(
                f"  {est:<9} route {route_s * 1e3:.3f} ms | features + route = {overhead:.2%}"
                " of the generate call"
            )
            call["routers"].append(
                {"estimator": est, "route_ms": route_s * 1e3, "overhead": overhead}
            )
        out["calls"].append(call)
    return out


if __name__ == "__main__":
    main()
