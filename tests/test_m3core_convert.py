"""`adaptive-m3 convert` on tiny replicas of LLaVA-1.5 / M3 and MQT-LLaVA in the original layout.

Each replica shares its weights with a transformers model built in the test (the LLM and the
tower of a `LlavaForConditionalGeneration`), which is the reference: logits over the original
vocabulary, pooled tokens by M3's `avg_pool2d` rule, and the Resampler's equations.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil

from m3core import NestedLMM
from m3core.convert import convert
from m3core.modeling import encoder_outputs
from tests import replicas
from tests.test_m3core_nesting import resampler_equations

QUESTIONS = ["what colour is the left side ?", "what is the right side ?", "what colour ?"]


def llava_pixels(tower, pics):
    """LLaVA-1.5's preprocessing written out: pad to a square with the processor's mean
    colour, then CLIP's resize and centre crop."""
    processor = CLIPImageProcessorPil.from_pretrained(tower)
    fill = tuple(int(x * 255) for x in processor.image_mean)
    squares = []
    for pic in pics:
        side = max(pic.size)
        square = Image.new("RGB", (side, side), fill)
        square.paste(pic, ((side - pic.width) // 2, (side - pic.height) // 2))
        squares.append(square)
    return processor(images=squares, return_tensors="pt")["pixel_values"]


def seen_tokens(lmm):
    """Per prefill: (image tokens in the prompt ids, rows of visual tokens handed over)."""
    seen = []

    def hook(module, args, kwargs):
        outputs = kwargs.get("mm_encoder_outputs")
        if outputs:
            rows = [t.shape[0] for t in outputs["image"].pooler_output]
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            seen.append((int((ids == lmm.image_token_id).sum()), rows))

    return seen, lmm.model.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    src, tower, reference = replicas.original_llava(root, seed=5)
    out = convert("llava", src, root / "out", dtype=torch.float32, progress=False)
    return NestedLMM.from_pretrained(out, device="cpu"), tower, reference


def test_converted_llava_equals_the_reference_in_logits_and_pooled_tokens(llava):
    lmm, tower, reference = llava
    pics = replicas.images(3)
    pixels = lmm.pixel_values(pics)
    torch.testing.assert_close(pixels, llava_pixels(tower, pics))
    vocab = reference.config.text_config.vocab_size - 1  # the original has no <image> row
    assert lmm.image_token_id == vocab
    encoded, prompts = lmm.encode(pics), lmm.tokenize(QUESTIONS)
    with torch.no_grad():
        grid = torch.stack(reference.model.get_image_features(pixel_values=pixels).pooler_output)
    for scale in lmm.scales:
        side = math.isqrt(scale)
        maps = grid.reshape(3, 8, 8, -1).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(maps, 8 // side, 8 // side).flatten(2).transpose(1, 2)
        tokens = lmm.visual_tokens(encoded, [scale] * 3)
        torch.testing.assert_close(torch.stack(tokens), pooled, atol=1e-5, rtol=1e-5)
        seen, handle = seen_tokens(lmm)
        records = lmm.generate(encoded, prompts, scale=scale, max_new_tokens=2)
        handle.remove()
        assert seen[0] == (3 * scale, [scale] * 3)
        assert all(r.visual_tokens == scale for r in records)
    full = lmm.scales[-1]
    ids, mask = lmm.pad_left(lmm.prompt_ids(prompts, [full] * 3))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = lmm.model(
            input_ids=ids,
            attention_mask=mask,
            mm_encoder_outputs=encoder_outputs(lmm.visual_tokens(encoded, [full] * 3)),
        ).logits
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], atol=1e-5, rtol=1e-5)
    records = lmm.generate(encoded, prompts, scale=full, max_new_tokens=4)
    with torch.no_grad():
        greedy = reference.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=4,
            do_sample=False,
            suppress_tokens=[vocab],
            pad_token_id=lmm.tokenizer.pad_token_id,
        )[:, ids.shape[1] :]
    for record, row in zip(records, greedy.tolist(), strict=True):
        assert record.token_ids == row[: len(record.token_ids)]


@pytest.fixture(scope="module")
def mqt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqt")
    src, tower, reference, weights = replicas.original_mqt(root, seed=6)
    out = convert("mqt-llava", src, root / "out", dtype=torch.float32, progress=False)
    return NestedLMM.from_pretrained(out, device="cpu"), tower, reference, weights


def test_converted_mqt_llava_follows_the_resampler_equations_at_every_m(mqt):
    lmm, tower, reference, weights = mqt
    assert lmm.nesting.kind == "resampler" and lmm.scales == (1, 2, 4, 8, 16)
    assert lmm.model.model.multi_modal_projector is None
    pics = replicas.images(2)
    pixels = llava_pixels(tower, pics)
    with torch.no_grad():
        hidden = reference.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    features = hidden[-2][:, 1:]  # mm_vision_select_layer -2, CLS dropped
    named = {k.removeprefix("model.query_abstractor."): v.float() for k, v in weights.items()}
    encoded = lmm.encode(pics)
    vocab = reference.config.text_config.vocab_size - 1
    prompts = lmm.tokenize(QUESTIONS[:2])
    for m in lmm.scales:
        expected = resampler_equations(named | {"heads": 16}, features, m, 8)
        tokens = torch.stack(lmm.visual_tokens(encoded, [m, m]))
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
        seen, handle = seen_tokens(lmm)
        records = lmm.generate(encoded, prompts, scale=m, max_new_tokens=2)
        handle.remove()
        assert seen[0] == (2 * m, [m, m]) and all(r.visual_tokens == m for r in records)
        ids, mask = lmm.pad_left(lmm.prompt_ids(prompts, [m, m]))
        with torch.no_grad():
            want = reference(
                input_ids=ids,
                attention_mask=mask,
                mm_encoder_outputs=encoder_outputs(list(expected)),
            ).logits[..., :vocab]
            got = lmm.model(
                input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoder_outputs(list(tokens))
            ).logits[..., :vocab]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["llava", "mqt"])
def test_mixed_scale_batches_equal_per_scale_batches(fixture, request):
    lmm = request.getfixturevalue(fixture)[0]
    pics = replicas.images(3)
    scales = [lmm.scales[0], lmm.scales[-1], lmm.scales[1]]
    mixed = lmm.generate(pics, QUESTIONS, scale=scales, max_new_tokens=3)
    for i, record in enumerate(mixed):
        alone = lmm.generate([pics[i]], [QUESTIONS[i]], scale=scales[i], max_new_tokens=3)[0]
        assert alone.token_ids == record.token_ids
        assert alone.confidence == pytest.approx(record.confidence, abs=1e-4)


def test_a_bin_checkpoint_converts_like_safetensors(tmp_path, llava):
    src, _, _ = replicas.original_llava(tmp_path, seed=5, bin_weights=True)
    out = convert("llava", src, tmp_path / "out", dtype=torch.float32, progress=False)
    from_bin = NestedLMM.from_pretrained(out, device="cpu")
    for key, value in llava[0].model.state_dict().items():
        assert torch.equal(from_bin.model.state_dict()[key], value), key


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | changes))

    return edit


def edit_weights(key, value):
    def edit(folder):
        from safetensors.torch import load_file, save_file

        index = json.loads((folder / "model.safetensors.index.json").read_text())
        name = index["weight_map"].get(key, "model-00001-of-00002.safetensors")
        state = load_file(str(folder / name))
        if value is None:
            del state[key]
        else:
            state[key] = value
            index["weight_map"][key] = name
        save_file(state, str(folder / name), metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return edit


@pytest.mark.parametrize(
    "fmt, edit, error, message",
    [
        (
            "llava",
            edit_config(mm_vision_tower="openai/clip-vit-large-patch14-336"),
            FileNotFoundError,
            "not a local folder.*pass --vision-tower",
        ),
        ("llava", edit_config(model_type="llama"), ValueError, "not the original LLaVA format"),
        ("llava", edit_config(image_aspect_ratio="anyres"), ValueError, "use --format llava-next"),
        (
            "llava",
            edit_weights("model.layers.0.mlp.up_proj.weight", None),
            ValueError,
            "missing: model.language_model.layers.0.mlp.up_proj.weight",
        ),
        (
            "llava",
            edit_weights("model.extra.weight", torch.zeros(2)),
            ValueError,
            "unexpected: model.extra.weight",
        ),
        (
            "llava",
            edit_weights("model.mm_projector.0.weight", torch.zeros(32, 5)),
            ValueError,
            r"wrong shape: model.multi_modal_projector.linear_1.weight: checkpoint \[32, 5\]",
        ),
        (
            "mqt-llava",
            edit_weights("model.layers.0.mlp.up_proj.weight", None),
            ValueError,
            "has no model.query_abstractor.query|missing",
        ),
    ],
)
def test_bad_originals_are_refused_before_anything_is_written(tmp_path, fmt, edit, error, message):
    src, _, _ = replicas.original_llava(tmp_path, seed=1)
    edit(src)
    with pytest.raises(error, match=message):
        convert(fmt, src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_converted_folder_is_not_overwritten(tmp_path):
    src, _, _ = replicas.original_llava(tmp_path, seed=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert("llava", src, tmp_path / "out", progress=False)
    shutil.rmtree(tmp_path / "out")
