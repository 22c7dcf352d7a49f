"""make_benchmark: a datasets folder per split plus the LLaVA layout, loadable by the loaders."""

from __future__ import annotations

import json

from data import FAMILY_LEVELS, llava_dir, load_samples, make_benchmark, sample_meta, vocabulary


def test_make_benchmark_writes_every_split_in_both_layouts(tmp_path):
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

        llava = load_samples(llava_dir(tmp_path / "bench", split))
        assert llava.n_skipped == 0
        assert sorted(llava.dataset["id"]) == sorted(disk.dataset["id"])
        by_id = {r["id"]: r for r in disk.dataset.select_columns(["id", "answers", "meta"])}
        for row in llava.dataset.select_columns(["id", "answers", "meta"]):
            assert row["answers"] == by_id[row["id"]]["answers"]
            assert sample_meta(row) == sample_meta(by_id[row["id"]])
        images = list((llava_dir(tmp_path / "bench", split) / "images").iterdir())
        assert len(images) == n_images
