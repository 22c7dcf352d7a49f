"""Router speed: decisions per second (1 and 10,000 rows), ONNX vs native, side by side,
and the routing overhead as a fraction of a generate call at the smallest scale.

The generate time cannot come from a model here (predictor knows no model): pass the one
measured for yours with --generate-ms / --generate-batch. The default is STACK.md's tiny
Llava on 2 CPU cores: 90 ms for a batch of 8 at 1 visual token, about 11 ms per sample.
Feature extraction is m3core's and is not timed here.

    python bench/router.py [--features 64] [--estimators lightgbm,logreg,mlp] [--out r.json]
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
from predictor.synthetic import make_synthetic

PARAMS = {
    "lightgbm": {"n_estimators": 100, "num_leaves": 15},
    "logreg": {"C": 1.0},
    "mlp": {"hidden": (64,), "epochs": 30},
}


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
    ap.add_argument("--out", type=Path, default=None, help="also write results as JSON")
    args = ap.parse_args(argv)

    gen_ms = args.generate_ms / args.generate_batch
    batches = [int(b) for b in args.batches.split(",")]
    d = make_synthetic(n=args.train + max(batches), n_features=args.features, seed=0)
    X_tr, y_tr = d.X[: args.train], d.correct[: args.train]
    X_te = d.X[args.train :]
    rows = []
    print(
        f"router features: {args.features}; scales {d.scales}; generate at the smallest scale: "
        f"{gen_ms:.2f} ms per sample ({args.generate_ms:g} ms / batch of {args.generate_batch})"
    )
    for est in args.estimators.split(","):
        t0 = time.perf_counter()
        native = ScaleRouter(est, **PARAMS[est]).fit(X_tr, y_tr, d.scales)
        fit_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            native.save(tmp)
            save_s = time.perf_counter() - t0
            onnx = ScaleRouter.load(tmp, expected_scales=d.scales)
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
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
