"""make_benchmark: a datasets folder per split and a manifest, loadable by the loaders."""

from __future__ import annotations

import json

from data import FAMILY_LEVELS, load_samples, make_benchmark, sample_meta, vocabulary


def test_make_benchmark_writes_every_split_and_its_manifest(tmp_path):
    sizes = {"train": 6, "calib": 3, "test": 3}
    paths = make_benchmark(tmp_path / "bench", sizes, seed=5)
    assert set(paths) == set(sizes)
    manifest = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert manifest["sizes"] == sizes and manifest["seed"] == 5
    assert manifest["families"] == FAMILY_LEVELS
    assert manifest["vocabulary"] == vocabulary()
    for split, n_images in sizes.items():
        disk = load_samples(paths[split])
        assert disk.n_skipped == 0 and disk.n_loaded == 4 * n_images
        assert all(sample_meta(r)["split"] == split for r in disk.dataset.select_columns(["meta"]))
        assert load_samples(tmp_path / "bench", split=split).dataset["id"] == disk.dataset["id"]

    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == [
        "benchmark.json",
        *sorted(sizes),
    ]
