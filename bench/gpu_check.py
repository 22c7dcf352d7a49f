"""LLaVA-1.5-7B- and LLaVA-NeXT-7B-shaped nested models with random weights: what each scale costs.

    python bench/gpu_check.py [--quickstart runs/quickstart] [--batch 8] [--new-tokens 8]
                              [--llm-layers N] [--vision-layers N] [--models llava,llava-next]

Real widths (CLIP ViT-L/14 at 336 px, Vicuna-7B: 4096 wide, 11008 MLP, 32000 words) and, on CUDA,
real depths (24 + 32 layers) in bfloat16; latency does not depend on what the weights learned,
so nothing is downloaded. On CPU it runs float32 at reduced depth (1 + 1 layers unless given)
and says so. Per model: encode once, then generate at every scale on the same encoding, side by
side in one run; per-scale latency, throughput and visual tokens; FLOPs of the run's model and of
the full-depth one. The ONNX router (a logistic regression at the 7B feature width, and the
quickstart's own if `--quickstart` holds one) runs on the CUDA provider when onnxruntime has it.
Last, the quickstart's routed scale mix (its default router at its knob on its test split:
generate calls per sample at each scale, a probe router's discarded probe calls included) is
carried to the 7B scales by rank from the largest (tiny-m3's 144/36/9/1 tokens -> 576/144/36/9:
the same pooling steps) and its cost is printed as a ratio to the largest scale, each call
paid at its scale's full generate cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
)

from m3core import NestedLMM
from m3core.config import NestingConfig
from m3core.convert import VICUNA_V1_TEMPLATE
from m3core.features import feature_names
from m3core.modeling import NESTED_CLASSES
from m3core.nesting import pool_scales
from m3core.tokenizer import word_tokenizer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QUESTION = "What is the colour of the car? Answer the question using a single word or phrase."


def config(kind: str, llm_layers: int, vision_layers: int, vocab: int, image_id: int):
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=llm_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    built = (
        LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS)
        if kind == "llava-next"
        else (LlavaConfig(**common))
    )
    built.nesting = NestingConfig(
        scales=pool_scales(24), prompt_template=VICUNA_V1_TEMPLATE, text_tokens=60
    ).to_dict()
    return built


def build(kind: str, llm_layers: int, vision_layers: int, device, dtype) -> NestedLMM:
    tokenizer = word_tokenizer(f"w{i}" for i in range(32000 - 4))  # 32001 ids, <image> is 4
    cfg = config(kind, llm_layers, vision_layers, len(tokenizer), 4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = NESTED_CLASSES[cfg.model_type](cfg)
    finally:
        torch.set_default_dtype(previous)
    size = {"shortest_edge": 336}
    crop = {"height": 336, "width": 336}
    if kind == "llava-next":
        processor = LlavaNextImageProcessorPil(
            size=size, crop_size=crop, image_grid_pinpoints=PINPOINTS
        )
    else:
        processor = LlavaImageProcessorPil(size=size, crop_size=crop, do_pad=True)
    return NestedLMM(model.to(device, dtype), tokenizer, processor)


def full_depth_flops(kind: str, scales, image_size) -> tuple[dict[int, float], float]:
    """Prefill FLOPs of the full-depth model per scale, and the vision tower's share of each
    (paid once per image however many scales run), counted on the meta device (no memory)."""
    tokenizer = word_tokenizer(f"w{i}" for i in range(32000 - 4))
    cfg = config(kind, 32, 24, len(tokenizer), 4)
    with torch.device("meta"):
        model = NESTED_CLASSES[cfg.model_type](cfg)
    lmm = NestedLMM(model, tokenizer, LlavaImageProcessorPil())
    return {s: lmm.cost(s, image_size=image_size) for s in scales}, lmm.image_flops(image_size)


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def measure(lmm: NestedLMM, args) -> dict:
    images = photos(args.batch)
    questions = [QUESTION] * args.batch
    encode_s = timed(lambda: lmm.encode(images), args.repeats)
    encoded, prompts = lmm.encode(images), lmm.tokenize(questions)
    size = images[0].size[::-1]
    rows = {}
    for scale in lmm.scales:
        seconds = timed(
            lambda s=scale: lmm.generate(encoded, prompts, s, args.new_tokens), args.repeats
        )
        rows[scale] = {
            "seconds": seconds,
            "tokens": lmm.token_count(scale, size),
            "flops": lmm.cost(scale, image_size=size),
        }
    return {"encode_s": encode_s, "scales": rows, "image_size": size}


def router_latency(width: int, scales, batch: int, repeats: int) -> tuple[float, list[str]]:
    """A logistic-regression router at `width` features, saved to ONNX and loaded back."""
    from predictor import ScaleRouter

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, width)).astype(np.float32)
    correct = rng.random((512, len(scales))) < np.linspace(0.5, 0.9, len(scales))
    router = ScaleRouter(estimator="logreg", scales=scales, policy="threshold", knob=0.7)
    router.fit(x, correct)
    with tempfile.TemporaryDirectory() as folder:
        router.save(folder)
        loaded = ScaleRouter.load(folder)
        seconds = timed(lambda: loaded.route(x[:batch]), repeats)
        return seconds, loaded.providers or []


def quickstart_mix(folder: Path) -> tuple[dict[int, float], float] | None:
    """(generate calls per test sample at each tiny scale under the quickstart's default
    router: one per sample for a router, every probe call too for a probe router; its routing
    latency per sample on this machine's onnxruntime), or None if there is no quickstart."""
    from pipelines.labels import read_labels
    from predictor import ProbeRouter, load_router

    if not (folder / "labels-test").is_dir():
        return None
    labels = read_labels(folder / "labels-test")
    try:
        router = load_router(folder / "router", expected_scales=labels.scales)
    except FileNotFoundError:
        return None
    start = time.perf_counter()
    if isinstance(router, ProbeRouter):
        probes = {s: labels.probe_at(s) for s in router.probe_scales}
        _, paid = router.route(labels.features, probes)
    else:
        chosen = router.route(labels.features)
        paid = np.asarray(chosen)[:, None] == np.asarray(labels.scales)[None, :]
    per_sample = (time.perf_counter() - start) / len(labels)
    calls = np.asarray(paid, dtype=np.float64).mean(0)
    return dict(zip(labels.scales, calls.tolist(), strict=True)), per_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llava,llava-next")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 8 / 2 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 / 1 on CPU")
    parser.add_argument("--llm-layers", type=int, default=None, help="default: 32 / 1 on CPU")
    parser.add_argument("--vision-layers", type=int, default=None, help="default: 24 / 1 on CPU")
    parser.add_argument("--quickstart", default="runs/quickstart", help="a quickstart's --out")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    args.batch = args.batch or (8 if cuda else 1)
    args.new_tokens = args.new_tokens or (8 if cuda else 2)
    args.repeats = args.repeats or (3 if cuda else 1)
    llm_layers = args.llm_layers or (32 if cuda else 1)
    vision_layers = args.vision_layers or (24 if cuda else 1)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if cuda else "CPU (no CUDA device)"
    print(f"device: {where}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}")
    full = (llm_layers, vision_layers) == (32, 24)
    depth = f"{llm_layers} LLM + {vision_layers} vision layers"
    print(f"depth: {depth}" + ("" if full else " (REDUCED depth: full is 32 + 24)"))
    print(f"batch {args.batch}, {args.new_tokens} new tokens, median of {args.repeats}")

    found = quickstart_mix(Path(args.quickstart))
    results = {}
    for kind in args.models.split(","):
        lmm = build(kind, llm_layers, vision_layers, device, dtype)
        millions = sum(p.numel() for p in lmm.model.parameters()) / 1e6
        print(f"\n== {kind}-7B shape ({millions:.0f} M parameters at this depth) ==")
        result = measure(lmm, args)
        full_flops, vision_flops = full_depth_flops(kind, lmm.scales, result["image_size"])
        results[kind] = result
        print(
            f"encode (vision + projector, once per image): {result['encode_s'] * 1e3:.1f} ms "
            f"per batch; image {result['image_size'][1]}x{result['image_size'][0]}"
        )
        header = f"{'scale':>5} {'tokens':>6} {'ms/batch':>9} {'samples/s':>9} "
        print(header + f"{'TFLOPs (run)':>12} {'TFLOPs (32+24)':>14} {'FLOPs ratio':>11}")
        most = full_flops[lmm.scales[-1]]
        for scale, row in result["scales"].items():
            print(
                f"{scale:>5} {row['tokens']:>6} {row['seconds'] * 1e3:>9.1f} "
                f"{args.batch / row['seconds']:>9.2f} {row['flops'] / 1e12:>12.3f} "
                f"{full_flops[scale] / 1e12:>14.3f} {full_flops[scale] / most:>11.3f}"
            )
        result["full_flops"], result["vision_flops"] = full_flops, vision_flops

    width = len(feature_names(lmm))
    seconds, providers = router_latency(width, tuple(lmm.scales), args.batch, 20)
    print(
        f"\nONNX router (logistic regression, {width} features) on {providers}: "
        f"{seconds * 1e3 / args.batch:.3f} ms per sample"
    )
    if found is None:
        print(
            f"no quickstart at {args.quickstart}: run `make quickstart` (or pass --quickstart) "
            "for the routed scale mix"
        )
        return
    shares, per_sample = found
    print(f"quickstart router on {args.quickstart}: {per_sample * 1e3:.3f} ms per sample")
    tiny = sorted(shares, reverse=True)
    print(
        "quickstart routed mix (tiny scale: generate calls per sample): "
        + ", ".join(f"{s}: {shares[s]:.3f}" for s in sorted(shares))
    )
    for kind, result in results.items():
        big = sorted(result["scales"], reverse=True)
        mapped = {b: shares[t] for t, b in zip(tiny, big, strict=False)}
        largest = big[0]
        rows = result["scales"]
        latency = sum(f * rows[s]["seconds"] for s, f in mapped.items())
        vision = result["vision_flops"]
        flops = vision + sum(f * (result["full_flops"][s] - vision) for s, f in mapped.items())
        tokens = sum(f * rows[s]["tokens"] for s, f in mapped.items())
        print(
            f"{kind}: mix on {', '.join(f'{s}: {f:.3f}' for s, f in sorted(mapped.items()))} -> "
            f"{tokens:.0f} of {rows[largest]['tokens']} visual tokens; latency "
            f"{latency / rows[largest]['seconds']:.3f} of the largest scale's "
            f"({rows[largest]['seconds'] / latency:.2f}x throughput); full-depth FLOPs "
            f"{flops / result['full_flops'][largest]:.3f} of the largest scale's"
        )


if __name__ == "__main__":
    main()
