"""Oracle labels from lmms-eval runs at fixed scales (`adaptive-m3 label --from-lmms-eval`).

Each run is one `lmms-eval --model adaptive_m3 --model_args pretrained=DIR,scale=N
--log_samples` at one fixed scale; together they give every sample's answer at every scale,
and the label folder `adaptive-m3 label` writes (`pipelines.labelling`'s schema, read by
`read_labels`). A sample is correct at a scale when its task's own per-sample metric reaches
`threshold`. Runs must share the model and every sample's prompt and target, else they are
refused. Router features and prefill costs come from `model` on the same docs (lmms-eval
loads them again through the runs' task configs), so any lmms-eval task can train a router.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from data import METRICS, SAMPLE_FEATURES, SkippedSample, encode_meta, sample_meta, score
from data.scoring import CORRECT_THRESHOLD
from pipelines.jsonl import write_jsonl
from pipelines.labelling import LABEL_SCHEMA, SAMPLE_SCHEMA, WEIGHT_SUFFIXES
from pipelines.shards import commit_shard, folder_digest, plan_shards

MODEL_NAME = "adaptive_m3"
ID_KEYS = ("id", "question_id", "questionId", "qid", "sample_id", "index")
# model_args that change how a run executes, not what it answers
_RUN_ONLY_ARGS = ("scale", "batch_size", "device", "chunk")


@dataclass
class LmmsRun:
    """One lmms-eval run: its results file, fixed scale and per-task sample logs by doc id."""

    path: Path
    results: dict
    model_args: dict[str, str]
    scale: int
    samples: dict[str, dict[int, dict]]

    @property
    def tasks(self) -> list[str]:
        return sorted(self.samples)


@dataclass
class LmmsLabelJob:
    """What `label --from-lmms-eval` reads and writes (saved in `spec.json`)."""

    runs: tuple[str, ...]
    model: str
    out: str
    threshold: float = CORRECT_THRESHOLD
    lmms_metric: str | None = None
    metric: str | None = None
    include_path: str | None = None
    shard_size: int = 128
    batch_size: int = 64
    device: str | None = None

    def __post_init__(self) -> None:
        self.runs = tuple(str(r) for r in self.runs)
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")


def parse_model_args(text: str) -> dict[str, str]:
    """`pretrained=DIR,scale=9` -> {"pretrained": "DIR", "scale": "9"}."""
    args = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        args[key.strip()] = value.strip()
    return args


def read_run(results_path: Path) -> LmmsRun:
    """A run from its `<date>_results.json` and the `<date>_samples_<task>.jsonl` beside it."""
    results = json.loads(results_path.read_text())
    config = results.get("config", {})
    where = str(results_path)
    if config.get("model") != MODEL_NAME:
        raise ValueError(f"{where}: run of model {config.get('model')!r}, not {MODEL_NAME}")
    args = parse_model_args(str(config.get("model_args", "")))
    scale = args.get("scale", "auto")
    if not scale.isdigit():
        raise ValueError(f"{where}: scale={scale}; labels need runs at one fixed scale each")
    prefix = results_path.name[: -len("_results.json")]
    samples: dict[str, dict[int, dict]] = {}
    for task in results.get("configs", {}):
        log = results_path.parent / f"{prefix}_samples_{task}.jsonl"
        if not log.is_file():
            raise FileNotFoundError(f"{where}: no sample log {log.name}; run with --log_samples")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        samples[task] = {int(r["doc_id"]): r for r in rows}
    if not samples:
        raise ValueError(f"{where}: the run holds no tasks")
    return LmmsRun(results_path, results, args, int(scale), samples)


def find_runs(paths: Iterable[str | Path]) -> list[LmmsRun]:
    """Every run under `paths` (results files, or folders searched for `*_results.json`)."""
    runs = []
    for path in map(Path, paths):
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(path.rglob("*_results.json"))
        else:
            raise FileNotFoundError(f"{path}: no such run folder or results file")
        if not found:
            raise FileNotFoundError(f"{path} holds no lmms-eval results (*_results.json)")
        runs += [read_run(p) for p in found]
    return runs


def _same_model(a: str, b: str) -> bool:
    if Path(a).resolve() == Path(b).resolve():
        return True
    digest = folder_digest(a, WEIGHT_SUFFIXES)
    return digest is not None and digest == folder_digest(b, WEIGHT_SUFFIXES)


def check_runs(runs: Sequence[LmmsRun], model: str) -> list[LmmsRun]:
    """The runs sorted by scale, after refusing any set whose model or samples differ."""
    from m3core.shipped import resolve_model

    if len(runs) < 2:
        raise ValueError(f"got {len(runs)} run(s); labels need runs at two or more scales")
    runs = sorted(runs, key=lambda r: r.scale)
    first = runs[0]
    scales = [r.scale for r in runs]
    if len(set(scales)) != len(scales):
        raise ValueError(f"two runs at the same scale: {scales}")
    settings = {k: v for k, v in first.model_args.items() if k not in _RUN_ONLY_ARGS}
    model_dir = str(resolve_model(model))
    for run in runs:
        other = {k: v for k, v in run.model_args.items() if k not in _RUN_ONLY_ARGS}
        if other != settings:
            raise ValueError(
                f"{run.path} was run with model_args {other}, {first.path} with {settings}: "
                "runs must differ in scale only"
            )
        pretrained = str(resolve_model(run.model_args.get("pretrained", "tiny-m3")))
        if not _same_model(pretrained, model_dir):
            raise ValueError(
                f"{run.path} was run with model {pretrained}, not {model_dir}: router features "
                "must come from the model that answered"
            )
        if run.tasks != first.tasks:
            raise ValueError(f"{run.path} ran tasks {run.tasks}, {first.path} ran {first.tasks}")
        for task in first.tasks:
            mine, theirs = first.samples[task], run.samples[task]
            if sorted(mine) != sorted(theirs):
                raise ValueError(f"{run.path}: task {task} ran other docs than {first.path}")
            for doc_id, row in mine.items():
                for key in ("input", "target"):
                    if row.get(key) != theirs[doc_id].get(key):
                        raise ValueError(
                            f"{run.path}: task {task} doc {doc_id} has another {key} than in "
                            f"{first.path}: the runs did not ask the same samples"
                        )
    return runs


def _counts(row: Mapping[str, Any]) -> dict:
    counts = row.get("token_counts") or [None]
    return counts[0] or {}


def sample_value(row: Mapping[str, Any], key: str) -> float | None:
    """A per-sample metric value as a number: a number, a bool, or a dict's "score"."""
    value = row.get(key)
    if isinstance(value, Mapping):
        value = value.get("score")
    if isinstance(value, bool | int | float) and not (
        isinstance(value, float) and math.isnan(value)
    ):
        return float(value)
    return None


def task_metric(run: LmmsRun, task: str, wanted: str | None) -> str:
    """The per-sample metric that decides correctness: `wanted`, else the first metric of
    the task's metric_list whose logged values are numbers."""
    listed = [m["metric"] for m in run.results["configs"][task].get("metric_list", [])]
    rows = list(run.samples[task].values())
    candidates = [wanted] if wanted else listed
    for name in candidates:
        if rows and all(sample_value(r, name) is not None for r in rows):
            return name
    raise ValueError(
        f"task {task}: no per-sample metric among {candidates} is a number in the logs (it "
        "is scored at aggregation, e.g. by a judge); pass --lmms-metric NAME, or --metric "
        "vqa|exact|mc|anls|relaxed|yesno to score the logged answers with ours"
    )


def _targets(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            parsed = json.loads(value.replace("'", '"'))
        except json.JSONDecodeError:
            return [value]
        value = parsed
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


@dataclass
class _Doc:
    task: str
    doc_id: int
    id: str
    question: str
    answers: list[str]
    image: Any
    meta: dict = field(default_factory=dict)


def load_docs(runs: Sequence[LmmsRun], include_path: str | None) -> list[_Doc]:
    """The runs' docs again, through lmms-eval's task configs: images and prompts as the
    model saw them (the sample logs keep neither)."""
    try:
        from lmms_eval.tasks import TaskManager, get_task_dict
    except ImportError as error:
        raise ValueError(
            f"--from-lmms-eval reloads the runs' docs with lmms-eval, which does not import "
            f"({error}); install it as docs/evaluation.md says"
        ) from None

    from pipelines.lmms_plugin import _flatten, question_of

    first = runs[0]
    recorded = first.results["config"].get("resolved_cli_args", {}).get("include_path")
    include = include_path or recorded
    manager = TaskManager("ERROR", include_path=include, include_defaults=include is None)
    tasks = get_task_dict(first.tasks, manager)
    docs = []
    for name in first.tasks:
        task = tasks[name]
        split = task.config.test_split or task.config.validation_split
        for doc_id, row in sorted(first.samples[name].items()):
            doc = task.dataset[split][doc_id]
            visuals = _flatten(task.doc_to_visual(doc))
            meta = sample_meta(doc) if isinstance(doc.get("meta"), str | Mapping) else {}
            meta.update({"task": name, "doc_id": doc_id})
            docs.append(
                _Doc(
                    task=name,
                    doc_id=doc_id,
                    id=next((str(doc[k]) for k in ID_KEYS if doc.get(k) is not None), ""),
                    question=question_of(str(row.get("input", ""))),
                    answers=_targets(row.get("target")),
                    image=visuals[0] if len(visuals) == 1 else None,
                    meta=meta,
                )
            )
    ids = [d.id for d in docs]
    if "" in ids or len(set(ids)) != len(ids):
        for d in docs:
            d.id = f"{d.task}/{d.doc_id}"
    return docs


def label_from_lmms_eval(job: LmmsLabelJob) -> Path:
    """Write the label folder of `job.runs` to `job.out`; returns it."""
    from m3core import NestedLMM
    from m3core.features import FEATURES_VERSION, feature_names, router_features
    from m3core.shipped import resolve_model

    out = Path(job.out)
    if (out / "spec.json").exists():
        raise ValueError(f"{out} already holds labels; use a new --out folder")
    runs = check_runs(find_runs(job.runs), job.model)
    scales = [r.scale for r in runs]
    lmm = NestedLMM.from_pretrained(resolve_model(job.model), device=job.device)
    lmm.check_scales(scales)
    metrics = {t: job.metric or task_metric(runs[0], t, job.lmms_metric) for t in runs[0].tasks}
    docs = load_docs(runs, job.include_path)

    skipped: list[SkippedSample] = []
    kept: list[_Doc] = []
    for doc in docs:
        reasons = [_counts(r.samples[doc.task][doc.doc_id]).get("skipped") for r in runs]
        reason = next((r for r in reasons if r), None)
        if reason is None and doc.image is None:
            reason = "model_input: the doc has no single image"
        if reason:
            skipped.append(SkippedSample(doc.id, reason, "lmms-eval"))
        else:
            kept.append(doc)

    labels, rows = [], []
    costs: dict[tuple[int, int], float] = {}
    for start in range(0, len(kept), job.batch_size):
        batch = kept[start : start + job.batch_size]
        encoded = lmm.encode([d.image for d in batch])
        prompts = lmm.tokenize([d.question for d in batch])
        features = router_features(lmm, encoded, prompts)
        for i, doc in enumerate(batch):
            text_tokens = len(prompts.ids[i]) - 1
            for run in runs:
                logged = run.samples[doc.task][doc.doc_id]
                answer = str(logged.get("filtered_resps", ""))
                if job.metric:
                    value = score(answer, doc.answers, job.metric)
                else:
                    value = sample_value(logged, metrics[doc.task])
                correct = value >= job.threshold
                counts = _counts(logged)
                key = (run.scale, text_tokens)
                if key not in costs:
                    costs[key] = lmm.cost(run.scale, text_tokens=text_tokens)
                labels.append(
                    {
                        "id": doc.id,
                        "scale": run.scale,
                        "answer": answer,
                        "score": value,
                        "correct": correct,
                        "confidence": counts.get("confidence", float("nan")),
                        "visual_tokens": counts.get("visual_tokens", run.scale),
                        "prefill_flops": costs[key],
                        "latency_s": counts.get("latency_s", float("nan")),
                    }
                )
            rows.append(
                {
                    "id": doc.id,
                    "group": str(doc.meta.get("image_id", doc.id)),
                    "features": features[i].tolist(),
                    "family": str(doc.meta.get("family", "")),
                    "level": str(doc.meta.get("level", "")),
                }
            )

    task_of = {d.id: d.task for d in kept}
    out.mkdir(parents=True, exist_ok=True)
    samples = datasets.Dataset.from_list(
        [
            {
                "id": d.id,
                "image": d.image,
                "question": d.question,
                "answers": d.answers,
                "meta": encode_meta(d.meta),
            }
            for d in kept
        ],
        features=SAMPLE_FEATURES,
    )
    samples.save_to_disk(str(out / "samples"))
    write_jsonl(out / "skipped.jsonl", [asdict(s) for s in skipped])
    per_sample = len(scales)
    for shard in plan_shards(len(rows), job.shard_size):

        def write(folder: Path, shard=shard) -> None:
            part = labels[shard.start * per_sample : shard.stop * per_sample]
            pq.write_table(pa.Table.from_pylist(part, LABEL_SCHEMA), folder / "labels.parquet")
            pq.write_table(
                pa.Table.from_pylist(rows[shard.start : shard.stop], SAMPLE_SCHEMA),
                folder / "samples.parquet",
            )
            write_jsonl(folder / "skipped.jsonl", [])

        commit_shard(out, shard, write)
    spec = {
        "job": asdict(job),
        "inputs": {
            "model weights": folder_digest(resolve_model(job.model), WEIGHT_SUFFIXES),
            "router features": f"version {FEATURES_VERSION}",
        },
        "source": "lmms-eval",
        "runs": [str(r.path) for r in runs],
        "scales": scales,
        "model": lmm.describe(),
        "feature_names": feature_names(lmm),
        "samples": len(kept),
        "correct_threshold": job.threshold,
        "task_metrics": {t: (f"ours: {m}" if job.metric else m) for t, m in metrics.items()},
        "graded": {
            t: any(r["score"] not in (0.0, 1.0) for r in labels if task_of[r["id"]] == t)
            for t in metrics
        },
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=1, default=str))
    return out
