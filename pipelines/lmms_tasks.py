"""lmms-eval task folders for local benchmark copies (`adaptive-m3 lmms-task`).

lmms-eval's own tasks fetch their data from the hub; a local parquet copy needs a task YAML
of its own. `write_task` writes one (YAML + utils.py) that asks and scores each question the
way `load_samples` / `label` do: the preset's prompt, gold answers and metric, or, without a
preset, the uniform columns (id, image, question, answers) of `make-benchmark`'s splits saved
as parquet. Run it with `lmms-eval --include_path FOLDER --tasks NAME`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data.loaders import _answers_list
from data.presets import PresetError, get_preset, open_image
from data.scoring import METRICS, score

_UTILS = '''"""Written by `adaptive-m3 lmms-task`: questions and scores come from adaptive-m3."""

from pipelines.lmms_tasks import LocalTask

TASK = LocalTask(**{spec})
doc_to_visual = TASK.doc_to_visual
doc_to_text = TASK.doc_to_text
doc_to_target = TASK.doc_to_target
process_results = TASK.process_results
'''


class LocalTask:
    """The per-doc functions of a written task (lmms-eval calls them by name from utils.py)."""

    def __init__(self, preset: str | None, metric: str, image_root: str | None) -> None:
        self.preset = get_preset(preset) if preset else None
        self.metric = metric
        self.image_root = image_root

    def doc_to_visual(self, doc: Mapping[str, Any]) -> list:
        try:
            value = self.preset.image_value(doc) if self.preset else doc["image"]
            return [open_image(value, self.image_root).convert("RGB")]
        except (PresetError, OSError, KeyError):
            return []  # the model records the request as skipped, with this reason

    def doc_to_text(self, doc: Mapping[str, Any]) -> str:
        try:
            return self.preset.prompt(doc) if self.preset else str(doc["question"])
        except PresetError:
            return ""

    def doc_to_target(self, doc: Mapping[str, Any]) -> list[str]:
        try:
            gold = self.preset.gold(doc) if self.preset else doc["answers"]
        except PresetError:
            return []
        return _answers_list(gold)

    def process_results(self, doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
        answers = self.doc_to_target(doc)
        return {"score": score(results[0], answers, self.metric) if answers else 0.0}


def _parquet_files(data: Path) -> list[str]:
    files = [data] if data.is_file() else sorted(data.rglob("*.parquet"))
    if not files or any(f.suffix != ".parquet" for f in files):
        raise ValueError(
            f"{data}: an lmms-eval task reads parquet; give a .parquet file or a folder of them "
            "(a datasets folder converts with Dataset.to_parquet)"
        )
    return [str(f.resolve()) for f in files]


def write_task(
    data: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    name: str | None = None,
    metric: str | None = None,
    max_new_tokens: int = 16,
    image_root: str | Path | None = None,
) -> Path:
    """Write an lmms-eval task folder for the parquet copy `data`; returns the folder.

    The task is named `name` (default `adaptive_m3_<preset or "local">`), scores every
    answer with `metric` (default: the preset's, else "vqa") as the per-sample metric
    `score`, and resolves image files against `image_root` (default: the data's folder).
    """
    data, out = Path(data), Path(out)
    chosen = get_preset(preset) if preset else None
    metric = metric or (chosen.metric if chosen else "vqa")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    files = _parquet_files(data)
    name = name or f"adaptive_m3_{preset or 'local'}"
    root = Path(image_root) if image_root else (data if data.is_dir() else data.parent)
    spec = {"preset": preset, "metric": metric, "image_root": str(root.resolve())}
    config = {
        "task": name,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": files}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "!function utils.doc_to_visual",
        "doc_to_text": "!function utils.doc_to_text",
        "doc_to_target": "!function utils.doc_to_target",
        "process_results": "!function utils.process_results",
        "generation_kwargs": {"max_new_tokens": int(max_new_tokens), "do_sample": False},
        "metric_list": [{"metric": "score", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "preset": preset or "", "metric": metric},
    }
    out.mkdir(parents=True, exist_ok=True)
    # JSON is YAML; the !function tags must stay unquoted for lmms-eval's loader
    text = json.dumps(config, indent=2)
    for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        text = text.replace(f'"!function utils.{key}"', f"!function utils.{key}")
    (out / f"{name}.yaml").write_text(text + "\n")
    (out / "utils.py").write_text(_UTILS.format(spec=repr(spec)))
    return out
