"""Batch jobs answer every sample they can: a bad sample is recorded, never fatal to the job.

Each batch is checked once at the model's boundary (`NestedLMM.check`, which names every bad
sample). What passes can still fail inside the model (an image the processor cannot take,
a tokenizer surprise), so `isolate` re-runs a failing batch in halves until it has found the
samples that fail on their own, records them, and keeps the answers of the rest: one bad
sample costs about log2(batch) extra runs. Job-level failures (a full disk, a missing file,
host memory) are raised, as is a failure of every sample of a batch: that is the job's
problem, not the samples'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import datasets

from data import SkippedSample

JOB_ERRORS = (OSError, MemoryError)
T = TypeVar("T")


def encoded_images(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with its image column left as {"bytes", "path"} cells: the model's check
    decodes each image on its own, so a corrupt one is that sample's skip, not the batch's
    crash inside `datasets`."""
    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def isolate(
    process: Callable[[list[int]], list[T]], names: Sequence[str], source: str
) -> tuple[list[int], list[T], list[SkippedSample]]:
    """Run `process` on every index of `names`; (indices answered, their results, skipped).

    `process(indices)` returns one result per index, in order, or raises. A failing group is
    split in halves until single samples fail; each is recorded as "model_error: ...".
    """
    done: dict[int, T] = {}
    skipped: list[SkippedSample] = []
    errors: list[Exception] = []

    def attempt(part: list[int]) -> None:
        try:
            results = process(part)
        except JOB_ERRORS:
            raise
        except Exception as error:  # anything else is this sample's (or group's) problem
            if len(part) > 1:
                attempt(part[: len(part) // 2])
                attempt(part[len(part) // 2 :])
                return
            errors.append(error)
            reason = f"model_error: {type(error).__name__}: {error}"
            skipped.append(SkippedSample(str(names[part[0]]), reason, source))
            return
        done.update(zip(part, results, strict=True))

    if names:
        attempt(list(range(len(names))))
    if len(names) > 1 and not done:
        raise errors[0]
    kept = sorted(done)
    return kept, [done[i] for i in kept], skipped
