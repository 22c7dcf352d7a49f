import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from data.schema import SAMPLE_FEATURES
from data.synthetic import make_split, vocabulary
from m3core import MICRO, NestedLMM, tiny_lmm
from m3core.features import probe_feature_names
from pipelines.labelling import LABEL_SCHEMA, SAMPLE_SCHEMA, LabelJob, run_labelling
from pipelines.labels import read_labels
from pipelines.report import granularity, write_granularity
from pipelines.shards import RayOptions
from predictor import oracle_scale_index

COMPARED = ["id", "scale", "answer", "score", "correct", "confidence", "prefill_flops"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelling")
    rows = make_split("test", 5, seed=0, image_size=32).to_list()
    rows.append({**rows[0], "id": "bad-empty-question", "question": " "})
    Dataset.from_list(rows, features=SAMPLE_FEATURES).save_to_disk(str(root / "data"))
    lmm = tiny_lmm(vocabulary(), MICRO, seed=0)
    lmm.save_pretrained(root / "model")
    return root


def job(inputs: Path, out: str, **overrides) -> LabelJob:
    values = {
        "model": str(inputs / "model"),
        "data": str(inputs / "data"),
        "out": str(inputs / out),
        "shard_size": 4,
        "batch_size": 3,
        "max_new_tokens": 3,
    }
    return LabelJob(**{**values, **overrides})


def shard_tables(folder: Path) -> dict[str, pa.Table]:
    return {
        d.name: pq.read_table(d / "labels.parquet").select(COMPARED)
        for d in sorted((folder / "shards").glob("shard-*[0-9]"))
    }


@pytest.fixture(scope="module")
def in_process(inputs):
    out = run_labelling(job(inputs, "in-process"), progress=False)
    return out


def test_full_labels_every_sample_at_every_scale_and_records_the_bad_one(in_process):
    labels = read_labels(in_process)
    assert len(labels) == 20 and len(set(labels.ids)) == 20
    assert labels.observed.all() and labels.correct.shape == (20, 3)
    assert labels.features.shape[0] == 20 and labels.features.shape[1] == len(labels.feature_names)
    assert [s["id"] for s in labels.skipped] == ["bad-empty-question"]
    assert "empty_question" in labels.skipped[0]["reason"]
    assert (np.diff(labels.flops, axis=1) > 0).all()
    samples = pq.read_table(next((in_process / "shards").glob("shard-*")) / "samples.parquet")
    assert samples.schema.equals(SAMPLE_SCHEMA)


def test_resume_recomputes_only_missing_shards(inputs, in_process):
    out = inputs / "resume"
    shutil.copytree(in_process, out)
    shutil.rmtree(out / "shards" / "shard-00002")
    stamps = {
        d.name: (d / "labels.parquet").stat().st_mtime_ns for d in (out / "shards").glob("shard-*")
    }
    run_labelling(job(inputs, "resume"), progress=False)
    after = {
        d.name: (d / "labels.parquet").stat().st_mtime_ns for d in (out / "shards").glob("shard-*")
    }
    assert set(after) == set(stamps) | {"shard-00002"}
    assert all(after[name] == stamp for name, stamp in stamps.items())
    assert shard_tables(out) == shard_tables(in_process)


def test_resume_refuses_a_different_job(inputs, in_process):
    with pytest.raises(ValueError, match="mode"):
        run_labelling(job(inputs, "in-process", mode="cascade"), progress=False)


def test_cascade_stops_at_the_first_correct_scale(inputs, in_process):
    out = run_labelling(job(inputs, "cascade", mode="cascade"), progress=False)
    full, cascade = read_labels(in_process), read_labels(out)
    assert cascade.ids == full.ids
    assert np.array_equal(
        oracle_scale_index(cascade.correct)[0], oracle_scale_index(full.correct)[0]
    )
    tried = cascade.observed.sum(1)
    first = oracle_scale_index(full.correct)[0]
    any_correct = full.correct.any(1)
    assert np.array_equal(tried, np.where(any_correct, first + 1, len(full.scales)))


def map_worker_pids() -> list[int]:
    """Ray titles actor processes `ray::ShardWorker`; find them in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::ShardWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


def kill_one_worker_when_a_shard_lands(out: Path, killed: list, done: threading.Event) -> None:
    """Kill one actor once a shard has landed, polling until the run ends: a single look
    could fall between two actors' lives."""
    while not done.is_set() and not killed:
        if (out / "shards").is_dir() and list((out / "shards").glob("shard-*[0-9]")):
            for pid in map_worker_pids()[:1]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
        time.sleep(0.02)


def test_ray_run_with_a_killed_worker_matches_in_process(inputs, in_process):
    import ray

    out = inputs / "ray"
    killed: list[int] = []
    done = threading.Event()
    watcher = threading.Thread(target=kill_one_worker_when_a_shard_lands, args=(out, killed, done))
    watcher.start()
    try:
        run_labelling(job(inputs, "ray", shard_size=1), RayOptions(workers=2), progress=False)
        lingering = ray.is_initialized()
    finally:
        done.set()
        watcher.join()
        ray.shutdown()
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert not lingering, "the local Ray cluster the run started was left running"
    ray_labels, local = read_labels(out), read_labels(in_process)
    assert sorted(ray_labels.ids) == sorted(local.ids)
    assert len(ray_labels.ids) == len(set(ray_labels.ids))
    order = [ray_labels.ids.index(i) for i in local.ids]
    assert np.array_equal(ray_labels.correct[order], local.correct)
    assert [ray_labels.answers[i] for i in order] == local.answers
    assert np.allclose(ray_labels.confidence[order], local.confidence, atol=1e-5)
    assert np.allclose(ray_labels.features[order], local.features, atol=1e-5)


def hand_made_labels(folder: Path) -> None:
    """4 samples, scales 1/9/36: correctness rows chosen so every number is known."""
    correct = {"a": [1, 1, 1], "b": [0, 1, 1], "c": [0, 0, 1], "d": [0, 0, 0]}
    family = {"a": "background", "b": "count", "c": "digit", "d": "digit"}
    shard = folder / "shards" / "shard-00000"
    shard.mkdir(parents=True)
    labels, samples = [], []
    for sample_id, row in correct.items():
        for scale, ok in zip((1, 9, 36), row, strict=True):
            labels.append(
                {
                    "id": sample_id,
                    "scale": scale,
                    "answer": "x",
                    "score": float(ok),
                    "correct": bool(ok),
                    "confidence": -0.1,
                    "visual_tokens": scale,
                    "prefill_flops": 1e6 * (10 + scale),
                    "latency_s": 0.01,
                }
            )
        samples.append(
            {
                "id": sample_id,
                "group": sample_id,
                "features": [0.0, 1.0],
                "family": family[sample_id],
                "level": "fine" if family[sample_id] == "digit" else "global",
            }
        )
    pq.write_table(pa.Table.from_pylist(labels, LABEL_SCHEMA), shard / "labels.parquet")
    pq.write_table(pa.Table.from_pylist(samples, SAMPLE_SCHEMA), shard / "samples.parquet")
    (folder / "spec.json").write_text(
        json.dumps({"scales": [1, 9, 36], "feature_names": ["f0", "f1"]})
    )


def test_granularity_numbers_on_hand_made_labels(tmp_path):
    hand_made_labels(tmp_path / "labels")
    report = granularity(read_labels(tmp_path / "labels"))
    assert report["all"]["accuracy"] == {"1": 0.25, "9": 0.5, "36": 0.75}
    # oracle: a@1, b@9, c@36, d wrong everywhere -> counted at 1
    assert report["all"]["oracle"] == {"accuracy": 0.75, "mean_tokens": (1 + 9 + 36 + 1) / 4}
    assert report["wrong_at_every_scale"] == 1
    assert report["by_family"]["digit"]["accuracy"] == {"1": 0.0, "9": 0.0, "36": 0.5}
    assert report["by_level"]["global"]["oracle"]["mean_tokens"] == (1 + 9) / 2
    curve = dict((round(b, 6), a) for b, a in report["budgeted_oracle"])
    assert curve[1.0] == 0.25 and curve[3.0] == 0.5 and curve[11.75] == 0.75
    paths = write_granularity(read_labels(tmp_path / "labels"), tmp_path / "report")
    assert paths["png"].stat().st_size > 0
    assert "| digit | 2 | 0.0 | 0.0 | 50.0 | 50.0 | 18.5 |" in paths["granularity_md"].read_text()


def test_resume_refuses_a_model_retrained_in_place_or_other_features(inputs, in_process, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(inputs / "model", model)
    out = tmp_path / "labels"
    shutil.copytree(in_process, out)
    spec = json.loads((out / "spec.json").read_text())
    spec["job"]["model"] = str(model)
    (out / "spec.json").write_text(json.dumps(spec))
    run_labelling(job(inputs, str(out), model=str(model)), progress=False)  # same weights
    spec = json.loads((out / "spec.json").read_text())
    spec["inputs"]["router features"] = "version 1"  # labelled by an older adaptive-m3
    (out / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="router features"):
        run_labelling(job(inputs, str(out), model=str(model)), progress=False)
    del spec["inputs"]["router features"]  # labelled before versions were recorded
    (out / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="router features"):
        run_labelling(job(inputs, str(out), model=str(model)), progress=False)
    tiny_lmm(vocabulary(), MICRO, seed=1).save_pretrained(model)
    with pytest.raises(ValueError, match="model weights"):
        run_labelling(job(inputs, str(out), model=str(model)), progress=False)


def test_probe_features_gold_probabilities_and_vision_flops_are_recorded(inputs, in_process):
    """The probe at the two smallest scales is what generate's own prefill gives; P(gold) is
    the teacher-forced probability of the gold answer; the tower's FLOPs are kept apart."""
    labels = read_labels(in_process)
    lmm = NestedLMM.from_pretrained(inputs / "model", device="cpu")
    assert labels.probe_scales == lmm.scales[:2]
    assert labels.probe_names == probe_feature_names(lmm)
    samples = Dataset.load_from_disk(str(in_process / "samples")).to_list()
    by_id = {s["id"]: s for s in samples}
    rows = [by_id[i] for i in labels.ids]
    encoded = lmm.encode([r["image"] for r in rows])
    prompts = lmm.tokenize([r["question"] for r in rows])
    gold_ids = lmm.answer_ids([r["answers"][0] for r in rows])
    for j, scale in enumerate(lmm.scales):
        if scale in labels.probe_scales:
            records = lmm.generate(encoded, prompts, scale, 3, probe=True)
            expected = np.stack([r.probe for r in records])
            np.testing.assert_allclose(labels.probe_at(scale), expected, rtol=1e-4, atol=1e-5)
        p_gold = np.exp(lmm.continuation_logprob(encoded, prompts, gold_ids, scale))
        np.testing.assert_allclose(labels.gold_prob[:, j], p_gold, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="probe features at scales \\[1, 4\\], not 16"):
        labels.probe_at(16)
    np.testing.assert_allclose(labels.vision_flops, lmm.image_flops())
    assert labels.costs()["vision_flops"] == pytest.approx(lmm.image_flops())
    assert (labels.flops > labels.vision_flops[:, None]).all()


def test_a_folder_labelled_before_probes_reads_and_refuses_only_probe_routers(
    inputs, in_process, tmp_path
):
    old = tmp_path / "old"
    shutil.copytree(in_process, old)
    spec = json.loads((old / "spec.json").read_text())
    for key in ("probe_scales", "probe_feature_names"):
        del spec[key]
    (old / "spec.json").write_text(json.dumps(spec))
    for shard in (old / "shards").glob("shard-*[0-9]"):
        for name, dropped in (("labels", ("probe", "gold_prob")), ("samples", ("vision_flops",))):
            table = pq.read_table(shard / f"{name}.parquet")
            pq.write_table(table.drop_columns(list(dropped)), shard / f"{name}.parquet")
    labels, new = read_labels(old), read_labels(in_process)
    np.testing.assert_array_equal(labels.correct, new.correct)
    np.testing.assert_array_equal(labels.features, new.features)
    assert labels.probe is None and labels.gold_prob is None and labels.vision_flops is None
    assert "vision_flops" not in labels.costs()
    with pytest.raises(ValueError, match="hold no probe features.*adaptive-m3 label"):
        labels.probe_at(1)
    with pytest.raises(ValueError, match="no gold-answer probabilities"):
        labels.require_gold_prob()
