"""Write the synthetic benchmark to a folder: one `datasets` folder per split plus the same
samples in the LLaVA evaluation layout, so external LLaVA eval scripts can run on it.

Layout of `out_dir`:
    benchmark.json              seed, sizes, image size, families, vocabulary, counts
    <split>/                    Dataset.save_to_disk (uniform schema, Image column)
    llava/<split>/questions.jsonl   {"question_id", "image", "text"} per sample
    llava/<split>/answers.jsonl     {"question_id", "answers", "meta"} per sample
    llava/<split>/images/<image_id>.png
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import datasets

from data.schema import sample_meta
from data.synthetic import FAMILY_LEVELS, SPLITS, make_split, vocabulary

DEFAULT_SIZES: dict[str, int] = {"train": 2000, "calib": 500, "test": 500}
MANIFEST = "benchmark.json"


def llava_dir(out_dir: str | Path, split: str) -> Path:
    """Where `make_benchmark` puts the LLaVA evaluation layout of a split."""
    return Path(out_dir) / "llava" / split


def write_llava(dataset: datasets.Dataset, out_dir: str | Path) -> Path:
    """Write uniform-schema samples in the LLaVA evaluation layout; one image file per
    distinct image (`meta.image_id` when present, else the sample id)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    written: set[str] = set()
    with (
        open(out / "questions.jsonl", "w", encoding="utf-8") as questions,
        open(out / "answers.jsonl", "w", encoding="utf-8") as answers,
    ):
        for row in raw:
            meta = sample_meta(row)
            name = f"{meta.get('image_id', row['id'])}.png"
            if name not in written:
                image = row["image"]
                data = image["bytes"] or Path(image["path"]).read_bytes()
                (out / "images" / name).write_bytes(data)
                written.add(name)
            q = {"question_id": row["id"], "image": name, "text": row["question"]}
            a = {"question_id": row["id"], "answers": list(row["answers"]), "meta": meta}
            questions.write(json.dumps(q) + "\n")
            answers.write(json.dumps(a) + "\n")
    return out


def make_benchmark(
    out_dir: str | Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int = 96,
    *,
    questions_per_image: int = 4,
    family_weights: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Generate every split and write it to `out_dir` (layout in the module docstring).

    `sizes` gives images per split (default DEFAULT_SIZES). Returns split -> its
    save_to_disk folder; `llava_dir(out_dir, split)` gives the LLaVA copy.
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, n_images in sizes.items():
        dataset = make_split(
            split,
            n_images,
            seed,
            image_size=image_size,
            questions_per_image=questions_per_image,
            family_weights=family_weights,
        )
        paths[split] = out / split
        dataset.save_to_disk(str(paths[split]))
        write_llava(dataset, llava_dir(out, split))
        counts[split] = dict(Counter(json.loads(m)["family"] for m in dataset["meta"]))
    manifest = {
        "seed": seed,
        "image_size": image_size,
        "sizes": sizes,
        "questions_per_image": questions_per_image,
        "family_weights": dict(family_weights) if family_weights else None,
        "families": FAMILY_LEVELS,
        "vocabulary": vocabulary(),
        "questions_per_family": counts,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths
