"""Multi-scale oracle labelling: run the model at every scale on one encoding per image.

Output folder:
- `samples/`: the validated input samples (save_to_disk), which every worker reads;
- `shards/shard-NNNNN/labels.parquet`: one row per (sample, scale tried): id, scale, answer,
  score, correct, confidence, visual_tokens, prefill_flops, latency_s; `probe`, the probe
  features that scale's own generate call read from its prefill (at the probe scales, else
  null); `gold_prob`, the teacher-forced probability of answering with a gold answer (one
  forward on the encodings in hand: what re-asking at temperature 1 would get right, the
  measure of luck);
- `shards/shard-NNNNN/samples.parquet`: one row per sample: id, group (the image id, so
  cross-validation keeps an image's questions in one fold), router features, family/level
  from the metadata (analysis only), and the vision tower's FLOPs for its image (paid once,
  whatever scales run after);
- `shards/shard-NNNNN/skipped.jsonl`: samples the model could not take, with the reason
  (`NestedLMM.check`'s, or the error a sample raised on its own: `pipelines.skipping`);
- `skipped.jsonl`: samples the loader rejected; `spec.json`: model (and a hash of its weights),
  scales, mode, feature names, probe scales and probe feature names.
`--mode full` labels every scale; `--mode cascade` goes up the scales and stops at the first
correct answer: the oracle label for less compute (larger scales are then not observed).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import METRICS, SkippedSample, get_preset, load_samples, sample_meta, score
from data.scoring import CORRECT_THRESHOLD
from data.validation import check_count
from pipelines.jsonl import write_jsonl
from pipelines.shards import (
    RayOptions,
    Shard,
    commit_shard,
    folder_digest,
    guard_resume,
    plan_shards,
    run_shards,
)
from pipelines.skipping import encoded_images, isolate

LABEL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("scale", pa.int32()),
        ("answer", pa.string()),
        ("score", pa.float32()),
        ("correct", pa.bool_()),
        ("confidence", pa.float32()),
        ("visual_tokens", pa.int32()),
        ("prefill_flops", pa.float64()),
        ("latency_s", pa.float64()),
        ("probe", pa.list_(pa.float32())),
        ("gold_prob", pa.float32()),
    ]
)
SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("group", pa.string()),
        ("features", pa.list_(pa.float32())),
        ("family", pa.string()),
        ("level", pa.string()),
        ("vision_flops", pa.float64()),
    ]
)


@dataclass
class LabelJob:
    """Everything that decides a labelling run's output (saved as `spec.json`)."""

    model: str
    data: str
    out: str
    mode: str = "full"
    scales: tuple[int, ...] | None = None
    shard_size: int = 128
    batch_size: int = 64
    max_new_tokens: int = 6
    metric: str | None = None
    seed: int = 0
    data_format: str = "auto"
    columns: dict = field(default_factory=dict)
    preset: str | None = None
    limit: int | None = None
    device: str | None = None
    probe_scales: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.model = shipped_or_given(self.model)
        self.metric = default_metric(self.metric, self.preset)
        if self.mode not in ("full", "cascade"):
            raise ValueError(f"mode must be 'full' or 'cascade', got {self.mode!r}")
        if self.scales is not None:
            self.scales = _int_tuple("scales", self.scales)
            if not self.scales:
                raise ValueError(f"scales must be a list of ints, got {self.scales!r}")
        if self.probe_scales is not None:
            self.probe_scales = _int_tuple("probe_scales", self.probe_scales)
            outside = sorted(set(self.probe_scales) - set(self.scales or self.probe_scales))
            if outside:
                raise ValueError(f"probe scales {outside} are not among the scales {self.scales}")
        check_job_fields(self, ("shard_size", "batch_size", "max_new_tokens", "limit"))

    def probed(self, scales: tuple[int, ...]) -> tuple[int, ...]:
        """The scales whose prefill is probed: `probe_scales`, by default the two smallest of
        the scales labelled (the probe policies' stages)."""
        return self.probe_scales if self.probe_scales is not None else tuple(scales[:2])


def _int_tuple(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, str | bytes):
        raise ValueError(f"{name} must be a list of ints, got {values!r}")
    values = tuple(values)  # type: ignore[arg-type]
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise ValueError(f"{name} must be ints, got {bad}")
    return tuple(sorted(set(values)))


def check_job_fields(job: Any, counts: tuple[str, ...]) -> None:
    """Arguments any batch job checks before it writes anything: counts >= 1 (None allowed,
    meaning "all"), a known metric, an `--out` that is not a file."""
    for name in counts:
        if getattr(job, name) is not None or name != "limit":
            check_count(name, getattr(job, name))
    metric = job.metric
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file, not a folder")


RESUME_KEYS = (
    "model",
    "data",
    "preset",
    "mode",
    "scales",
    "metric",
    "max_new_tokens",
    "shard_size",
    "limit",
    "probe_scales",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def forget_failed_start(out: Path) -> None:
    """A run that wrote its spec but committed no shard produced nothing: its spec and
    samples must not stop a corrected rerun into the same folder, nor be reused by it."""
    shards = out / "shards"
    if (out / "spec.json").is_file() and not any(shards.glob("shard-*[0-9]")):
        (out / "spec.json").unlink()
        shutil.rmtree(out / "samples", ignore_errors=True)


def shipped_or_given(model: str) -> str:
    """A shipped checkpoint's folder for its name (tiny-m3, tiny-mqt), else `model` as given:
    jobs record the folder, so a resumed run can check the weights it was started on."""
    from m3core.shipped import resolve_model

    try:
        return str(resolve_model(model))
    except FileNotFoundError:
        return model  # the job's own checks name the missing folder


def default_metric(metric: str | None, preset: str | None) -> str:
    """The metric asked for, else the preset's, else VQA accuracy."""
    chosen = get_preset(preset).metric if preset else "vqa"
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return chosen if metric is None else metric


def prepare_samples(job: LabelJob) -> datasets.Dataset:
    """Load and validate the input once; bad samples go to `skipped.jsonl` with their reason.
    Samples are reused only by a run whose spec was written (the same job, resumed)."""
    out = Path(job.out)
    folder = out / "samples"
    if (folder / "dataset_info.json").is_file() and (out / "spec.json").is_file():
        return datasets.load_from_disk(str(folder))
    shutil.rmtree(folder, ignore_errors=True)
    result = load_samples(job.data, job.data_format, preset=job.preset, **job.columns)
    dataset = result.dataset
    if job.limit is not None:
        dataset = dataset.select(range(min(job.limit, len(dataset))))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "skipped.jsonl", [asdict(s) for s in result.skipped])
    dataset.save_to_disk(str(folder))
    print(result.summary())
    return datasets.load_from_disk(str(folder))


def label_processor(job: dict) -> Callable[[Shard, Path], None]:
    """Build (once per worker) the function that labels one shard and commits its files."""
    from m3core import NestedLMM

    spec = LabelJob(**job)
    lmm = NestedLMM.from_pretrained(spec.model, device=spec.device)
    samples = encoded_images(datasets.load_from_disk(str(Path(spec.out) / "samples")))
    scales = spec.scales or lmm.scales

    def process(shard: Shard, out_dir: Path) -> None:
        labels, rows, skipped = label_rows(
            lmm, samples.select(range(shard.start, shard.stop)), scales, spec
        )

        def write(folder: Path) -> None:
            pq.write_table(pa.Table.from_pylist(labels, LABEL_SCHEMA), folder / "labels.parquet")
            pq.write_table(pa.Table.from_pylist(rows, SAMPLE_SCHEMA), folder / "samples.parquet")
            write_jsonl(folder / "skipped.jsonl", [asdict(s) for s in skipped])

        commit_shard(out_dir, shard, write)

    return process


def label_rows(lmm, dataset, scales, job: LabelJob):
    """Label `dataset` at `scales`: (label rows, per-sample rows, skipped samples)."""
    labels: list[dict] = []
    samples: list[dict] = []
    skipped: list[SkippedSample] = []
    costs: dict[tuple[int, int], float] = {}
    for start in range(0, len(dataset), job.batch_size):
        rows = dataset[start : start + job.batch_size]
        checked = lmm.check(
            rows["image"],
            rows["question"],
            rows["id"],
            largest_scale=max(scales),
            max_new_tokens=job.max_new_tokens,
        )
        skipped += [error.skipped("labelling") for error in checked.errors]

        def label(part: list[int], checked=checked, rows=rows) -> list[tuple[list, dict]]:
            return label_checked(lmm, checked.select(part), rows, scales, job, costs)

        _, results, failed = isolate(label, checked.names, "labelling")
        skipped += failed
        for sample_labels, sample in results:
            labels += sample_labels
            samples.append(sample)
    return labels, samples, skipped


def label_checked(lmm, checked, rows: dict, scales, job: LabelJob, costs: dict) -> list:
    """(label rows, sample row) of each checked sample; `rows` are the batch's raw columns
    (gold answers, metadata), indexed by `checked.rows`; `costs` caches FLOPs per length
    (and image shape, for an anyres model)."""
    from m3core.features import router_features

    encoded, prompts = lmm.encode(checked.images), checked.prompts
    features = router_features(lmm, encoded, prompts)
    prompt_lengths = [len(p) - 1 for p in prompts.ids]  # text tokens: all but the image slot
    golds = [rows["answers"][row] for row in checked.rows]
    out: list[tuple[list, dict]] = [([], {}) for _ in checked.rows]
    solved: set[int] = set()
    probed = set(job.probed(tuple(scales)))
    for scale in scales:
        pending = [i for i in range(len(checked)) if job.mode == "full" or i not in solved]
        if not pending:
            break
        started = time.perf_counter()
        records = lmm.generate(
            encoded.select(pending),
            prompts.select(pending),
            scale,
            job.max_new_tokens,
            probe=scale in probed,
        )
        latency = (time.perf_counter() - started) / len(pending)
        gold = gold_probability(
            lmm,
            encoded.select(pending),
            prompts.select(pending),
            [golds[i] for i in pending],
            scale,
            job,
        )
        for i, record, p_gold in zip(pending, records, gold, strict=True):
            value = score(record.text, golds[i], job.metric)
            # an anyres model's visual tokens, and so its cost, follow the image's shape
            size = checked.images[i].size[::-1] if lmm.anyres else None
            key = (scale, prompt_lengths[i], size)
            if key not in costs:
                costs[key] = lmm.cost(scale, text_tokens=prompt_lengths[i], image_size=size)
            correct = value >= CORRECT_THRESHOLD
            if correct:
                solved.add(i)
            out[i][0].append(
                {
                    "id": checked.names[i],
                    "scale": scale,
                    "answer": record.text,
                    "score": value,
                    "correct": correct,
                    "confidence": record.confidence,
                    "visual_tokens": record.visual_tokens,
                    "prefill_flops": costs[key],
                    "latency_s": latency,
                    "probe": None if record.probe is None else record.probe.tolist(),
                    "gold_prob": None if np.isnan(p_gold) else float(p_gold),
                }
            )
    for i, row in enumerate(checked.rows):
        meta = sample_meta({"meta": rows["meta"][row]}) if "meta" in rows else {}
        out[i][1].update(
            {
                "id": checked.names[i],
                "group": str(meta.get("image_id", checked.names[i])),
                "features": features[i].tolist(),
                "family": str(meta.get("family", "")),
                "level": str(meta.get("level", "")),
                "vision_flops": lmm.image_flops(
                    checked.images[i].size[::-1] if lmm.anyres else None
                ),
            }
        )
    return out


def gold_probability(lmm, encoded, prompts, golds: list[list[str]], scale: int, job: LabelJob):
    """Per sample, the probability that the model answers at `scale` with a gold answer: the
    teacher-forced probability of each distinct gold answer (its tokens, then EOS) that the
    metric scores as correct, summed; NaN where none does. What sampling at temperature 1
    would get right, so a right greedy answer with less than one half was a plurality win."""
    owner, texts = [], []
    for i, answers in enumerate(golds):
        for text in dict.fromkeys(a.strip() for a in answers if a.strip()):
            if score(text, answers, job.metric) >= CORRECT_THRESHOLD:
                owner.append(i)
                texts.append(text)
    out = np.full(len(golds), np.nan)
    if not texts:
        return out
    kept, seen = [], set()
    for i, ids in zip(owner, lmm.answer_ids(texts), strict=True):
        if (i, tuple(ids)) not in seen:  # two spellings, one token sequence: counted once
            seen.add((i, tuple(ids)))
            kept.append((i, ids))
    rows = [i for i, _ in kept]
    logprob = lmm.continuation_logprob(
        encoded.select(rows),
        prompts.select(rows),
        [ids for _, ids in kept],
        scale,
        batch_size=job.batch_size,
    )
    for i, value in zip(rows, logprob, strict=True):
        out[i] = np.exp(value) + (0.0 if np.isnan(out[i]) else out[i])
    return out


def run_labelling(
    job: LabelJob, ray_options: RayOptions | None = None, progress: bool = True
) -> Path:
    """Label every sample of `job.data` at every scale; resumes, and runs on Ray if asked."""
    from m3core import NestedLMM
    from m3core.features import FEATURES_VERSION, feature_names, probe_feature_names
    from m3core.lmm import model_scales

    offered = model_scales(job.model)
    unknown = sorted(set(job.scales or ()) - set(offered))
    if unknown:
        raise ValueError(f"scales {unknown} are not among the model's scales {list(offered)}")
    labelled = list(job.scales or offered)
    unknown = sorted(set(job.probe_scales or ()) - set(labelled))
    if unknown:
        raise ValueError(f"probe scales {unknown} are not among the scales labelled {labelled}")
    out = Path(job.out)
    forget_failed_start(out)
    samples = prepare_samples(job)

    def details() -> dict:
        lmm = NestedLMM.from_pretrained(job.model, device="cpu")
        scales = job.scales or lmm.scales
        return {
            "scales": list(scales),
            "model": lmm.describe(),
            "feature_names": feature_names(lmm),
            "probe_scales": list(job.probed(tuple(scales))),
            "probe_feature_names": probe_feature_names(lmm),
            "samples": len(samples),
        }

    inputs = {
        "model weights": folder_digest(job.model, WEIGHT_SUFFIXES),
        "router features": f"version {FEATURES_VERSION}",
    }
    guard_resume(out / "spec.json", asdict(job), RESUME_KEYS, inputs, details)
    shards = plan_shards(len(samples), job.shard_size)
    run_shards(
        shards,
        out,
        label_processor,
        {"job": asdict(job)},
        ray_options,
        desc="label",
        progress=progress,
    )
    return out
