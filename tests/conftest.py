"""Shared fixtures: offline settings and micro models that build in milliseconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from data.schema import SAMPLE_FEATURES  # noqa: E402
from m3core import MICRO, TinySpec, tiny_lmm  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
MICRO_WORDS = ["what", "colour", "is", "the", "left", "right", "side", "?", *COLOURS]


def colour_rows(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """Images split into a left and a right colour; questions about one side or the other."""
    import random

    rng = random.Random(seed)
    rows = []
    names = list(COLOURS)
    for i in range(n):
        left, right = rng.choice(names), rng.choice(names)
        image = PILImage.new("RGB", (size, size), COLOURS[left])
        image.paste(COLOURS[right], (size // 2, 0, size, size))
        for side, answer in (("left", left), ("right", right)):
            rows.append(
                {
                    "id": f"s{i}-{side}",
                    "image": image,
                    "question": f"what colour is the {side} side ?",
                    "answers": [answer],
                    "meta": f'{{"image_id": "img{i}"}}',
                }
            )
    return rows


@pytest.fixture(scope="session")
def colour_dataset() -> Dataset:
    return Dataset.from_list(colour_rows(24), features=SAMPLE_FEATURES)


@pytest.fixture(params=["pool", "query"])
def micro_lmm(request):
    spec = TinySpec(**{**MICRO.__dict__, "kind": request.param})
    return tiny_lmm(MICRO_WORDS, spec, seed=0)


@pytest.fixture
def micro_pool():
    return tiny_lmm(MICRO_WORDS, MICRO, seed=0)
