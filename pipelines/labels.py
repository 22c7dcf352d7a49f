"""Label shards -> the arrays routers and reports learn from (`LabelSet`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.jsonl import read_jsonl


@dataclass
class LabelSet:
    """Per-sample arrays over the scales, rows in sample order.

    `observed` is False where cascade labelling never ran a scale; those cells of `correct`
    assume a larger scale stays correct once a smaller one was (the cascade's premise).
    `visual_tokens` is what the LLM read per sample and scale: the scale itself, except for an
    anyres (LLaVA-NeXT) model, whose count follows each image's crop layout.

    Label folders written since probe features exist also give: `probe`, per probe scale the
    (n, P) probe features of that scale's prefill (`probe_names` name them; `probe_at` reads
    them with a clear error where they are missing); `gold_prob`, (n, S) the teacher-forced
    probability of answering with a gold answer (NaN: unknown); `vision_flops`, (n,) the
    vision tower's part of every scale's FLOPs, paid once per image.
    """

    ids: list[str]
    groups: list[str]
    scales: tuple[int, ...]
    correct: np.ndarray
    observed: np.ndarray
    score: np.ndarray
    confidence: np.ndarray
    flops: np.ndarray
    latency: np.ndarray
    answers: list[list[str]]
    features: np.ndarray
    feature_names: list[str]
    families: list[str]
    levels: list[str]
    skipped: list[dict]
    visual_tokens: np.ndarray | None = None
    probe: dict[int, np.ndarray] | None = None
    probe_names: list[str] | None = None
    gold_prob: np.ndarray | None = None
    vision_flops: np.ndarray | None = None
    folder: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_families(self) -> bool:
        """Two or more known question families: only then do per-family baselines mean
        anything (real benchmark files often carry none)."""
        return len(set(self.families) - {""}) > 1

    @property
    def tokens(self) -> np.ndarray:
        """Mean visual tokens per scale (the scales themselves unless counts were recorded)."""
        if self.visual_tokens is None or not len(self):
            return np.asarray(self.scales, dtype=np.float64)
        return self.visual_tokens.mean(0)

    def costs(self) -> dict[str, np.ndarray]:
        """Per-scale cost vectors (mean over samples) for budgets and curves, and the vision
        tower's mean FLOPs where recorded (so a policy that runs several scales pays it once)."""
        costs = {
            "tokens": self.tokens,
            "flops": self.flops.mean(0),
            "latency": self.latency.mean(0),
        }
        if self.vision_flops is not None and len(self):
            costs["vision_flops"] = np.float64(self.vision_flops.mean())
        return costs

    @property
    def probe_scales(self) -> tuple[int, ...]:
        return tuple(sorted(self.probe or {}))

    def probe_at(self, scale: int) -> np.ndarray:
        """(n, P) probe features of every sample's prefill at `scale`; a ValueError says how
        to get them where this folder has none."""
        where = f"labels folder {self.folder}" if self.folder else "these labels"
        if not self.probe:
            raise ValueError(
                f"{where} hold no probe features (labelled before they were recorded, or "
                "converted from lmms-eval runs): label the split again with `adaptive-m3 label` "
                "to train a probe router"
            )
        if scale not in self.probe:
            raise ValueError(
                f"{where} hold probe features at scales {list(self.probe)}, not {scale}; label "
                f"again with --probe-scales including {scale}"
            )
        return self.probe[scale]

    def require_gold_prob(self) -> np.ndarray:
        """`gold_prob`, or a ValueError saying the folder predates it."""
        if self.gold_prob is None or np.isnan(self.gold_prob).all():
            where = f"labels folder {self.folder}" if self.folder else "these labels"
            raise ValueError(
                f"{where} hold no gold-answer probabilities: label again with `adaptive-m3 "
                "label` for the chance-corrected oracle"
            )
        return self.gold_prob

    def subset(self, rows: np.ndarray) -> LabelSet:
        rows = np.asarray(rows)
        pick = [int(i) for i in rows]
        return LabelSet(
            ids=[self.ids[i] for i in pick],
            groups=[self.groups[i] for i in pick],
            scales=self.scales,
            correct=self.correct[rows],
            observed=self.observed[rows],
            score=self.score[rows],
            confidence=self.confidence[rows],
            flops=self.flops[rows],
            latency=self.latency[rows],
            answers=[self.answers[i] for i in pick],
            features=self.features[rows],
            feature_names=self.feature_names,
            families=[self.families[i] for i in pick],
            levels=[self.levels[i] for i in pick],
            skipped=self.skipped,
            visual_tokens=None if self.visual_tokens is None else self.visual_tokens[rows],
            probe=None if self.probe is None else {s: p[rows] for s, p in self.probe.items()},
            probe_names=self.probe_names,
            gold_prob=None if self.gold_prob is None else self.gold_prob[rows],
            vision_flops=None if self.vision_flops is None else self.vision_flops[rows],
            folder=self.folder,
        )


def read_labels(folder: str | Path) -> LabelSet:
    """Read a labelling output folder; a clear error if it is not one or is incomplete."""
    folder = Path(folder)
    spec_path = folder / "spec.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{folder} is not a labels folder: spec.json is missing")
    spec = json.loads(spec_path.read_text())
    shard_dirs = sorted((folder / "shards").glob("shard-*[0-9]"))
    if not shard_dirs:
        raise FileNotFoundError(f"{folder} holds no finished shards yet")
    labels = pa.concat_tables(
        [pq.read_table(d / "labels.parquet") for d in shard_dirs], promote_options="default"
    )
    samples = pa.concat_tables(
        [_sample_table(d / "samples.parquet") for d in shard_dirs], promote_options="default"
    )
    skipped = read_jsonl(folder / "skipped.jsonl")
    for d in shard_dirs:
        skipped += read_jsonl(d / "skipped.jsonl")

    scales = tuple(spec["scales"])
    ids = samples.column("id").to_pylist()
    row_of = {sample_id: i for i, sample_id in enumerate(ids)}
    n, s = len(ids), len(scales)
    col_of = {scale: j for j, scale in enumerate(scales)}
    correct = np.zeros((n, s), dtype=bool)
    observed = np.zeros((n, s), dtype=bool)
    kinds = ("score", "confidence", "flops", "latency", "visual_tokens")
    values = {k: np.full((n, s), np.nan) for k in kinds}
    answers = [[""] * s for _ in range(n)]
    table = labels.to_pydict()
    gold = np.full((n, s), np.nan)
    probe: dict[int, np.ndarray] = {}
    probe_scales = [int(p) for p in spec.get("probe_scales", [])]
    probe_names = spec.get("probe_feature_names")
    if probe_names and "probe" in table:
        probe = {p: np.zeros((n, len(probe_names)), np.float32) for p in probe_scales}
    probed = {p: np.zeros(n, dtype=bool) for p in probe}
    gold_column, probe_column = table.get("gold_prob"), table.get("probe")
    for k, sample_id in enumerate(table["id"]):
        i, j = row_of[sample_id], col_of[table["scale"][k]]
        observed[i, j] = True
        correct[i, j] = table["correct"][k]
        values["score"][i, j] = table["score"][k]
        values["confidence"][i, j] = table["confidence"][k]
        values["flops"][i, j] = table["prefill_flops"][k]
        values["latency"][i, j] = table["latency_s"][k]
        values["visual_tokens"][i, j] = table["visual_tokens"][k]
        answers[i][j] = table["answer"][k]
        if gold_column is not None and gold_column[k] is not None:
            gold[i, j] = gold_column[k]
        scale = table["scale"][k]
        if scale in probe and probe_column[k] is not None:
            probe[scale][i] = probe_column[k]
            probed[scale][i] = True
    # cascade: a scale above the first correct one is assumed correct, its cost taken from
    # the samples that did run it
    correct |= ~observed & np.maximum.accumulate(correct & observed, axis=1)
    for key in ("flops", "latency", "visual_tokens"):
        fill = np.nanmean(values[key], axis=0) if observed.any() else np.zeros(s)
        values[key] = np.where(np.isnan(values[key]), fill, values[key])
    never_run = np.isnan(values["visual_tokens"])
    values["visual_tokens"][never_run] = np.broadcast_to(np.asarray(scales, float), (n, s))[
        never_run
    ]
    # a probe scale some sample never reached (cascade labelling) cannot train a probe router
    probe = {p: block for p, block in probe.items() if probed[p].all()}
    vision = None
    if "vision_flops" in samples.column_names:
        column = samples.column("vision_flops").to_pylist()
        vision = None if None in column else np.asarray(column, dtype=np.float64)
    return LabelSet(
        ids=ids,
        groups=samples.column("group").to_pylist(),
        scales=scales,
        correct=correct,
        observed=observed,
        score=values["score"],
        confidence=values["confidence"],
        flops=values["flops"],
        latency=values["latency"],
        answers=answers,
        features=np.asarray(samples.column("features").to_pylist(), dtype=np.float32),
        feature_names=list(spec["feature_names"]),
        families=samples.column("family").to_pylist(),
        levels=samples.column("level").to_pylist(),
        skipped=skipped,
        visual_tokens=values["visual_tokens"],
        probe=probe or None,
        probe_names=list(probe_names) if probe else None,
        gold_prob=None if np.isnan(gold).all() else gold,
        vision_flops=vision,
        folder=str(folder),
    )


def _sample_table(path: Path) -> pa.Table:
    """A shard's per-sample columns; older shards hold columns since dropped, or lack the
    vision tower's FLOPs."""
    names = pq.read_schema(path).names
    columns = ["id", "group", "features", "family", "level", "vision_flops"]
    return pq.read_table(path, columns=[c for c in columns if c in names])
