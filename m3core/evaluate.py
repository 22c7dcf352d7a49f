"""Per-scale accuracy of a `NestedLMM` on a slice of a dataset (training progress, smoke checks).

Full per-sample results at every scale are the labelling pipeline's job; this is the quick view.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.scoring import is_correct
from m3core.lmm import NestedLMM


def scale_accuracy(
    lmm: NestedLMM,
    dataset,
    scales: Sequence[int] | None = None,
    max_samples: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 6,
) -> dict[int, float]:
    """Accuracy at each scale; every image is encoded and every question tokenized once."""
    scales = tuple(scales or lmm.scales)
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    hits = dict.fromkeys(scales, 0)
    for start in range(0, n, batch_size):
        rows = dataset[start : min(start + batch_size, n)]
        encoded, prompts = lmm.encode(rows["image"]), lmm.tokenize(rows["question"])
        for scale in scales:
            records = lmm.generate(encoded, prompts, scale, max_new_tokens)
            for record, answers in zip(records, rows["answers"], strict=True):
                hits[scale] += is_correct(record.text, answers)
    return {scale: hits[scale] / max(1, n) for scale in scales}
