import json

import pytest

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
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"vision", "tune", "device"}


def test_a_run_stopped_in_a_later_stage_keeps_the_finished_stages_timings(micro_scenes, tmp_path):
    recipe = micro_recipe()
    recipe.stages[1]["no_such_option"] = 1  # the run fails only when it reaches this stage
    with pytest.raises(TypeError):
        run_recipe(recipe, micro_scenes, tmp_path, progress=False)
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"vision", "device"}


def test_a_stage_asking_for_more_images_than_the_split_fails_before_training(
    micro_scenes, tmp_path
):
    recipe = micro_recipe()
    recipe.stages[1]["images"] = 25
    with pytest.raises(ValueError, match="'tune' reads the first 25 images but the train split"):
        run_recipe(recipe, micro_scenes, tmp_path, device="cpu", progress=False)
    assert not (tmp_path / "00-vision").exists()


def test_init_from_copies_a_pooled_model_into_a_query_one_and_skips_the_dense_stage(
    micro_scenes, tmp_path
):
    run_recipe(micro_recipe("pool"), micro_scenes, tmp_path / "m3", progress=False)
    donor = NestedLMM.from_pretrained(tmp_path / "m3" / "model").model.state_dict()
    recipe = micro_recipe("query")
    recipe.init_from = str(tmp_path / "m3" / "model")
    recipe.stages[1]["steps"] = 0  # the weights as copied
    mqt = run_recipe(recipe, micro_scenes, tmp_path / "mqt", progress=False).model.state_dict()
    assert not (tmp_path / "mqt" / "00-vision").exists()
    shared = [k for k in mqt if k in donor]
    assert any("vision_tower" in k for k in shared) and any("lm_head" in k for k in shared)
    assert all(mqt[k].equal(donor[k]) for k in shared)
    assert any(k.startswith("model.nesting.") for k in mqt if k not in donor)


def test_init_from_a_model_of_another_size_names_the_clashing_weights(micro_scenes, tmp_path):
    run_recipe(micro_recipe(), micro_scenes, tmp_path / "small", progress=False)
    recipe = micro_recipe()
    recipe.model["hidden"] = 48
    recipe.init_from = str(tmp_path / "small" / "model")
    with pytest.raises(ValueError, match="weights of another shape: .*embed_tokens"):
        run_recipe(recipe, micro_scenes, tmp_path / "wide", progress=False)


def test_shipped_recipes_load_and_unknown_names_list_them(tmp_path):
    assert Recipe.load("tiny-m3").stages[0]["type"] == "dense"
    with pytest.raises(FileNotFoundError, match="tiny-m3"):
        Recipe.load("no-such-recipe")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "stages": [{"type": "magic"}]}))
    with pytest.raises(ValueError, match="stage 0 needs type"):
        Recipe.load(bad)
