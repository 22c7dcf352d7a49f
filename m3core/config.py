"""Nesting settings, stored inside the Llava config so a checkpoint folder stays transformers'."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from transformers import LlavaConfig

from m3core.nesting import pool_scales

STOCK_LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class NestingConfig:
    """How visual tokens nest: `pool` (M3) or `query` (MQT), and at which scales.

    `prompt_template` holds one `<image>` slot that is filled with `scale` embeddings;
    `text_tokens` is the typical prompt length (without image tokens) used by the cost model.
    `grid_position` adds a learned 2-D position embedding to the projected grid before nesting:
    a CLIP tower's features carry their position, a convolutional tower's do not.
    """

    kind: str = "pool"
    scales: tuple[int, ...] = ()
    num_queries: int = 0
    num_heads: int = 4
    prompt_template: str = STOCK_LLAVA_TEMPLATE
    text_tokens: int = 40
    grid_position: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("pool", "query"):
            raise ValueError(f"nesting kind must be 'pool' or 'query', got {self.kind!r}")
        if "<image>" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise ValueError("prompt_template needs one '<image>' slot and a '{question}' field")
        self.scales = tuple(sorted(int(s) for s in self.scales))
        if self.kind == "query":
            if self.num_queries <= 0:
                raise ValueError("query nesting needs num_queries > 0")
            if not self.scales:
                self.scales = query_scales(self.num_queries)
            if self.scales[0] < 1 or self.scales[-1] > self.num_queries:
                raise ValueError(f"query scales must lie in 1..{self.num_queries}: {self.scales}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NestingConfig:
        return cls(**values)


def query_scales(num_queries: int) -> tuple[int, ...]:
    """Powers of two up to M, plus M itself: MQT's evaluation grid of m values."""
    scales = {1 << i for i in range(int(math.log2(num_queries)) + 1)}
    scales.add(num_queries)
    return tuple(sorted(scales))


def grid_side(config: LlavaConfig) -> int:
    """Side of the projected token grid the vision tower gives for one image."""
    vision = config.vision_config
    if getattr(vision, "model_type", "") == "resnet":
        # embedder: conv stride 2 + max-pool stride 2; then stride 2 per later stage
        stride = 4 * 2 ** (len(vision.hidden_sizes) - 1)
        if vision.downsample_in_first_stage:
            stride *= 2
        return vision.image_size // stride
    return vision.image_size // vision.patch_size


def nesting_of(config: LlavaConfig, nesting: NestingConfig | dict | str | None) -> NestingConfig:
    """The nesting a checkpoint declares, or M3 pooling over its grid for a stock Llava."""
    if isinstance(nesting, NestingConfig):
        return nesting
    stored = getattr(config, "nesting", None)
    if isinstance(nesting, dict):
        return NestingConfig.from_dict(nesting)
    if stored:
        found = NestingConfig.from_dict(dict(stored))
        if nesting is None or nesting == found.kind:
            return found
        raise ValueError(f"checkpoint is nested by {found.kind!r}, not {nesting!r}")
    if nesting not in (None, "pool"):
        raise ValueError(
            "a stock Llava checkpoint has no trained queries; load it with nesting='pool' "
            "or pass a NestingConfig(kind='query', num_queries=...) to add untrained ones"
        )
    return NestingConfig(kind="pool", scales=pool_scales(grid_side(config)))
