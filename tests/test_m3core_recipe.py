import json

import pytest
import torch

from data.synthetic import make_split
from m3core import MICRO
from m3core.lmm import NestedLMM
from m3core.recipe import Recipe, run_recipe

MICRO_MODEL = {k: v for k, v in MICRO.__dict__.items() if k != "kind"}


@pytest.fixture(scope="module")
def micro_scenes():
    return make_split("train", 24, seed=0, image_size=32)


def micro_recipe(kind: str = "pool") -> Recipe:
    return Recipe(
        name="micro",
        model={**MICRO_MODEL, "kind": kind},
        stages=[
            {
                "name": "vision",
                "type": "dense",
                "steps": 4,
                "batch_size": 8,
                "checkpoint_every": 2,
                "eval_images": 4,
            },
            {
                "name": "tune",
                "type": "matryoshka",
                "steps": 3,
                "batch_size": 4,
                "checkpoint_every": 3,
                "eval_every": 3,
                "eval_samples": 4,
            },
        ],
    )


def test_recipe_runs_every_stage_and_resumes_without_redoing_one(micro_scenes, tmp_path):
    lmm = run_recipe(micro_recipe(), micro_scenes, tmp_path, micro_scenes, progress=False)
    assert lmm.scales == (1, 4, 16)
    dense = json.loads((tmp_path / "00-vision" / "dense_eval.json").read_text())
    assert set(dense["accuracy"]) == {"background", "colour", "shape", "glyph", "size", "centre"}
    log = (tmp_path / "01-tune" / "train_log.jsonl").read_text().splitlines()
    assert set(json.loads(log[-1])["eval_accuracy"]) == {"1", "4", "16"}
    stamp = (tmp_path / "01-tune" / "model" / "model.safetensors").stat().st_mtime_ns
    run_recipe(micro_recipe(), micro_scenes, tmp_path, progress=False)
    assert (tmp_path / "01-tune" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "model" / "config.json").is_file()


def test_shipped_recipes_load_and_unknown_names_list_them(tmp_path):
    assert Recipe.load("tiny-m3").stages[0]["type"] == "dense"
    with pytest.raises(FileNotFoundError, match="tiny-m3"):
        Recipe.load("no-such-recipe")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "stages": [{"type": "magic"}]}))
    with pytest.raises(ValueError, match="stage 0 needs a type among"):
        Recipe.load(bad)


def test_grown_llm_answers_as_before_and_a_grow_stage_survives_saving(micro_scenes, tmp_path):
    from m3core.modeling import grow_llm
    from m3core.tiny import tiny_lmm
    from tests.conftest import MICRO_WORDS

    lmm = tiny_lmm(MICRO_WORDS, MICRO, seed=0)
    rows = micro_scenes[:4]
    ids, mask = lmm.pad_left(lmm.prompt_ids(rows["question"], [16] * 4))
    encoded = lmm.encode(rows["image"])

    def logits(model):
        tokens = model.visual_tokens(encoded.nested.to(model.dtype), 16)
        from m3core.modeling import encoder_outputs

        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoder_outputs(list(tokens))
            )
        return out.logits

    before = logits(lmm.model)
    grow_llm(lmm.model, 2)
    assert len(lmm.model.model.language_model.layers) == 3
    assert torch.allclose(logits(lmm.model), before, atol=1e-5)
    with pytest.raises(ValueError, match="layers >= 1"):
        grow_llm(lmm.model, 0)

    recipe = Recipe(
        name="grow",
        model=MICRO_MODEL,
        stages=[
            {"name": "grow", "type": "grow", "layers": 1},
            {"name": "tune", "type": "matryoshka", "steps": 2, "batch_size": 4},
        ],
    )
    grown = run_recipe(recipe, micro_scenes, tmp_path, progress=False)
    assert grown.model.config.text_config.num_hidden_layers == 2
    reloaded = NestedLMM.from_pretrained(tmp_path / "model")
    assert len(reloaded.model.model.language_model.layers) == 2
    assert [r.text for r in reloaded.generate(rows["image"], rows["question"], 16)] == [
        r.text for r in grown.generate(rows["image"], rows["question"], 16)
    ]
    bad = tmp_path / "bad-grow.json"
    bad.write_text(json.dumps({"name": "x", "stages": [{"type": "grow"}]}))
    with pytest.raises(ValueError, match="needs 'layers'"):
        Recipe.load(bad)
