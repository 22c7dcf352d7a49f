"""Batch processing: answer a whole dataset at a fixed scale or routed (`adaptive-m3 run`).

Output folder (per-sample JSON lines, as lmms-eval writes them):
- `shards/shard-NNNNN/results.jsonl` + `skipped.jsonl` (+ `drift.json`, the drift monitor's
  per-sample statistics when the router folder has a drift reference), written atomically,
  never recomputed;
- `results.jsonl` and `results/` (a `datasets` folder) merged in input order at the end;
- `skipped.jsonl`: samples the loader rejected; the shards' hold those the model could not take;
- `summary.json`: samples, skipped, accuracy (when gold answers exist), mean visual tokens,
  samples per second, and `drift` (the whole run tested against the calibration data);
- `spec.json`: the job and hashes of the model's weights and the router, so a run resumes only
  the same job on the same model and router.
Every argument is checked against the model's config and the router folder before anything is
written; a bad sample is recorded in `skipped.jsonl` and the rest are answered
(`pipelines.skipping`). Within a shard, `AdaptiveLMM.generate_checked` groups samples by their
chosen scale, so every batch the LLM runs has one sequence length.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np

from data import SkippedSample, score
from data.scoring import CORRECT_THRESHOLD
from pipelines.jsonl import read_jsonl, write_jsonl
from pipelines.labelling import (
    WEIGHT_SUFFIXES,
    check_job_fields,
    default_metric,
    forget_failed_start,
    prepare_samples,
    shipped_or_given,
)
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
from predictor.drift import DriftReport, DriftWarning, load_drift_reference

DRIFT_STATS = "drift.json"

RESUME_KEYS = (
    "model",
    "router",
    "data",
    "scale",
    "budget",
    "preset",
    "max_new_tokens",
    "metric",
    "shard_size",
    "limit",
    "on_drift",
)


@dataclass
class RunJob:
    model: str
    data: str
    out: str
    router: str | None = None
    scale: str = "auto"
    budget: str | None = None
    shard_size: int = 256
    batch_size: int = 32
    max_new_tokens: int = 6
    metric: str | None = None
    data_format: str = "auto"
    columns: dict = field(default_factory=dict)
    preset: str | None = None
    limit: int | None = None
    device: str | None = None
    on_drift: str = "warn"

    def __post_init__(self) -> None:
        from pipelines.adaptive import ON_DRIFT
        from predictor.calibrate import parse_target

        self.model = shipped_or_given(self.model)
        self.metric = default_metric(self.metric, self.preset)
        self.scale = scale_text(self.scale)
        check_job_fields(self, ("shard_size", "batch_size", "max_new_tokens", "limit"))
        if self.on_drift not in ON_DRIFT:
            raise ValueError(f"on_drift must be one of {ON_DRIFT}, got {self.on_drift!r}")
        if self.budget is not None:
            if self.scale != "auto":
                raise ValueError("a budget needs scale 'auto'; a fixed scale has no knob to tune")
            if self.router is None:
                raise ValueError("a budget needs a router folder tuned by `adaptive-m3 tune`")
            parse_target(self.budget)

    def requested_scale(self) -> str | int:
        return "auto" if self.scale == "auto" else int(self.scale)


def scale_text(value: object) -> str:
    """ "auto" or the decimal text of an int scale (how spec.json stores it)."""
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip().isdigit():
        return str(int(value))
    raise ValueError(f"scale must be 'auto' or an integer scale of the model, got {value!r}")


def check_run_job(job: RunJob) -> None:
    """What the model's config and the router folder must agree to, checked before anything
    is written to `job.out`: a wrong scale, router or budget fails at once, not in a worker."""
    from m3core.lmm import model_scales
    from predictor import knob_for_target, load_calibration, load_router

    scales = model_scales(job.model)
    if job.scale != "auto" and int(job.scale) not in scales:
        raise ValueError(f"scale {job.scale} is not one of the model's scales {list(scales)}")
    if job.router is None:
        return
    router = load_router(job.router, expected_scales=scales)
    drift = load_drift_reference(job.router)
    expected = (scales, router.feature_spec_.width)
    if drift is not None and (tuple(drift.scales), drift.width) != expected:
        raise ValueError(
            f"{Path(job.router) / 'drift.json'} does not describe this router's features and "
            "scales; rerun `adaptive-m3 tune`"
        )
    calibration = load_calibration(job.router)
    if job.budget is not None:
        if calibration is None:
            raise ValueError(
                f"a budget needs {Path(job.router) / 'calibration.json'}; run `adaptive-m3 "
                "tune` on labelled calibration data to write it"
            )
        knob_for_target(calibration, job.budget)


def run_processor(job: dict):
    from pipelines.adaptive import AdaptiveLMM

    spec = RunJob(**job)
    model = AdaptiveLMM.from_pretrained(
        spec.model, spec.router, device=spec.device, on_drift=spec.on_drift
    )
    samples = encoded_images(datasets.load_from_disk(str(Path(spec.out) / "samples")))

    def process(shard: Shard, out_dir: Path) -> None:
        rows = samples.select(range(shard.start, shard.stop))
        records, skipped, stats = answer_rows(model, rows, spec)

        def write(folder: Path) -> None:
            write_jsonl(folder / "results.jsonl", records)
            write_jsonl(folder / "skipped.jsonl", [asdict(s) for s in skipped])
            if stats is not None:
                rows = np.where(np.isfinite(stats), stats, None).tolist()
                (folder / DRIFT_STATS).write_text(json.dumps({"rows": rows}))

        commit_shard(out_dir, shard, write)

    return process


def answer_rows(
    model, rows, spec: RunJob
) -> tuple[list[dict], list[SkippedSample], np.ndarray | None]:
    """Answer `rows`: (records, skipped samples, drift statistics of the answered ones).

    Each sample is checked once (`AdaptiveLMM.check`); a sample that fails the check, or
    fails on its own inside the model, is recorded and the rest are answered.
    """
    options = {"scale": spec.requested_scale(), "budget": spec.budget}
    options["max_new_tokens"] = spec.max_new_tokens
    checked = model.check(rows["image"], rows["question"], rows["id"], **options)
    skipped = [error.skipped("run") for error in checked.errors]
    stats: list[np.ndarray] = []

    def answer(part: list[int]):
        answers = model.generate_checked(
            checked.select(part), batch_size=spec.batch_size, **options
        )
        if model.last_drift_stats is not None:
            stats.append(model.last_drift_stats)
        return answers

    started = time.perf_counter()
    kept, answers, failed = isolate(answer, checked.names, "run")
    latency = (time.perf_counter() - started) / max(1, len(kept))
    records = []
    for i, answer_ in zip(kept, answers, strict=True):
        row = checked.rows[i]
        record = {
            "id": checked.names[i],
            "question": rows["question"][row],
            "answer": answer_.text,
            "scale": answer_.scale,
            "visual_tokens": answer_.visual_tokens,
            "tried_scales": list(answer_.tried_scales),
            "routed_by": answer_.routed_by,
            "confidence": answer_.confidence,
            "latency_s": latency,
        }
        golds = rows["answers"][row]
        if golds:
            record["score"] = score(answer_.text, golds, spec.metric)
            record["correct"] = record["score"] >= CORRECT_THRESHOLD
        records.append(record)
    return records, skipped + failed, np.vstack(stats) if stats else None


def run_drift(router: str | None, shard_dirs: list[Path]) -> DriftReport | None:
    """The whole run tested against the router folder's calibration statistics (None without
    a drift reference); warns once when it has drifted."""
    reference = load_drift_reference(router) if router is not None else None
    files = [d / DRIFT_STATS for d in shard_dirs if (d / DRIFT_STATS).is_file()]
    if reference is None or not files:
        return None
    rows = [r for f in files for r in json.loads(f.read_text())["rows"]]
    report = reference.test(np.asarray(rows, dtype=np.float64))
    if report.drifted:
        warnings.warn(report.message(), DriftWarning, stacklevel=2)
    return report


def run_dataset(job: RunJob, ray_options: RayOptions | None = None, progress: bool = True) -> dict:
    """Answer every sample of `job.data`; resumable; returns the summary."""
    out = Path(job.out)
    check_run_job(job)
    forget_failed_start(out)
    samples = prepare_samples(job)
    inputs = {
        "model weights": folder_digest(job.model, WEIGHT_SUFFIXES),
        "router": folder_digest(job.router, recursive=True),
    }
    guard_resume(out / "spec.json", asdict(job), RESUME_KEYS, inputs)
    shards = plan_shards(len(samples), job.shard_size)
    started = time.perf_counter()
    computed = run_shards(
        shards, out, run_processor, {"job": asdict(job)}, ray_options, desc="run", progress=progress
    )
    elapsed = time.perf_counter() - started
    records, skipped = [], read_jsonl(out / "skipped.jsonl")
    for shard in shards:
        folder = out / "shards" / shard.name
        records += read_jsonl(folder / "results.jsonl")
        skipped += read_jsonl(folder / "skipped.jsonl")
    write_jsonl(out / "results.jsonl", records)
    datasets.Dataset.from_list(records).save_to_disk(str(out / "results"))
    scored = [r for r in records if "correct" in r]
    drift = run_drift(job.router, [out / "shards" / s.name for s in shards])
    summary = {
        "samples": len(records),
        "skipped": len(skipped),
        "accuracy": sum(r["correct"] for r in scored) / len(scored) if scored else None,
        "mean_visual_tokens": sum(r["visual_tokens"] for r in records) / max(1, len(records)),
        "samples_per_s": len(records) / elapsed if computed == len(shards) else None,
        "scale_counts": {
            str(k): v for k, v in sorted(Counter(r["scale"] for r in records).items())
        },
        "skip_counts": dict(Counter(s["reason"].split(":", 1)[0] for s in skipped)),
        "drift": drift.to_dict() if drift is not None else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
