"""Per-scale generate latency and prefill FLOPs of a nested LMM, and largest/smallest ratios.

    python bench/scale_cost.py [--model DIR] [--kind pool|query] [--batch 8] [--repeats 5]

Without --model it measures the tiny default configuration (random weights: latency and FLOPs
do not depend on what the weights learned). All scales are timed side by side in one run on the
same encoded batch, so the ratios are comparable; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from m3core import NestedLMM, TinySpec, tiny_lmm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a NestedLMM folder (default: tiny configuration)")
    parser.add_argument("--kind", default="pool", choices=["pool", "query"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model:
        lmm = NestedLMM.from_pretrained(args.model)
    else:
        from data.synthetic import vocabulary

        lmm = tiny_lmm(vocabulary(), TinySpec(kind=args.kind))
    size = lmm.model.config.vision_config.image_size
    images = [Image.new("RGB", (size, size), (i * 20, 100, 50)) for i in range(args.batch)]
    questions = ["what colour is the background?"] * args.batch
    encoded = lmm.encode(images)
    rows = []
    for scale in lmm.scales:
        lmm.generate(encoded, questions, scale, args.new_tokens)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            lmm.generate(encoded, questions, scale, args.new_tokens)
            times.append(time.perf_counter() - start)
        rows.append((scale, statistics.median(times) * 1000, lmm.cost(scale)))

    start = time.perf_counter()
    for _ in range(args.repeats):
        lmm.encode(images)
    encode_ms = (time.perf_counter() - start) / args.repeats * 1000

    print(f"model: {lmm.describe()}  batch {args.batch}, {args.new_tokens} new tokens")
    print(f"encode (vision + projector, once per image): {encode_ms:.1f} ms per batch")
    print(f"{'scale':>6} {'generate ms':>12} {'prefill GFLOPs':>15} {'vision share':>13}")
    for scale, ms, flops in rows:
        share = lmm.vision_flops() / flops
        print(f"{scale:>6} {ms:>12.1f} {flops / 1e9:>15.4f} {share:>12.1%}")
    (s0, ms0, f0), (s1, ms1, f1) = rows[0], rows[-1]
    print(f"largest/smallest ({s1}/{s0}): latency x{ms1 / ms0:.2f}, prefill FLOPs x{f1 / f0:.2f}")


if __name__ == "__main__":
    main()
