"""Nesting settings, stored inside the Llava config so a checkpoint folder stays transformers'."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from transformers import PretrainedConfig

from m3core.nesting import pool_scales

STOCK_LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

POOL, QUERY_BLOCK, RESAMPLER = "pool", "query-block", "resampler"
KINDS = (POOL, QUERY_BLOCK, RESAMPLER)
KIND_ALIASES = {"query": QUERY_BLOCK}
"""Older configs name the query block `query`; they still load."""


@dataclass
class NestingConfig:
    """How visual tokens nest, and at which scales.

    - `pool` (M3): average-pool the projected grid; a scale is a token count per grid (per
      crop for an anyres LLaVA-NeXT model).
    - `query-block`: M learned queries cross-attend to the projected grid in one transformer
      block after the projector (the tiny MQT model); a scale m keeps the first m outputs.
    - `resampler` (MQT-LLaVA): M learned queries read the vision tower's features in place of
      the projector; a scale m keeps the first m outputs.

    `prompt_template` holds one `<image>` slot that is filled with the visual tokens;
    `text_tokens` is the typical prompt length (without image tokens) used by the cost model.
    `grid_position` adds a learned 2-D position embedding to the projected grid before nesting:
    a CLIP tower's features carry their position, a convolutional tower's do not.
    """

    kind: str = POOL
    scales: tuple[int, ...] = ()
    num_queries: int = 0
    num_heads: int = 4
    prompt_template: str = STOCK_LLAVA_TEMPLATE
    text_tokens: int = 40
    grid_position: bool = False

    def __post_init__(self) -> None:
        self.kind = KIND_ALIASES.get(self.kind, self.kind)
        if self.kind not in KINDS:
            raise ValueError(f"nesting kind must be one of {list(KINDS)}, got {self.kind!r}")
        if "<image>" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise ValueError("prompt_template needs one '<image>' slot and a '{question}' field")
        self.scales = tuple(sorted(int(s) for s in self.scales))
        if self.queries:
            if self.num_queries <= 0:
                raise ValueError(f"{self.kind} nesting needs num_queries > 0")
            if not self.scales:
                self.scales = query_scales(self.num_queries)
            if self.scales[0] < 1 or self.scales[-1] > self.num_queries:
                raise ValueError(f"query scales must lie in 1..{self.num_queries}: {self.scales}")
        if self.kind == RESAMPLER:
            if math.isqrt(self.num_queries) ** 2 != self.num_queries:
                raise ValueError(f"a resampler's queries sit on a square grid: {self.num_queries}")
            if self.grid_position:
                raise ValueError("a resampler carries its own position embedding")

    @property
    def queries(self) -> bool:
        """True for the kinds that keep the first m of M learned queries."""
        return self.kind != POOL

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NestingConfig:
        values = dict(values)
        if values.get("extra") == {}:
            del values["extra"]  # an empty field the first shipped configs carry
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown nesting fields {sorted(unknown)}")
        return cls(**values)


def query_scales(num_queries: int) -> tuple[int, ...]:
    """Powers of two up to M, plus M itself: MQT's evaluation grid of m values."""
    scales = {1 << i for i in range(int(math.log2(num_queries)) + 1)}
    scales.add(num_queries)
    return tuple(sorted(scales))


def grid_side(config: PretrainedConfig) -> int:
    """Side of the token grid the vision tower gives for one image (one crop for anyres)."""
    vision = config.vision_config
    if getattr(vision, "model_type", "") == "resnet":
        # embedder: conv stride 2 + max-pool stride 2; then stride 2 per later stage
        stride = 4 * 2 ** (len(vision.hidden_sizes) - 1)
        if vision.downsample_in_first_stage:
            stride *= 2
        return vision.image_size // stride
    return vision.image_size // vision.patch_size


def feature_width(config: PretrainedConfig) -> int:
    """Width of the tower features the projector (or a resampler) reads."""
    layer = config.vision_feature_layer
    return config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))


def is_anyres(config: PretrainedConfig) -> bool:
    """LLaVA-NeXT: an image is tiled into crops that are merged with `image_newline` tokens."""
    return config.model_type == "llava_next"


def nesting_of(
    config: PretrainedConfig, nesting: NestingConfig | dict | str | None
) -> NestingConfig:
    """The nesting a checkpoint declares, or M3 pooling over its grid for a stock checkpoint.

    A string names the kind the caller expects (`query` matches either query kind).
    """
    if isinstance(nesting, NestingConfig):
        found = nesting
    elif isinstance(nesting, dict):
        found = NestingConfig.from_dict(nesting)
    elif stored := getattr(config, "nesting", None):
        found = NestingConfig.from_dict(dict(stored))
        expected = nesting in (None, found.kind) or (nesting == "query" and found.queries)
        if not expected:
            raise ValueError(f"checkpoint is nested by {found.kind!r}, not {nesting!r}")
    elif nesting not in (None, POOL):
        raise ValueError(
            "a stock Llava checkpoint has no trained queries; load it with nesting='pool'"
        )
    else:
        found = NestingConfig(kind=POOL, scales=pool_scales(grid_side(config)))
    if is_anyres(config) and found.kind != POOL:
        raise ValueError(f"an anyres (LLaVA-NeXT) model nests by pooling, not {found.kind!r}")
    return found
