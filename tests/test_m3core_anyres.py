"""LLaVA-NeXT (anyres) at M3's scales: every crop pooled to the scale before the merge.

References: transformers' own LlavaNextForConditionalGeneration at the full scale, and below it
M3's rule written out here (per-crop `avg_pool2d`, the crops laid side by side, M3's unpad
arithmetic, a newline token after every row, the base crop first).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from m3core import NestedLMM
from m3core.convert import convert
from m3core.modeling import encoder_outputs
from tests import replicas
from tests.test_m3core_convert import seen_tokens

QUESTIONS = ["what colour is the left side ?", "what is the right side ?", "what ?", "side ?"]


def best_layout(width: int, height: int, crop: int) -> tuple[int, int]:
    """M3's select_best_resolution over the pinpoints, as (rows, cols) of crops."""
    best, most, least = None, 0, float("inf")
    for pin_w, pin_h in replicas.PINPOINTS:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (pin_w, pin_h), effective, wasted
    return best[1] // crop, best[0] // crop


def m3_tokens(reference, pixels, width, height, scale) -> torch.Tensor:
    """One image's visual tokens by M3's llava_arch: pool every crop, then unpad + newline."""
    crop, grid = replicas.CROP, replicas.CROP // replicas.PATCH
    rows, cols = best_layout(width, height, crop)
    crops = pixels[: 1 + rows * cols]
    with torch.no_grad():
        hidden = reference.model.vision_tower(crops, output_hidden_states=True).hidden_states
        features = reference.model.multi_modal_projector(hidden[-2][:, 1:])
    dim = features.shape[-1]
    k = math.isqrt(scale)
    maps = features.reshape(len(crops), grid, grid, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(maps, grid // k, grid // k).permute(0, 2, 3, 1)  # (crops, k, k, D)
    base = pooled[0].reshape(k * k, dim)
    merged = pooled[1:].reshape(rows, cols, k, k, dim).permute(0, 2, 1, 3, 4)
    merged = merged.reshape(rows * k, cols * k, dim)
    tall, wide = merged.shape[:2]
    if width / height > wide / tall:
        pad = (tall - int(height * wide / width)) // 2
        merged = merged[pad : tall - pad]
    else:
        pad = (wide - int(width * tall / height)) // 2
        merged = merged[:, pad : wide - pad]
    newline = reference.model.image_newline.detach().expand(merged.shape[0], 1, dim)
    return torch.cat([base, torch.cat([merged, newline], 1).reshape(-1, dim)])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    src, tower, reference = replicas.original_llava_next(root, seed=7)
    out = convert(
        "llava-next", src, root / "out", vision_tower=tower, dtype=torch.float32, progress=False
    )
    return NestedLMM.from_pretrained(out, device="cpu"), reference


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    model, tok, processor = replicas.llava_next_hf(seed=8)
    folder = replicas.save_hf(model, tok, processor, tmp_path_factory.mktemp("stock") / "f")
    return NestedLMM.from_pretrained(folder, device="cpu"), model


@pytest.mark.parametrize("fixture", ["converted", "stock"])
def test_full_scale_equals_transformers_llava_next(fixture, request):
    lmm, reference = request.getfixturevalue(fixture)
    vocab = reference.config.text_config.vocab_size - (fixture == "converted")
    pics = replicas.images(4)
    inputs = lmm.image_processor(images=pics, return_tensors="pt")
    encoded, prompts = lmm.encode(pics), lmm.tokenize(QUESTIONS)
    full = lmm.scales[-1]
    tokens = lmm.visual_tokens(encoded, [full] * 4)
    ids, mask = lmm.pad_left(lmm.prompt_ids(prompts, [len(t) for t in tokens]))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, **inputs).logits[..., :vocab]
        got = lmm.model(
            input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoder_outputs(tokens)
        ).logits[..., :vocab]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["converted", "stock"])
def test_each_crop_is_pooled_before_the_merge_at_every_scale(fixture, request):
    lmm, reference = request.getfixturevalue(fixture)
    pics = replicas.images(4)
    pixels = lmm.image_processor(images=pics, return_tensors="pt")["pixel_values"]
    encoded, prompts = lmm.encode(pics), lmm.tokenize(QUESTIONS)
    for scale in lmm.scales:
        expected = [m3_tokens(reference, pixels[i], *pic.size, scale) for i, pic in enumerate(pics)]
        got = lmm.visual_tokens(encoded, [scale] * 4)
        for mine, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        counts = [len(t) for t in expected]
        assert counts == [lmm.token_count(scale, pic.size[::-1]) for pic in pics]
        seen, handle = seen_tokens(lmm)
        records = lmm.generate(encoded, prompts, scale=scale, max_new_tokens=2)
        handle.remove()
        assert seen[0] == (sum(counts), counts)
        assert [r.visual_tokens for r in records] == counts
        assert len(set(counts)) > 1  # the layouts differ, so the counts do


def test_an_image_is_encoded_once_and_mixed_scales_equal_single_scales(converted):
    lmm, _ = converted
    pics = replicas.images(4)
    calls = []
    handle = lmm.model.model.vision_tower.register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0])
    )
    encoded = lmm.encode(pics)
    scales = list(lmm.scales)
    mixed = lmm.generate(encoded, QUESTIONS, scale=scales, max_new_tokens=3)
    for i, record in enumerate(mixed):
        alone = lmm.generate(encoded.select([i]), [QUESTIONS[i]], scales[i], max_new_tokens=3)[0]
        assert alone.token_ids == record.token_ids
        assert alone.confidence == pytest.approx(record.confidence, abs=1e-4)
    handle.remove()
    layouts = [best_layout(*pic.size, replicas.CROP) for pic in pics]
    assert calls == [sum(1 + r * c for r, c in layouts)]  # one tower pass, every crop once


def test_cost_counts_every_crop_and_the_layouts_tokens(converted):
    lmm, _ = converted
    wide, square = (20, 60), (32, 32)  # (height, width): 1 x 3 crops vs 2 x 2
    for scale in lmm.scales:
        assert lmm.cost(scale, 10, wide) < lmm.cost(scale, 10, square)
    assert lmm.token_count(1, wide) == 1 + 1 * (3 + 1)  # base + one row of 3 and its newline
    for scale in lmm.scales:  # what the context check assumes: the 2 x 2 layout, untrimmed
        assert lmm.most_visual_tokens(scale) == lmm.token_count(scale, square)
        assert lmm.most_visual_tokens(scale) > lmm.token_count(scale, wide)
