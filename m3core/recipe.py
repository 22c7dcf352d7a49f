"""Staged training recipes: a JSON file names the tiny model and its stages, in order.

Stage types: `dense` (vision tower on per-patch targets, `DenseConfig`) and `matryoshka`
(`TrainConfig`: which parts learn, at which scales). Each run of a stage writes `NN-name/`
under the output folder; a run whose `model/` exists is done, so running the recipe again
resumes. A stage with `repeat` runs that many times in a row, each time from where the last
one stopped, the k-th time with `seeds[k]` (default: the recipe's seed every time); its name
holds `{n}`, counted from `first_n` (default 1), so `"name": "tune-{n}", "first_n": 7,
"repeat": 22` names the runs tune-7 to tune-28.
A stage's `images` reads only the split's first N images: a recipe can grow its train split
for a late stage while its earlier stages still see (and reproduce on) the images they had.
`init_from` starts the model from a finished one, the way MQT-LLaVA starts from a trained
LLaVA: every weight whose name matches is copied, and only the parts the finished model lacks
(an MQT model's latent queries, from a pooled M3 model) start fresh."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.synthetic import vocabulary
from m3core.lmm import NestedLMM
from m3core.pretrain import DenseConfig, pretrain_vision
from m3core.shipped import resolve_model
from m3core.tiny import TinySpec, tiny_lmm
from m3core.train import TrainConfig, check_image_count, group_by_image, train

RECIPES = Path(__file__).parent / "recipes"
TIMINGS = "timings.json"


STAGE_TYPES = ("dense", "matryoshka")
REPEAT_KEYS = ("repeat", "seeds", "first_n")


@dataclass
class StageRun:
    """One run of a stage: its output folder's name and the keyword arguments of its config
    (`DenseConfig` or `TrainConfig`), seed filled in."""

    folder: str
    name: str
    kind: str
    config: dict


@dataclass
class Recipe:
    name: str
    model: dict = field(default_factory=dict)
    seed: int = 0
    stages: list[dict] = field(default_factory=list)
    init_from: str | None = None
    """A finished model's folder or a shipped checkpoint's name; its dense stages are skipped."""

    @classmethod
    def load(cls, path_or_name: str | Path) -> Recipe:
        """A recipe file, or the name of a shipped one (e.g. `tiny-m3`)."""
        path = Path(path_or_name)
        if not path.is_file():
            path = RECIPES / f"{path_or_name}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in RECIPES.glob("*.json"))
            raise FileNotFoundError(f"no recipe {path_or_name!r}; shipped recipes: {shipped}")
        recipe = cls(**json.loads(path.read_text()))
        try:
            recipe.runs()
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return recipe

    def runs(self) -> list[StageRun]:
        """Every run of every stage in order, repeats spelled out; a ValueError names the first
        stage that is not well formed."""
        runs: list[StageRun] = []
        for index, stage in enumerate(self.stages):
            for name, config in expand_stage(stage, self.seed, f"stage {index}"):
                kind = config.pop("type")
                runs.append(StageRun(f"{len(runs):02d}-{name}", name, kind, config))
        return runs


def expand_stage(stage: dict, seed: int, where: str) -> list[tuple[str, dict]]:
    """(name, config with `type` and `seed`) for each run of one recipe stage."""
    if stage.get("type") not in STAGE_TYPES:
        raise ValueError(f"{where} needs type 'dense' or 'matryoshka'")
    config = {k: v for k, v in stage.items() if k not in ("name", *REPEAT_KEYS)}
    name = str(stage.get("name", stage["type"]))
    if not any(k in stage for k in REPEAT_KEYS):
        return [(name, {**config, "seed": config.get("seed", seed)})]
    repeat = stage.get("repeat")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"{where} ({name!r}): repeat must be a whole number >= 1")
    if "seed" in stage:
        raise ValueError(f"{where} ({name!r}) repeats: give its seeds as `seeds`, one per run")
    seeds = stage.get("seeds", [seed] * repeat)
    if len(seeds) != repeat:
        raise ValueError(f"{where} ({name!r}): {len(seeds)} seeds for {repeat} runs")
    if "{n}" not in name:
        raise ValueError(f"{where} ({name!r}) repeats: its name needs {{n}} to number the runs")
    first = stage.get("first_n", 1)
    return [
        (name.format(n=first + k), {**config, "seed": run_seed}) for k, run_seed in enumerate(seeds)
    ]


def run_recipe(
    recipe: Recipe,
    train_dataset,
    out_dir: str | Path,
    eval_dataset=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    vision_from: str | Path | None = None,
    init_from: str | Path | None = None,
) -> NestedLMM:
    """Build the recipe's model and run its stages; the result is also saved to out/model.

    `vision_from` takes the vision tower of a finished model instead of running the `dense`
    stages: the dense stage depends only on the seed and the data, so a recipe that shares
    both (e.g. the largest-scale-only baseline with the M3 one) gets the same tower without
    paying for it twice. `init_from` (default: the recipe's) copies every matching weight.
    A stage that asks for more images than the split has fails here, before any training.
    """
    runs = recipe.runs()
    available = len(group_by_image(train_dataset))
    for run in runs:
        name = f"recipe {recipe.name}: stage {run.name!r}"
        check_image_count(run.config.get("images"), available, name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lmm = tiny_lmm(vocabulary(), TinySpec(**recipe.model), seed=recipe.seed, device=device)
    init_from = init_from or recipe.init_from
    if init_from is not None:
        init_weights(lmm, NestedLMM.from_pretrained(resolve_model(init_from), device=device))
    if vision_from is not None:
        donor = NestedLMM.from_pretrained(vision_from, device=device)
        lmm.model.model.vision_tower.load_state_dict(donor.model.model.vision_tower.state_dict())
    for number, run in enumerate(runs, 1):
        stage_dir = out_dir / run.folder
        if run.kind == "dense" and (vision_from or init_from) is not None:
            continue
        if (stage_dir / "model" / "config.json").is_file():
            lmm = NestedLMM.from_pretrained(stage_dir / "model", device=device)
            continue
        if progress:
            print(f"stage {number}/{len(runs)}: {run.name} ({run.kind}) -> {stage_dir}")
        started = time.perf_counter()
        if run.kind == "dense":
            pretrain_vision(lmm, train_dataset, DenseConfig(**run.config), stage_dir, progress)
        else:
            train(lmm, train_dataset, TrainConfig(**run.config), stage_dir, eval_dataset, progress)
        record_time(out_dir / TIMINGS, run.name, time.perf_counter() - started, lmm.device)
    final = out_dir / "model"
    shutil.rmtree(final, ignore_errors=True)
    lmm.save_pretrained(final)
    return lmm


def init_weights(lmm: NestedLMM, donor: NestedLMM) -> None:
    """Copy `donor`'s weights into `lmm` by name; the parts `donor` lacks keep their fresh init.

    A ValueError, before anything is copied, if the two do not share a vocabulary or a shared
    weight has another shape (another tower, LLM or grid size): then nothing would carry over.
    """
    if donor.tokenizer.get_vocab() != lmm.tokenizer.get_vocab():
        raise ValueError("init_from: the finished model has another vocabulary")
    own, theirs = lmm.model.state_dict(), donor.model.state_dict()
    clashes = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if clashes:
        shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in clashes]
        raise ValueError(f"init_from: weights of another shape: {', '.join(shapes)}")
    lmm.model.load_state_dict({k: v for k, v in theirs.items() if k in own}, strict=False)


def record_time(path: Path, stage: str, seconds: float, device: torch.device) -> None:
    """Add a finished stage's wall time to `path` at once, so a run stopped later keeps it."""
    times = json.loads(path.read_text()) if path.is_file() else {}
    times |= {stage: round(seconds, 1), "device": str(device)}
    path.write_text(json.dumps(times, indent=1))
