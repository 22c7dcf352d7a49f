"""Staged training recipes: a JSON file names the tiny model and its stages, in order.

Stage types: `dense` (vision tower on per-patch targets, `DenseConfig`) and `matryoshka`
(`TrainConfig`: which parts learn, at which scales). Each stage writes `NN-name/` under the
output folder; a stage whose `model/` exists is done, so running the recipe again resumes.
A stage's `images` reads only the split's first N images: a recipe can grow its train split
for a late stage while its earlier stages still see (and reproduce on) the images they had.
`init_from` starts the model from a finished one, the way MQT-LLaVA starts from a trained
LLaVA: every weight whose name matches is copied, and only the parts the finished model lacks
(an MQT model's latent queries, from a pooled M3 model) start fresh.
"""

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
        values = json.loads(path.read_text())
        for index, stage in enumerate(values.get("stages", [])):
            if stage.get("type") not in ("dense", "matryoshka"):
                raise ValueError(f"{path}: stage {index} needs type 'dense' or 'matryoshka'")
        return cls(**values)


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
    available = len(group_by_image(train_dataset))
    for stage in recipe.stages:
        name = f"recipe {recipe.name}: stage {stage.get('name')!r}"
        check_image_count(stage.get("images"), available, name)
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
    for index, stage in enumerate(recipe.stages):
        stage = dict(stage)
        kind = stage.pop("type")
        name = stage.pop("name", kind)
        stage_dir = out_dir / f"{index:02d}-{name}"
        if kind == "dense" and (vision_from or init_from) is not None:
            continue
        if (stage_dir / "model" / "config.json").is_file():
            lmm = NestedLMM.from_pretrained(stage_dir / "model", device=device)
            continue
        started = time.perf_counter()
        stage.setdefault("seed", recipe.seed)
        if kind == "dense":
            pretrain_vision(lmm, train_dataset, DenseConfig(**stage), stage_dir, progress)
        else:
            train(lmm, train_dataset, TrainConfig(**stage), stage_dir, eval_dataset, progress)
        record_time(out_dir / TIMINGS, name, time.perf_counter() - started, lmm.device)
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
