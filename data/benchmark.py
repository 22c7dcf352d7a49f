"""Write the synthetic benchmark to a folder: one `datasets` folder per split.

Layout of `out_dir`:
    benchmark.json              seed, sizes, image size, families, vocabulary, counts
    <split>/                    Dataset.save_to_disk (uniform schema, Image column)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from data.synthetic import FAMILY_LEVELS, SPLITS, make_split, vocabulary

DEFAULT_SIZES: dict[str, int] = {"train": 2000, "calib": 500, "test": 500}
MANIFEST = "benchmark.json"


def make_benchmark(
    out_dir: str | Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int = 96,
    *,
    questions_per_image: int = 4,
    family_weights: Mapping[str, float] | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Generate every split and write it to `out_dir` (layout in the module docstring).

    `sizes` gives images per split (default DEFAULT_SIZES); `progress` draws a bar per split.
    Returns split -> its save_to_disk folder.
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
            progress=progress,
        )
        paths[split] = out / split
        dataset.save_to_disk(str(paths[split]))
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
