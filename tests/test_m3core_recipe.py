import hashlib
import json
from dataclasses import asdict

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


# sha256 of the runs the shipped recipes spelled out one stage per run (30 and 10 of them)
# before repeated stages were written once with a repeat count: the same runs must come out.
SPELLED_OUT = {
    "tiny-m3": "a33ab5a88ccfa205150dc256f5810f26544c36d5d11a88a46e5458eb9f9593a0",
    "tiny-mqt": "6dc63fe140093ef1d219597cd1fdaeb57812d425231d395478179d38e71db5bf",
}


@pytest.mark.parametrize("name", sorted(SPELLED_OUT))
def test_shipped_recipes_expand_to_the_runs_they_spelled_out(name):
    runs = Recipe.load(name).runs()
    text = json.dumps([asdict(run) for run in runs], sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == SPELLED_OUT[name]


def test_repeated_stages_keep_the_folder_names_old_runs_resume_from():
    runs = Recipe.load("tiny-m3").runs()
    assert len(Recipe.load("tiny-m3").stages) == 8 and len(runs) == 30
    folders = [run.folder for run in runs]
    assert folders[:9] == [
        "00-vision",
        "01-align",
        "02-tune",
        "03-tune-more",
        "04-tune-3",
        "05-tune-4",
        "06-tune-5",
        "07-tune-6",
        "08-tune-7",
    ]
    assert folders[-1] == "29-tune-28"
    assert [run.config["seed"] for run in runs[6:]] == [0, 0, *range(22)]
    assert [run.config["images"] for run in runs[5:9]] == [4000, 16000, 16000, 64000]
    mqt = [run.folder for run in Recipe.load("tiny-mqt").runs()]
    assert mqt == ["00-queries", "01-tune", *(f"{i:02d}-tune-{i}" for i in range(2, 10))]


def test_a_repeated_stage_runs_once_per_seed_and_resumes(micro_scenes, tmp_path):
    recipe = micro_recipe()
    recipe.stages = [recipe.stages[1] | {"name": "t-{n}", "repeat": 2, "seeds": [3, 4], "steps": 1}]
    assert [(run.name, run.config["seed"]) for run in recipe.runs()] == [("t-1", 3), ("t-2", 4)]
    run_recipe(recipe, micro_scenes, tmp_path, progress=False)
    assert (tmp_path / "00-t-1" / "model").is_dir() and (tmp_path / "01-t-2" / "model").is_dir()
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"t-1", "t-2", "device"}
    stamp = (tmp_path / "01-t-2" / "model" / "model.safetensors").stat().st_mtime_ns
    run_recipe(recipe, micro_scenes, tmp_path, progress=False)
    assert (tmp_path / "01-t-2" / "model" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"repeat": 2}, "its name needs {n}"),
        ({"name": "t-{n}", "repeat": 2, "seeds": [1]}, "1 seeds for 2 runs"),
        ({"name": "t-{n}", "repeat": 2, "seed": 1}, "give its seeds as `seeds`"),
        ({"name": "t-{n}", "repeat": 0}, "repeat must be a whole number >= 1"),
    ],
)
def test_a_malformed_repeat_is_named_when_the_recipe_loads(tmp_path, change, message):
    path = tmp_path / "bad.json"
    stages = micro_recipe().stages
    stages[1] |= change
    path.write_text(json.dumps({"name": "bad", "stages": stages}))
    with pytest.raises(ValueError, match=f"bad.json: stage 1 .*{message}"):
        Recipe.load(path)
