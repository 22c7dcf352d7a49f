"""The nested-token Llava and LlavaNext: transformers' classes plus a nesting module.

A pooled (M3) checkpoint is a stock Llava / LlavaNext checkpoint with a `nesting` entry in its
config; a query checkpoint adds the `model.nesting.*` weights (a query block after the
projector, or MQT-LLaVA's Resampler in place of it). Image features are computed once per
image (`encode_images`), nested to a scale (`visual_tokens`), and handed to the stock
forward/generate through `mm_encoder_outputs`, so the LLM, the KV cache and generation are
transformers' own.

The stock path honours the nesting too: `generate(input_ids=..., pixel_values=..., scale=...)`
(or `get_image_features(pixel_values, scale=...)`) gives the visual tokens `NestedLMM` gives at
that scale; without `scale` the scale is read off the number of image tokens in the prompt.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel

from m3core.anyres import anyres_tokens, crop_layout, merge_crops, num_crops
from m3core.config import (
    QUERY_BLOCK,
    RESAMPLER,
    NestingConfig,
    feature_width,
    grid_side,
    nesting_of,
)
from m3core.nesting import QueryBlock, Resampler, pool_grid, sinusoid_2d


class _NestedVision:
    """The image side of the inner model: vision tower -> projector -> nesting -> tokens."""

    config: LlavaConfig | LlavaNextConfig
    nesting: nn.Module | None
    grid_position: nn.Parameter | None

    def attach_nesting(self, nesting: nn.Module | None, grid_position: nn.Parameter | None) -> None:
        """Add the modules `build_nesting` made (a resampler replaces the projector)."""
        if isinstance(nesting, Resampler):
            self.multi_modal_projector = None
        self.nesting = nesting
        self.grid_position = grid_position

    @property
    def nesting_config(self) -> NestingConfig:
        return nesting_of(self.config, None)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower: (N, 3, H, W) -> the (N, G*G, C) features the projector sees.

        Follows Llava's feature selection (layer index or list, CLS dropped for the "default"
        strategy); a convolutional tower's (N, C, h, w) map is flattened row-major.
        """
        tower = self.vision_tower
        out = tower(pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        selected = []
        for index in [layer] if isinstance(layer, int) else layer:
            hidden = out.hidden_states[index]
            if hidden.dim() == 4:
                hidden = hidden.flatten(2).transpose(1, 2)
            elif self.config.vision_feature_select_strategy == "default":
                hidden = hidden[:, 1:]
            selected.append(hidden)
        return torch.cat(selected, dim=-1)

    def image_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> the grid the nesting reads: projected (+ grid position), or the
        tower's features where a resampler replaces the projector."""
        features = self.vision_features(pixel_values)
        if self.multi_modal_projector is None:
            return features
        grid = self.multi_modal_projector(features)
        return grid if self.grid_position is None else grid + self.grid_position.to(grid.dtype)

    def nest(self, grid: torch.Tensor) -> torch.Tensor:
        """What `encode` keeps per image: the grid (pool) or all M query outputs (queries)."""
        return grid if self.nesting is None else self.nesting(grid)

    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Everything any scale needs, once per image: (N, L, D)."""
        return self.nest(self.image_grid(pixel_values))

    def visual_tokens(
        self, nested: torch.Tensor, scale: int, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """(N, L, D) output of `encode_images` -> (N, scale, D) visual tokens."""
        if self.nesting is None:
            return pool_grid(nested, scale)
        return nested[:, :scale]

    def token_count(self, scale: int, image_size=None) -> int:
        """Visual tokens one image gets at `scale`."""
        return scale

    def _checked_scale(
        self, scale: int | None, input_ids: torch.Tensor | None, image_sizes, images: int
    ) -> int:
        """`scale`, or the one scale whose visual tokens fill the prompts' image slots."""
        scales = self.nesting_config.scales
        sizes = image_sizes if image_sizes is not None else [None] * images

        def wanted(s: int) -> int:
            return sum(self.token_count(s, size) for size in sizes)

        count = None
        if input_ids is not None:
            count = int((input_ids == self.config.image_token_id).sum())
        if scale is None:
            if count is None:
                raise ValueError(f"pass scale= (one of {list(scales)}) with inputs_embeds")
            fits = [s for s in scales if wanted(s) == count]
            if len(fits) != 1:
                raise ValueError(
                    f"the prompts hold {count} image tokens for {images} images, which matches "
                    f"no single scale of {list(scales)}; expand each <image> to the scale's "
                    "visual tokens or pass scale="
                )
            return fits[0]
        if scale not in scales:
            raise ValueError(f"scale {scale} is not one of this model's scales {list(scales)}")
        if count is not None and count != wanted(scale):
            raise ValueError(
                f"scale {scale} gives {wanted(scale)} visual tokens for {images} images but the "
                f"prompts hold {count} image tokens; expand each <image> to its count"
            )
        return int(scale)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        scale: int | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The nested visual tokens at `scale` (default: the largest), one tensor per image;
        `generate(pixel_values=..., scale=...)` encodes its images here."""
        scale = self._checked_scale(
            scale or self.nesting_config.scales[-1], None, image_sizes, len(pixel_values)
        )
        nested = self.encode_images(pixel_values, image_sizes)
        return BaseModelOutputWithPooling(
            pooler_output=list(self.visual_tokens(nested, scale, image_sizes))
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *args,
        scale: int | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        if args:
            raise TypeError("pass the inputs other than input_ids and pixel_values by name")
        if pixel_values is not None:
            if mm_encoder_outputs is not None:
                raise ValueError("pass pixel_values or mm_encoder_outputs, not both")
            scale = self._checked_scale(scale, input_ids, image_sizes, len(pixel_values))
            nested = self.encode_images(pixel_values, image_sizes)
            mm_encoder_outputs = encoder_outputs(
                list(self.visual_tokens(nested, scale, image_sizes))
            )
        elif mm_encoder_outputs and input_ids is not None:
            # generate() encodes pixel_values through get_image_features before the prompt is
            # seen: at the largest scale unless it was given scale=
            rows = sum(len(t) for t in mm_encoder_outputs["image"].pooler_output)
            slots = int((input_ids == self.config.image_token_id).sum())
            if rows != slots:
                raise ValueError(
                    f"the prompts hold {slots} image tokens but the images gave {rows} visual "
                    "tokens: pass scale= (to generate as well) for the scale <image> was "
                    "expanded to"
                )
        return super().forward(
            input_ids=input_ids,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


def build_nesting(config) -> tuple[nn.Module | None, nn.Parameter | None]:
    """The nesting module and the grid position embedding the config asks for."""
    spec = nesting_of(config, None)
    dim = config.text_config.hidden_size
    side = grid_side(config)
    nesting = None
    if spec.kind == QUERY_BLOCK:
        nesting = QueryBlock(dim, spec.num_queries, spec.num_heads)
    elif spec.kind == RESAMPLER:
        width = feature_width(config)
        nesting = Resampler(width, dim, spec.num_queries, spec.num_heads, side)
    position = nn.Parameter(sinusoid_2d(side, dim)) if spec.grid_position else None
    return nesting, position


class NestedLlavaModel(_NestedVision, LlavaModel):
    pass


class NestedLlavaNextModel(_NestedVision, LlavaNextModel):
    """LLaVA-NeXT with M3's rule: every crop is pooled to the scale before the anyres merge."""

    def crops_of(self, image_size) -> tuple[int, int]:
        crop = self.config.vision_config.image_size
        return crop_layout(image_size, self.config.image_grid_pinpoints, crop)

    def token_count(self, scale: int, image_size=None) -> int:
        if image_size is None:
            raise ValueError("an anyres model needs image_sizes to count its visual tokens")
        crop = self.config.vision_config.image_size
        return anyres_tokens(scale, image_size, self.config.image_grid_pinpoints, crop)

    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C, 3, H, W) crops (zero-padded to C) -> (N, C, G*G, D); unused crops stay 0."""
        if image_sizes is None or pixel_values.dim() != 5:
            raise ValueError("an anyres model takes (N, crops, 3, H, W) pixels and image_sizes")
        crop = self.config.vision_config.image_size
        pinpoints = self.config.image_grid_pinpoints
        counts = [num_crops(size.tolist(), pinpoints, crop) for size in image_sizes]
        if max(counts) > pixel_values.shape[1]:
            raise ValueError(f"image_sizes ask for {max(counts)} crops; pixels hold fewer")
        used = torch.cat(
            [pixels[:count] for pixels, count in zip(pixel_values, counts, strict=True)]
        )
        grids = self.image_grid(used).split(counts)
        out = grids[0].new_zeros(len(counts), pixel_values.shape[1], *grids[0].shape[1:])
        for row, grid in enumerate(grids):
            out[row, : len(grid)] = grid
        return out

    def visual_tokens(
        self, nested: torch.Tensor, scale: int, image_sizes: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """(N, C, G*G, D) crops -> one (T_i, D) tensor per image, T_i set by its crop layout."""
        if image_sizes is None:
            raise ValueError("an anyres model needs image_sizes to merge its crops")
        n, crops, length, dim = nested.shape
        pooled = pool_grid(nested.reshape(n * crops, length, dim), scale)
        pooled = pooled.reshape(n, crops, scale, dim)
        tokens = []
        for row, size in enumerate(image_sizes):
            rows, cols = self.crops_of(size.tolist())
            tokens.append(merge_crops(pooled[row], rows, cols, size.tolist(), self.image_newline))
        return tokens


class _NestedOuter:
    """What the conditional-generation classes add: the inner model's nesting, exposed."""

    model: NestedLlavaModel | NestedLlavaNextModel

    def _build(self, config, inner: type) -> None:
        """The stock layout (inner model + LM head), then the nesting moved inside the inner
        model, initialised here so fresh models keep the random draws they have always had."""
        self.model = inner(config)
        self.lm_head = nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.post_init()
        nesting, position = build_nesting(config)
        if nesting is not None:
            self.add_module("nesting", nesting)
            self.post_init()
        self._modules.pop("nesting", None)
        self.model.attach_nesting(nesting, position)

    @property
    def nesting(self) -> nn.Module | None:
        return self.model.nesting

    @property
    def grid_position(self) -> nn.Parameter | None:
        return self.model.grid_position

    @property
    def nesting_config(self) -> NestingConfig:
        return self.model.nesting_config

    @property
    def anyres(self) -> bool:
        return isinstance(self.model, NestedLlavaNextModel)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_features(pixel_values)

    def image_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_grid(pixel_values)

    def nest(self, grid: torch.Tensor) -> torch.Tensor:
        return self.model.nest(grid)

    def encode_images(self, pixel_values, image_sizes=None) -> torch.Tensor:
        return self.model.encode_images(pixel_values, image_sizes)

    def visual_tokens(self, nested, scale: int, image_sizes=None):
        return self.model.visual_tokens(nested, scale, image_sizes)

    def token_count(self, scale: int, image_size=None) -> int:
        return self.model.token_count(scale, image_size)

    def get_image_features(self, pixel_values, scale=None, image_sizes=None, **kwargs):
        return self.model.get_image_features(pixel_values, scale=scale, image_sizes=image_sizes)


def forward_with_scale(stock_forward):
    """The stock forward with a keyword `scale` in its signature, so that `generate` passes
    `scale=` through to the inner model (it refuses keywords a forward does not name)."""

    def forward(self, *args, scale: int | None = None, **kwargs):
        return stock_forward(self, *args, scale=scale, **kwargs)

    signature = inspect.signature(stock_forward)
    params = list(signature.parameters.values())
    scale = inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = signature.replace(parameters=[*params[:-1], scale, params[-1]])
    forward.__doc__ = "The stock forward; `scale` picks the nesting scale of pixel_values."
    return forward


class NestedLlavaForConditionalGeneration(_NestedOuter, LlavaForConditionalGeneration):
    def __init__(self, config: LlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self._build(config, NestedLlavaModel)

    forward = forward_with_scale(LlavaForConditionalGeneration.forward)


class NestedLlavaNextForConditionalGeneration(_NestedOuter, LlavaNextForConditionalGeneration):
    def __init__(self, config: LlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self._build(config, NestedLlavaNextModel)

    forward = forward_with_scale(LlavaNextForConditionalGeneration.forward)


NESTED_CLASSES = {
    "llava": NestedLlavaForConditionalGeneration,
    "llava_next": NestedLlavaNextForConditionalGeneration,
}
"""model_type -> the nested class that loads it."""


def encoder_outputs(tokens: list[torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
    """Per-image visual tokens in the form Llava's forward and generate accept."""
    return {"image": BaseModelOutputWithPooling(pooler_output=tokens)}
