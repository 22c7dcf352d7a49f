"""Multi-scale oracle labelling: run the model at every scale on one encoding per image.

Output folder:
- `samples/`: the validated input samples (save_to_disk), which every worker reads;
- `shards/shard-NNNNN/labels.parquet`: one row per (sample, scale tried): id, scale, answer,
  score, correct, confidence, visual_tokens, prefill_flops, latency_s;
- `shards/shard-NNNNN/samples.parquet`: one row per sample: id, group (the image id, so
  cross-validation keeps an image's questions in one fold), router features, oracle scale,
  whether any scale was correct, family/level from the metadata (analysis only);
- `shards/shard-NNNNN/skipped.jsonl`: samples the model could not take, with the reason;
- `skipped.jsonl`: samples the loader rejected; `spec.json`: model (and a hash of its weights),
  scales, mode, feature names.
`--mode full` labels every scale; `--mode cascade` goes up the scales and stops at the first
correct answer: the oracle label for less compute (larger scales are then not observed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from data import SkippedSample, load_samples, sample_meta, score
from data.scoring import CORRECT_THRESHOLD
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
    ]
)
SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("group", pa.string()),
        ("features", pa.list_(pa.float32())),
        ("oracle_scale", pa.int32()),
        ("any_correct", pa.bool_()),
        ("family", pa.string()),
        ("level", pa.string()),
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
    metric: str = "vqa"
    seed: int = 0
    data_format: str = "auto"
    columns: dict = field(default_factory=dict)
    limit: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("full", "cascade"):
            raise ValueError(f"mode must be 'full' or 'cascade', got {self.mode!r}")
        if self.scales is not None:
            self.scales = tuple(sorted(int(s) for s in self.scales))


RESUME_KEYS = ("model", "data", "mode", "scales", "metric", "max_new_tokens", "shard_size", "limit")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def prepare_samples(job: LabelJob) -> datasets.Dataset:
    """Load and validate the input once; bad samples go to `skipped.jsonl` with their reason."""
    out = Path(job.out)
    folder = out / "samples"
    if (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder))
    result = load_samples(job.data, job.data_format, **job.columns)
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
    samples = datasets.load_from_disk(str(Path(spec.out) / "samples"))
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


def encodable(lmm, rows) -> tuple[list[int], list[SkippedSample]]:
    """Indices of rows the model can encode; the others are recorded, never dropped silently."""
    good, skipped = [], []
    for index, (sample_id, image, question) in enumerate(
        zip(rows["id"], rows["image"], rows["question"], strict=True)
    ):
        try:
            lmm.encode([image])
            if not question.strip():
                raise ValueError("question is empty")
            good.append(index)
        except ValueError as error:
            reason = str(error).split(": ", 1)[-1]
            skipped.append(SkippedSample(sample_id, f"model_input: {reason}", "labelling"))
    return good, skipped


def label_rows(lmm, dataset, scales, job: LabelJob):
    """Label `dataset` at `scales`: (label rows, per-sample rows, skipped samples)."""
    from m3core.features import router_features

    labels: list[dict] = []
    samples: list[dict] = []
    skipped: list[SkippedSample] = []
    costs: dict[tuple[int, int], float] = {}
    for start in range(0, len(dataset), job.batch_size):
        rows = dataset[start : start + job.batch_size]
        try:
            encoded = lmm.encode(rows["image"])
            keep = list(range(len(rows["id"])))
        except ValueError:
            keep, bad = encodable(lmm, rows)
            skipped += bad
            if not keep:
                continue
            rows = {k: [v[i] for i in keep] for k, v in rows.items()}
            encoded = lmm.encode(rows["image"])
        ids, questions, golds = rows["id"], rows["question"], rows["answers"]
        prompts = lmm.tokenize(questions)
        features = router_features(lmm, encoded, prompts)
        prompt_lengths = [len(p) - 1 for p in prompts.ids]  # text tokens: all but the image slot
        first_correct: dict[int, int] = {}
        for scale in scales:
            pending = [i for i in range(len(ids)) if job.mode == "full" or i not in first_correct]
            if not pending:
                break
            started = time.perf_counter()
            records = lmm.generate(
                encoded.select(pending), prompts.select(pending), scale, job.max_new_tokens
            )
            latency = (time.perf_counter() - started) / len(pending)
            for i, record in zip(pending, records, strict=True):
                value = score(record.text, golds[i], job.metric)
                key = (scale, prompt_lengths[i])
                if key not in costs:
                    costs[key] = lmm.cost(scale, text_tokens=prompt_lengths[i])
                correct = value >= CORRECT_THRESHOLD
                if correct:
                    first_correct.setdefault(i, scale)
                labels.append(
                    {
                        "id": ids[i],
                        "scale": scale,
                        "answer": record.text,
                        "score": value,
                        "correct": correct,
                        "confidence": record.confidence,
                        "visual_tokens": record.visual_tokens,
                        "prefill_flops": costs[key],
                        "latency_s": latency,
                    }
                )
        for i, sample_id in enumerate(ids):
            meta = sample_meta({"meta": rows["meta"][i]}) if "meta" in rows else {}
            samples.append(
                {
                    "id": sample_id,
                    "group": str(meta.get("image_id", sample_id)),
                    "features": features[i].tolist(),
                    "oracle_scale": first_correct.get(i, scales[0]),
                    "any_correct": i in first_correct,
                    "family": str(meta.get("family", "")),
                    "level": str(meta.get("level", "")),
                }
            )
    return labels, samples, skipped


def run_labelling(
    job: LabelJob, ray_options: RayOptions | None = None, progress: bool = True
) -> Path:
    """Label every sample of `job.data` at every scale; resumes, and runs on Ray if asked."""
    from m3core import NestedLMM
    from m3core.features import FEATURES_VERSION, feature_names

    out = Path(job.out)
    samples = prepare_samples(job)

    def details() -> dict:
        lmm = NestedLMM.from_pretrained(job.model, device="cpu")
        scales = job.scales or lmm.scales
        lmm.check_scales(scales)
        return {
            "scales": list(scales),
            "model": lmm.describe(),
            "feature_names": feature_names(lmm),
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
