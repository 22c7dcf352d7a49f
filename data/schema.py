"""The one sample schema every layer downstream of `data` reads.

A sample is `id`, `image`, `question`, `answers` (gold strings) and `meta`. Arrow cannot hold
dicts whose keys and value types differ from row to row, so `meta` travels as a JSON string
and `sample_meta` turns it back into a dict.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets import Features, Image, Value

try:
    from datasets import List as _ListFeature
except ImportError:  # datasets < 4 names it Sequence
    from datasets import Sequence as _ListFeature

SAMPLE_FEATURES = Features(
    {
        "id": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answers": _ListFeature(Value("string")),
        "meta": Value("string"),
    }
)
SAMPLE_COLUMNS: tuple[str, ...] = tuple(SAMPLE_FEATURES)


def sample_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """The `meta` of a sample row as a dict (stored as a JSON string; empty means {})."""
    meta = row.get("meta")
    if meta is None or meta == "":
        return {}
    if isinstance(meta, Mapping):
        return dict(meta)
    return json.loads(meta)


def encode_meta(meta: Mapping[str, Any] | None) -> str:
    """JSON text for the `meta` column; keys sorted so equal metadata gives equal bytes."""
    return json.dumps(dict(meta or {}), sort_keys=True, default=str)


@dataclass
class SkippedSample:
    """A sample a loader left out, with why, so that nothing is dropped silently.

    `reason` is "<kind>" or "<kind>: <detail>", e.g. "missing_image: /data/x.png".
    """

    id: str
    reason: str
    source: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0].strip()


@dataclass
class LoadResult:
    """The samples that passed the checks, plus a record for every one that did not."""

    dataset: datasets.Dataset
    skipped: list[SkippedSample] = field(default_factory=list)
    source: str = ""

    @property
    def n_loaded(self) -> int:
        return len(self.dataset)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason kind, most frequent first."""
        return dict(Counter(s.kind for s in self.skipped).most_common())

    def summary(self) -> str:
        """One line for logs: how many loaded, how many skipped and why."""
        where = f" from {self.source}" if self.source else ""
        line = f"loaded {self.n_loaded} samples{where}, skipped {self.n_skipped}"
        counts = self.skip_counts()
        if counts:
            line += " (" + ", ".join(f"{k}: {n}" for k, n in counts.items()) + ")"
        return line
