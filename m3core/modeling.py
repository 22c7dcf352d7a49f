"""The nested-token Llava: transformers' LlavaForConditionalGeneration plus a nesting module.

A pooled (M3) checkpoint is a stock Llava checkpoint with a `nesting` entry in its config; a query
(MQT) checkpoint adds the `nesting.*` weights of the latent queries. Image features are computed
here once per image (`image_grid`), nested to a scale (`visual_tokens`), and handed to the stock
forward/generate through `mm_encoder_outputs`, so the LLM, the KV cache and generation are
transformers' own.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from m3core.config import NestingConfig, grid_side, nesting_of
from m3core.nesting import QueryNesting, pool_grid, sinusoid_2d


class NestedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        spec = nesting_of(config, None)
        self.nesting = (
            QueryNesting(config.text_config.hidden_size, spec.num_queries, spec.num_heads)
            if spec.kind == "query"
            else None
        )
        self.grid_position = None
        if spec.grid_position:
            side, dim = grid_side(config), config.text_config.hidden_size
            self.grid_position = torch.nn.Parameter(sinusoid_2d(side, dim))
        self.post_init()

    @property
    def nesting_config(self) -> NestingConfig:
        return nesting_of(self.config, None)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower: (N, 3, H, W) -> the (N, G*G, C) features the projector sees.

        Follows Llava's feature selection (layer index or list, CLS dropped for the "default"
        strategy); a convolutional tower's (N, C, h, w) map is flattened row-major.
        """
        tower = self.model.vision_tower
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
        """Vision tower + projector: (N, 3, H, W) -> the projected grid (N, G*G, D_llm)."""
        grid = self.model.multi_modal_projector(self.vision_features(pixel_values))
        return grid if self.grid_position is None else grid + self.grid_position.to(grid.dtype)

    def nest(self, grid: torch.Tensor) -> torch.Tensor:
        """What `encode` keeps per image: the grid (pool) or all M query outputs (query)."""
        return grid if self.nesting is None else self.nesting(grid)

    def visual_tokens(self, nested: torch.Tensor, scale: int) -> torch.Tensor:
        """(N, L, D) output of `nest` -> (N, scale, D) visual tokens."""
        if self.nesting is None:
            return pool_grid(nested, scale)
        return nested[:, :scale]


def encoder_outputs(tokens: list[torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
    """Per-image visual tokens in the form Llava's forward and generate accept."""
    return {"image": BaseModelOutputWithPooling(pooler_output=tokens)}
