"""Batch processing: answer a whole dataset at a fixed scale or routed (`adaptive-m3 run`).

Output folder (per-sample JSON lines, as lmms-eval writes them):
- `shards/shard-NNNNN/results.jsonl` + `skipped.jsonl`, written atomically, never recomputed;
- `results.jsonl` and `results/` (a `datasets` folder) merged in input order at the end;
- `summary.json`: samples, skipped, accuracy (when gold answers exist), mean visual tokens,
  samples per second;
- `spec.json`: the job and hashes of the model's weights and the router, so a run resumes only
  the same job on the same model and router.
Within a shard, `AdaptiveLMM.generate` groups samples by their chosen scale, so every batch
the LLM runs has one sequence length.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from data import SkippedSample, score
from data.scoring import CORRECT_THRESHOLD
from pipelines.jsonl import read_jsonl, write_jsonl
from pipelines.labelling import WEIGHT_SUFFIXES, encodable, prepare_samples
from pipelines.shards import (
    RayOptions,
    Shard,
    commit_shard,
    folder_digest,
    guard_resume,
    plan_shards,
    run_shards,
)

RESUME_KEYS = (
    "model",
    "router",
    "data",
    "scale",
    "budget",
    "max_new_tokens",
    "metric",
    "shard_size",
    "limit",
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
    metric: str = "vqa"
    data_format: str = "auto"
    columns: dict = field(default_factory=dict)
    limit: int | None = None
    device: str | None = None

    def requested_scale(self) -> str | int:
        return "auto" if self.scale == "auto" else int(self.scale)


def run_processor(job: dict):
    from pipelines.adaptive import AdaptiveLMM

    spec = RunJob(**job)
    model = AdaptiveLMM.from_pretrained(spec.model, spec.router, device=spec.device)
    samples = datasets.load_from_disk(str(Path(spec.out) / "samples"))

    def process(shard: Shard, out_dir: Path) -> None:
        records, skipped = answer_rows(model, samples.select(range(shard.start, shard.stop)), spec)

        def write(folder: Path) -> None:
            write_jsonl(folder / "results.jsonl", records)
            write_jsonl(folder / "skipped.jsonl", [asdict(s) for s in skipped])

        commit_shard(out_dir, shard, write)

    return process


def answer_rows(model, rows, spec: RunJob) -> tuple[list[dict], list[SkippedSample]]:
    """Answer `rows`; a sample the model cannot take is recorded and the rest go on."""
    ids, images, questions = rows["id"], rows["image"], rows["question"]
    golds = rows["answers"]
    try:
        started = time.perf_counter()
        answers = model.generate(
            images,
            questions,
            scale=spec.requested_scale(),
            budget=spec.budget,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
        )
        elapsed = time.perf_counter() - started
        keep = list(range(len(ids)))
        skipped: list[SkippedSample] = []
    except ValueError:
        keep, skipped = encodable(model.lmm, rows)
        skipped = [SkippedSample(s.id, s.reason, "run") for s in skipped]
        if not keep:
            return [], skipped
        started = time.perf_counter()
        answers = model.generate(
            [images[i] for i in keep],
            [questions[i] for i in keep],
            scale=spec.requested_scale(),
            budget=spec.budget,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
        )
        elapsed = time.perf_counter() - started
    records = []
    for i, answer in zip(keep, answers, strict=True):
        record = {
            "id": ids[i],
            "question": questions[i],
            "answer": answer.text,
            "scale": answer.scale,
            "visual_tokens": answer.visual_tokens,
            "tried_scales": list(answer.tried_scales),
            "routed_by": answer.routed_by,
            "confidence": answer.confidence,
            "latency_s": elapsed / len(keep),
        }
        if golds[i]:
            record["score"] = score(answer.text, golds[i], spec.metric)
            record["correct"] = record["score"] >= CORRECT_THRESHOLD
        records.append(record)
    return records, skipped


def run_dataset(job: RunJob, ray_options: RayOptions | None = None, progress: bool = True) -> dict:
    """Answer every sample of `job.data`; resumable; returns the summary."""
    out = Path(job.out)
    samples = prepare_samples(job)
    inputs = {
        "model weights": folder_digest(job.model, WEIGHT_SUFFIXES),
        "router": folder_digest(job.router),
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
    summary = {
        "samples": len(records),
        "skipped": len(skipped),
        "accuracy": sum(r["correct"] for r in scored) / len(scored) if scored else None,
        "mean_visual_tokens": sum(r["visual_tokens"] for r in records) / max(1, len(records)),
        "samples_per_s": len(records) / elapsed if computed == len(shards) else None,
        "scale_counts": {
            str(k): v for k, v in sorted(Counter(r["scale"] for r in records).items())
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
