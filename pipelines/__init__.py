"""Labelling, batch processing, AdaptiveLMM, reports and the CLI: the layer that uses all others.

Exports load lazily so `adaptive-m3 --help` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.adaptive import DEFAULT_CASCADE_THRESHOLD, AdaptiveLMM, AdaptiveRecord

__all__ = ["DEFAULT_CASCADE_THRESHOLD", "AdaptiveLMM", "AdaptiveRecord"]


def __getattr__(name: str):
    if name in __all__:
        from pipelines import adaptive

        return getattr(adaptive, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
