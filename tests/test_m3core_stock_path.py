"""transformers' own entry points on the nested classes honour the nesting.

`model.generate(input_ids=..., pixel_values=..., scale=...)` and the inner model's
`get_image_features(pixel_values, scale=...)` give what `NestedLMM` gives at that scale: the grid
position embedding, the query block, the Resampler and the anyres merge included.
"""

import pytest
import torch

from m3core import MICRO, NestedLMM, TinySpec, tiny_lmm
from m3core.convert import convert
from tests import replicas
from tests.conftest import MICRO_WORDS

QUESTIONS = ["what colour is the left side ?", "what is the right side ?"]


@pytest.fixture(scope="module", params=["pool", "query-block", "resampler", "anyres"])
def lmm(request, tmp_path_factory):
    if request.param in ("pool", "query-block"):
        return tiny_lmm(MICRO_WORDS, TinySpec(**{**MICRO.__dict__, "kind": request.param}))
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "resampler":
        src, tower, _, _ = replicas.original_mqt(root, seed=2)
        out = convert("mqt-llava", src, root / "out", dtype=torch.float32, progress=False)
    else:
        src, tower, _ = replicas.original_llava_next(root, seed=2)
        out = convert("llava-next", src, root / "out", tower, torch.float32, progress=False)
    return NestedLMM.from_pretrained(out, device="cpu")


def stock_inputs(lmm, pics, scale):
    """What a transformers user passes: expanded prompt ids, pixel values (and image sizes)."""
    pixels, sizes = lmm.preprocess(pics)
    sizes_list = [None] * len(pics) if sizes is None else sizes.tolist()
    counts = [lmm.token_count(scale, size) for size in sizes_list]
    ids, mask = lmm.pad_left(lmm.prompt_ids(lmm.tokenize(QUESTIONS), counts))
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    return inputs | ({"image_sizes": sizes} if sizes is not None else {})


def stock_generate(lmm, inputs, scale):
    with torch.no_grad():
        out = lmm.model.generate(
            **inputs,
            **({"scale": scale} if scale else {}),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=lmm.tokenizer.pad_token_id,
            eos_token_id=lmm.tokenizer.eos_token_id,
        )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def pictures(lmm):
    return replicas.images(2) if lmm.anyres else [p.resize((32, 32)) for p in replicas.images(2)]


def test_stock_generate_at_a_scale_equals_nested_lmm(lmm):
    pics = pictures(lmm)
    for scale in (lmm.scales[0], lmm.scales[-2]):
        inputs = stock_inputs(lmm, pics, scale)
        expected = [r.token_ids for r in lmm.generate(pics, QUESTIONS, scale, max_new_tokens=3)]
        for want, got in zip(expected, stock_generate(lmm, inputs, scale), strict=True):
            assert got[: len(want)] == want, scale
        with torch.no_grad():  # a forward call reads the scale off the prompts' image tokens
            logits = lmm.model(**inputs).logits[:, -1]
        assert logits.argmax(-1).tolist() == [row[0] for row in expected]
    # generate without scale= encodes at the largest scale: right for prompts expanded so,
    # a clear error for others
    largest = stock_generate(lmm, stock_inputs(lmm, pics, lmm.scales[-1]), None)
    expected = lmm.generate(pics, QUESTIONS, lmm.scales[-1], max_new_tokens=3)
    assert [row[: len(r.token_ids)] for row, r in zip(largest, expected, strict=True)] == [
        r.token_ids for r in expected
    ]
    with pytest.raises(ValueError, match="pass scale="):
        stock_generate(lmm, stock_inputs(lmm, pics, lmm.scales[0]), None)


def test_get_image_features_gives_the_nested_tokens(lmm):
    pics = pictures(lmm)
    pixels, sizes = lmm.preprocess(pics)
    encoded = lmm.encode(pics)
    for scale in lmm.scales:
        with torch.no_grad():
            stock = lmm.model.model.get_image_features(pixels, scale=scale, image_sizes=sizes)
        for got, want in zip(
            stock.pooler_output, lmm.visual_tokens(encoded, [scale] * 2), strict=True
        ):
            torch.testing.assert_close(got, want)


def test_a_prompt_that_fits_no_scale_is_a_clear_error(lmm):
    pics = pictures(lmm)
    inputs = stock_inputs(lmm, pics, lmm.scales[0])
    with pytest.raises(ValueError, match="prompts hold .* image tokens"):
        lmm.model(**inputs, scale=lmm.scales[-1])
    with pytest.raises(ValueError, match="is not one of this model's scales"):
        lmm.model(**inputs, scale=lmm.scales[-1] + 1000)
    inputs["input_ids"][0, -1] = lmm.image_token_id  # one image token too many
    with pytest.raises(ValueError, match="matches no single scale"):
        lmm.model(**inputs)
