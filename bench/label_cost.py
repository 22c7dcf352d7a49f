"""What labelling costs, measured side by side in one run, as ratios.

    python bench/label_cost.py [--model tiny-m3|DIR] [--images 40]

1. every scale from ONE encoding per image vs re-encoding the image for every scale;
2. cascade mode (stop at the first correct scale) vs full mode;
3. Ray with 1 worker vs 2 workers (each including actor start-up and model loading).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from data import make_split
from m3core import NestedLMM
from pipelines.cli import quiet_libraries
from pipelines.labelling import LabelJob, run_labelling
from pipelines.quickstart import resolve_model
from pipelines.shards import RayOptions


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-m3")
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    quiet_libraries()
    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="label-cost-"))
    data = make_split("test", args.images, seed=123)
    data.save_to_disk(str(work / "data"))
    lmm = NestedLMM.from_pretrained(model, device="cpu")
    images, questions = data["image"], data["question"]

    def one_encoding() -> None:
        encoded = lmm.encode(images)
        for scale in lmm.scales:
            lmm.generate(encoded, questions, scale, 6, batch_size=64)

    def re_encoding() -> None:
        for scale in lmm.scales:
            lmm.generate(images, questions, scale, 6, batch_size=64)

    one_encoding()  # warm-up
    shared, separate = timed(one_encoding), timed(re_encoding)

    def label(mode: str, out: str, ray: RayOptions | None) -> float:
        job = LabelJob(
            model=str(model), data=str(work / "data"), out=str(work / out), mode=mode, shard_size=40
        )
        return timed(lambda: run_labelling(job, ray, progress=False))

    full = label("full", "full", None)
    cascade = label("cascade", "cascade", None)
    ray1 = label("full", "ray1", RayOptions(workers=1))  # each run starts and stops Ray
    ray2 = label("full", "ray2", RayOptions(workers=2))
    shutil.rmtree(work, ignore_errors=True)

    n = len(data)
    print(f"model {model.name}, {n} samples ({args.images} images), scales {lmm.scales}")
    print(f"{'comparison':<42} {'a (s)':>8} {'b (s)':>8} {'b/a':>7}")
    rows = [
        ("one encoding (a) vs re-encode per scale (b)", shared, separate),
        ("cascade (a) vs full (b)", cascade, full),
        ("Ray 2 workers (a) vs 1 worker (b)", ray2, ray1),
    ]
    for name, a, b in rows:
        print(f"{name:<42} {a:>8.2f} {b:>8.2f} {b / a:>6.2f}x")


if __name__ == "__main__":
    main()
