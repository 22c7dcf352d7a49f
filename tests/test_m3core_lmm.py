import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from m3core import NestedLMM, TinySpec, tiny_lmm
from m3core.features import PROBE_TOP_K, probe_feature_names, probe_vector
from m3core.modeling import encoder_outputs
from m3core.tokenizer import word_tokenizer
from tests.conftest import MICRO_WORDS

QUESTION = "what colour is the left side ?"


def images(n: int, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (40 * i % 255, 90, 200 - 30 * i)) for i in range(n)]


def count_image_embeddings(lmm: NestedLMM) -> list[tuple[int, list[int]]]:
    """Record (image token ids in the prompt, rows of each image's features) per LLM prefill."""
    seen = []

    def hook(module, args, kwargs):
        outputs = kwargs.get("mm_encoder_outputs")
        if outputs:
            ids = kwargs["input_ids"]
            rows = [t.shape[0] for t in outputs["image"].pooler_output]
            seen.append((int((ids == lmm.image_token_id).sum()), rows))

    handle = lmm.model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def test_every_scale_sends_exactly_scale_embeddings(micro_lmm):
    encoded = micro_lmm.encode(images(2))
    for scale in micro_lmm.scales:
        seen, handle = count_image_embeddings(micro_lmm)
        records = micro_lmm.generate(encoded, [QUESTION] * 2, scale=scale, max_new_tokens=2)
        handle.remove()
        assert seen[0] == (2 * scale, [scale, scale])
        assert all(r.visual_tokens == scale == r.scale for r in records)


def test_identical_images_are_encoded_once(micro_lmm):
    a, b = images(2)
    same_pixels = a.copy()
    seen = []
    handle = micro_lmm.model.model.vision_tower.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[0])
    )
    encoded = micro_lmm.encode([a, b, same_pixels, b])
    handle.remove()
    assert seen == [2]
    alone = micro_lmm.encode([a, b])
    torch.testing.assert_close(encoded.nested, alone.nested[[0, 1, 0, 1]])
    assert len(encoded.distinct) == 2  # shared, not copied, also after selecting samples
    assert encoded.select([3, 0]).distinct is encoded.distinct
    torch.testing.assert_close(encoded.select([3, 0]).nested, alone.nested[[1, 0]])


def greedy_without_cache(lmm, encoded, questions, scales, steps):
    ids, mask = lmm.pad_left(lmm.prompt_ids(questions, scales))
    tokens = encoder_outputs(lmm.visual_tokens(encoded, scales))
    out = []
    for _ in range(steps):
        logits = lmm.model(
            input_ids=ids, attention_mask=mask, mm_encoder_outputs=tokens, use_cache=False
        ).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)


def test_kv_cache_generate_equals_greedy_loop_and_mixed_batch_equals_single(micro_lmm):
    encoded = micro_lmm.encode(images(3))
    scales = [micro_lmm.scales[0], micro_lmm.scales[-1], micro_lmm.scales[1]]
    questions = [QUESTION, "what colour is the right side ?", "what is the colour ?"]
    records = micro_lmm.generate(encoded, questions, scale=scales, max_new_tokens=4)
    # the micro model is random: compare against the uncached loop token by token
    expected = greedy_without_cache(micro_lmm, encoded, questions, scales, 4)
    for record, row in zip(records, expected.tolist(), strict=True):
        assert record.token_ids == row[: len(record.token_ids)]
    for i, record in enumerate(records):
        single = micro_lmm.generate(encoded.select([i]), [questions[i]], scales[i], 4)[0]
        assert single.token_ids == record.token_ids
        assert single.confidence == pytest.approx(record.confidence, abs=1e-4)
    prompts = micro_lmm.tokenize(questions)  # tokenized once, any scale, any subset
    again = micro_lmm.generate(encoded, prompts, scale=scales, max_new_tokens=4)
    assert [r.token_ids for r in again] == [r.token_ids for r in records]
    part = micro_lmm.generate(encoded.select([2]), prompts.select([2]), scales[2], 4)[0]
    assert part.token_ids == records[2].token_ids


def test_save_load_round_trip_gives_identical_logits(micro_lmm, tmp_path):
    micro_lmm.save_pretrained(tmp_path)
    loaded = NestedLMM.from_pretrained(tmp_path, device="cpu")
    assert loaded.scales == micro_lmm.scales
    assert loaded.nesting.kind == micro_lmm.nesting.kind
    pics = images(2)
    for lmm_ in (micro_lmm, loaded):
        lmm_.model.eval()
    a, b = micro_lmm.encode(pics), loaded.encode(pics)
    assert torch.equal(a.nested, b.nested)
    scale = micro_lmm.scales[-1]
    ids, mask = micro_lmm.pad_left(micro_lmm.prompt_ids([QUESTION] * 2, [scale] * 2))
    with torch.no_grad():
        la = micro_lmm.model(
            input_ids=ids,
            attention_mask=mask,
            mm_encoder_outputs=encoder_outputs(micro_lmm.visual_tokens(a, [scale] * 2)),
        ).logits
        lb = loaded.model(
            input_ids=ids,
            attention_mask=mask,
            mm_encoder_outputs=encoder_outputs(loaded.visual_tokens(b, [scale] * 2)),
        ).logits
    assert torch.equal(la, lb)


@pytest.fixture(scope="module")
def stock_llava_dir(tmp_path_factory):
    """A tiny random llava-hf style folder (CLIP tower, 24x24 patch grid) saved by transformers."""
    path = tmp_path_factory.mktemp("stock-llava")
    tokenizer = word_tokenizer(MICRO_WORDS + ["USER", ":", "ASSISTANT"])
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=48,
        patch_size=2,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}
    ).save_pretrained(path)
    return path


def test_stock_llava_folder_loads_and_runs_at_every_scale(stock_llava_dir):
    lmm = NestedLMM.from_pretrained(stock_llava_dir, device="cpu")
    assert lmm.nesting.kind == "pool"
    assert lmm.scales == (1, 9, 36, 144, 576)
    encoded = lmm.encode(images(2, size=60))
    assert encoded.nested.shape[:2] == (2, 576)
    for scale in lmm.scales:
        seen, handle = count_image_embeddings(lmm)
        records = lmm.generate(encoded, [QUESTION] * 2, scale=scale, max_new_tokens=2)
        handle.remove()
        assert seen[0][1] == [scale, scale]
        assert len(records) == 2
    costs = [lmm.cost(s) for s in lmm.scales]
    assert costs == sorted(costs)


def test_stock_llava_refuses_query_nesting_without_a_config(stock_llava_dir):
    with pytest.raises(ValueError, match="no trained queries"):
        NestedLMM.from_pretrained(stock_llava_dir, nesting="query", device="cpu")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        NestedLMM.from_pretrained(tmp_path / "nowhere")


def test_cost_grows_with_scale_and_tiny_tower_is_small():
    lmm = tiny_lmm(MICRO_WORDS, TinySpec())
    costs = [lmm.cost(s) for s in lmm.scales]
    assert costs == sorted(costs) and costs[0] > 0
    assert lmm.vision_flops() / lmm.cost(lmm.scales[-1]) <= 0.15


def test_bad_scale_lists_the_valid_ones(micro_pool):
    with pytest.raises(ValueError, match=r"scale 5 is not one of this model's scales \[1, 4, 16\]"):
        micro_pool.generate(images(1), [QUESTION], scale=5)


def test_other_image_modes_are_converted(micro_pool):
    modes = [Image.new("RGBA", (32, 32)), Image.new("L", (40, 20)), Image.new("P", (32, 32))]
    records = micro_pool.generate(modes, [QUESTION] * 3, scale=1, max_new_tokens=1)
    assert len(records) == 3


def truncated_png() -> Image.Image:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:60]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: Image.new("RGB", (0, 0)), "sample 1: empty_image: image has zero size"),
        (truncated_png, "sample 1: unreadable_image: image is truncated or corrupt"),
        (lambda: "not an image", "sample 1: unreadable_image: expected a PIL image"),
    ],
)
def test_bad_images_name_the_sample(micro_pool, bad, message):
    with pytest.raises(ValueError, match=message):
        micro_pool.generate([images(1)[0], bad()], [QUESTION] * 2, scale=1)


def test_empty_question_and_mismatched_lengths(micro_pool):
    with pytest.raises(ValueError, match="sample 1: empty_question: question is empty"):
        micro_pool.generate(images(2), [QUESTION, "  "], scale=1)
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        micro_pool.generate(images(2), [QUESTION], scale=1)
    with pytest.raises(ValueError, match="got 1 scales for 2 samples"):
        micro_pool.generate(images(2), [QUESTION] * 2, scale=[1])


def reference_probe(model, ids: list[int], pixels, tokens) -> tuple[torch.Tensor, int]:
    """Probe features and the greedy first token by transformers' own Llava, one unpadded
    forward with output_hidden_states: from the pixels (the stock image path), or with the
    embeddings of the prompt's image tokens replaced by given visual `tokens`."""
    with torch.no_grad():
        if tokens is None:
            out = model(
                input_ids=torch.tensor([ids]), pixel_values=pixels, output_hidden_states=True
            )
        else:
            at = ids.index(model.config.image_token_id)
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            embeds[:, at : at + len(tokens)] = tokens
            out = model(inputs_embeds=embeds, output_hidden_states=True)
    logprobs = out.logits[:, -1].log_softmax(-1)
    return probe_vector(out.hidden_states[-1][:, -1], logprobs)[0], int(logprobs.argmax())


def avg_pool(grid: torch.Tensor, scale: int) -> torch.Tensor:
    """M3's pooling written out: a (G*G, D) grid to (s, D) block means, row-major."""
    side, out = math.isqrt(grid.shape[0]), math.isqrt(scale)
    blocks = grid.reshape(out, side // out, out, side // out, -1)
    return blocks.mean(dim=(1, 3)).reshape(scale, -1)


def test_probe_features_equal_transformers_llava_on_the_same_weights(stock_llava_dir):
    """The probe read out of generate's own prefill (left-padded, mixed prompt lengths)
    equals transformers' LlavaForConditionalGeneration with output_hidden_states=True: at the
    largest scale from the pixels, at small scales with the grid pooled by hand."""
    lmm = NestedLMM.from_pretrained(stock_llava_dir, device="cpu")
    reference = LlavaForConditionalGeneration.from_pretrained(stock_llava_dir).eval()
    pics, questions = images(2, size=60), [QUESTION, "what colour ?"]
    assert len(probe_feature_names(lmm)) == 32 + 3 + PROBE_TOP_K
    pixels = lmm.pixel_values(pics)
    with torch.no_grad():
        grids = reference.model.get_image_features(pixel_values=pixels).pooler_output
    for scale in (1, 9, 576):
        records = lmm.generate(pics, questions, scale=scale, max_new_tokens=2, probe=True)
        ids = lmm.prompt_ids(questions, [scale] * 2)
        for i, record in enumerate(records):
            tokens = None if scale == 576 else avg_pool(grids[i], scale)
            expected, first = reference_probe(reference, ids[i], pixels[i : i + 1], tokens)
            np.testing.assert_allclose(record.probe, expected.numpy(), rtol=1e-4, atol=1e-5)
            assert record.token_ids[0] == first and record.prefill_seconds > 0
    assert lmm.generate(pics, questions, scale=1, max_new_tokens=1)[0].probe is None


def test_probe_equals_a_separate_forward_and_teacher_forcing_scores_the_greedy_answer(micro_lmm):
    """generate's probe = a right-padded forward's last prompt position, for pooled and query
    nesting and a batch split in two; the teacher-forced log-probability of the greedy answer
    is its summed token log-probabilities from generate."""
    encoded = micro_lmm.encode(images(3))
    prompts = micro_lmm.tokenize([QUESTION, "what colour ?", "what is the right side ?"])
    for scale in micro_lmm.scales:
        records = micro_lmm.generate(
            encoded, prompts, scale=scale, max_new_tokens=3, batch_size=2, probe=True
        )
        tokens = micro_lmm.visual_tokens(encoded, [scale] * 3)
        contexts = micro_lmm.prompt_ids(prompts, [scale] * 3)
        ids, mask = micro_lmm.pad_right(contexts)
        with torch.no_grad():
            out = micro_lmm.model(
                input_ids=ids,
                attention_mask=mask,
                mm_encoder_outputs=encoder_outputs(tokens),
                output_hidden_states=True,
            )
        last = torch.tensor([len(c) - 1 for c in contexts])
        rows = torch.arange(3)
        expected = probe_vector(
            out.hidden_states[-1][rows, last], out.logits[rows, last].log_softmax(-1)
        )
        np.testing.assert_allclose(
            np.stack([r.probe for r in records]), expected.numpy(), rtol=1e-4, atol=1e-5
        )
        answers = [r.token_ids for r in records]
        scored = micro_lmm.continuation_logprob(encoded, prompts, answers, scale, batch_size=2)
        summed = [r.confidence * len(r.token_ids) for r in records]
        np.testing.assert_allclose(scored, summed, rtol=1e-4)
    assert micro_lmm.answer_ids(["red"])[0][-1] == micro_lmm.tokenizer.eos_token_id
