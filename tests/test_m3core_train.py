import contextlib

import pytest
import torch

from m3core import MICRO, TinySpec, tiny_lmm
from m3core.train import SequenceBuilder, TrainConfig, matryoshka_loss, train
from tests.conftest import MICRO_WORDS


def full_batch_losses(lmm, dataset) -> dict[int, float]:
    rows = [dataset[i] for i in range(len(dataset))]
    turns = [[(r["question"], r["answers"][0])] for r in rows]
    with torch.no_grad():
        _, losses = matryoshka_loss(
            lmm.model.eval() and lmm,
            SequenceBuilder(lmm),
            [r["image"] for r in rows],
            turns,
            lmm.scales,
        )
    return losses


def test_a_few_dozen_steps_lower_the_loss_at_every_scale(micro_lmm, colour_dataset, tmp_path):
    before = full_batch_losses(micro_lmm, colour_dataset)
    config = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=40)
    result = train(micro_lmm, colour_dataset, config, tmp_path, progress=False)
    after = full_batch_losses(micro_lmm, colour_dataset)
    assert result.steps == 40
    for scale in micro_lmm.scales:
        assert after[scale] < before[scale] - 0.1, (scale, before[scale], after[scale])
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 40


def test_resumed_run_equals_an_uninterrupted_one(colour_dataset, tmp_path):
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    straight = tiny_lmm(MICRO_WORDS, MICRO, seed=1)
    train(straight, colour_dataset, config, tmp_path / "straight", progress=False)

    stopped = []
    interrupted = tiny_lmm(MICRO_WORDS, MICRO, seed=1)

    def crash(step, loss):
        if step == 4:
            stopped.append(step)
            raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        train(
            interrupted, colour_dataset, config, tmp_path / "resumed", on_step=crash, progress=False
        )
    assert stopped == [4]
    resumed = tiny_lmm(MICRO_WORDS, MICRO, seed=2)
    train(resumed, colour_dataset, config, tmp_path / "resumed", progress=False)
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_frozen_parts_do_not_move(colour_dataset, tmp_path):
    lmm = tiny_lmm(MICRO_WORDS, TinySpec(**{**MICRO.__dict__, "kind": "query"}), seed=0)
    tower = {k: v.clone() for k, v in lmm.model.model.vision_tower.state_dict().items()}
    config = TrainConfig(steps=3, batch_size=4, trainable=("nesting", "llm"), checkpoint_every=3)
    train(lmm, colour_dataset, config, tmp_path, progress=False)
    for key, value in lmm.model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower[key]), key


def test_scales_per_step_follows_each_paper_unless_asked_to_sample():
    from m3core.train import scales_for_step

    scales = (1, 9, 36, 144)
    assert scales_for_step(scales, "pool", TrainConfig(), 0) == scales
    assert len(scales_for_step(scales, "query", TrainConfig(), 0)) == 1
    sampled = [
        scales_for_step(scales, "pool", TrainConfig(scales_per_step=2), s) for s in range(40)
    ]
    assert all(len(s) == 2 and set(s) <= set(scales) for s in sampled)
    assert len(set(sampled)) > 1
    assert sampled == [
        scales_for_step(scales, "pool", TrainConfig(scales_per_step=2), s) for s in range(40)
    ]


def test_question_first_template_gives_each_turn_its_own_sequence_with_its_image(colour_dataset):
    spec = TinySpec(**{**MICRO.__dict__, "prompt_template": "{question} <image>"})
    lmm = tiny_lmm(MICRO_WORDS, spec, seed=0)
    builder = SequenceBuilder(lmm)
    turns = [("what colour is the background?", "red"), ("what colour is it?", "blue")]
    built = builder.build(turns, 4)
    assert len(built) == 2
    for (question, answer), (ids, labels) in zip(turns, built, strict=True):
        prompt = lmm.prompt_ids([question], [4])[0]
        target = builder.words(answer) + [lmm.tokenizer.eos_token_id]
        assert ids == prompt + target
        assert labels == [-100] * len(prompt) + target
    assert len(SequenceBuilder(tiny_lmm(MICRO_WORDS, MICRO, seed=0)).build(turns, 4)) == 1

    a, b = colour_dataset[0], colour_dataset[2]
    turns_a = [(a["question"], a["answers"][0]), ("what colour is it?", a["answers"][0])]
    turns_b = [(b["question"], b["answers"][0])]

    def loss(images, image_turns):
        with torch.no_grad():
            value, _ = matryoshka_loss(lmm, builder, images, image_turns, (4,))
        return float(value)

    paired = loss([a["image"], b["image"]], [turns_a, turns_b])
    assert abs(paired - loss([b["image"], a["image"]], [turns_b, turns_a])) < 1e-5
    assert abs(paired - loss([b["image"], a["image"]], [turns_a, turns_b])) > 1e-4


def test_a_stage_capped_at_n_images_trains_as_on_a_split_of_n(colour_dataset, tmp_path):
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=4, images=8)
    capped = tiny_lmm(MICRO_WORDS, MICRO, seed=1)
    train(capped, colour_dataset, config, tmp_path / "capped", progress=False)
    small = tiny_lmm(MICRO_WORDS, MICRO, seed=1)
    uncapped = TrainConfig(**{**config.__dict__, "images": None})
    first_eight = colour_dataset.select(range(16))  # two questions per image
    train(small, first_eight, uncapped, tmp_path / "small", progress=False)
    for (name, a), (_, b) in zip(
        capped.model.state_dict().items(), small.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    too_many = TrainConfig(steps=1, images=25)
    with pytest.raises(ValueError, match="first 25 images but the train split has 24"):
        train(capped, colour_dataset, too_many, tmp_path / "too-many", progress=False)
