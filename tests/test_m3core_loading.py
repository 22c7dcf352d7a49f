"""Strict loading: stock llava-hf folders of every layout load exactly, bad folders are named."""

import json
import shutil

import pytest
import torch

from m3core import NestedLMM
from m3core.modeling import encoder_outputs
from tests import replicas

QUESTIONS = ["what colour is the left side ?", "what is the right side ?"]


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """(the transformers Llava, its folder as transformers saves it, its folder in the
    model's own key names)."""
    model, tok, processor = replicas.llava_hf(seed=3)
    root = tmp_path_factory.mktemp("stock")
    saved = replicas.save_hf(model, tok, processor, root / "saved")
    own = replicas.save_hf(model, tok, processor, root / "own", own_names=True)
    return model, saved, own


def reference_logits(reference, lmm, pics, scale):
    ids, mask = lmm.pad_left(lmm.prompt_ids(lmm.tokenize(QUESTIONS), [scale] * len(pics)))
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask, pixel_values=lmm.pixel_values(pics))
    return ids, mask, logits.logits


def nested_logits(lmm, pics, ids, mask, scale):
    tokens = lmm.visual_tokens(lmm.encode(pics), [scale] * len(pics))
    with torch.no_grad():
        out = lmm.model(
            input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoder_outputs(tokens)
        )
    return out.logits


@pytest.mark.parametrize("layout", ["saved", "own"])
def test_stock_folder_equals_transformers_llava_in_logits_and_answers(stock, layout):
    reference, saved, own = stock
    folder = saved if layout == "saved" else own
    first = NestedLMM.from_pretrained(folder, device="cpu")
    second = NestedLMM.from_pretrained(folder, device="cpu")
    pics = replicas.images(2)
    full = first.scales[-1]
    ids, mask, expected = reference_logits(reference, first, pics, full)
    got = nested_logits(first, pics, ids, mask, full)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(nested_logits(second, pics, ids, mask, full), got)  # two loads agree

    records = first.generate(pics, QUESTIONS, scale=full, max_new_tokens=4)
    with torch.no_grad():
        greedy = reference.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=first.pixel_values(pics),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=first.tokenizer.pad_token_id,
        )[:, ids.shape[1] :]
    for record, row in zip(records, greedy.tolist(), strict=True):
        assert record.token_ids == row[: len(record.token_ids)]


def edited_copy(source, target, edit):
    shutil.copytree(source, target)
    edit(target)
    return target


def set_model_type(name):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        config["model_type"] = name
        (path / "config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (set_model_type("llama"), "model_type 'llama' is not a Llava checkpoint"),
        (set_model_type("llava_llama"), "original LLaVA format.*adaptive-m3 convert"),
        (lambda p: replicas.set_weight(p, "lm_head.weight", None), "missing: lm_head.weight"),
        (
            lambda p: replicas.set_weight(p, "model.extra.weight", torch.zeros(2)),
            "unexpected: model.extra.weight",
        ),
        (
            lambda p: replicas.set_weight(p, "lm_head.weight", torch.zeros(3, 32)),
            r"wrong shape: lm_head.weight: checkpoint \[3, 32\], model \[\d+, 32\]",
        ),
    ],
)
def test_bad_folders_fail_naming_what_is_wrong(stock, tmp_path, edit, message):
    folder = edited_copy(stock[2], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        NestedLMM.from_pretrained(folder, device="cpu")
