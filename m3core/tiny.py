"""Configurations of the tiny default models and the micro models the tests train in seconds.

The vision tower is transformers' ResNet (a convolutional stem: trains far faster than a small
ViT on CPU) kept small next to the LLM, as CLIP is next to the 7B LLM in LLaVA-1.5.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaImageProcessorPil, ResNetConfig

from m3core.config import NestingConfig, query_scales
from m3core.lmm import NestedLMM
from m3core.modeling import NestedLlavaForConditionalGeneration
from m3core.nesting import pool_scales
from m3core.tokenizer import SPECIAL_TOKENS, word_tokenizer

TINY_TEMPLATE = "<image> {question}"


@dataclass
class TinySpec:
    """Sizes of a tiny nested Llava; the defaults are the shipped model's."""

    kind: str = "pool"
    image_size: int = 96
    grid: int = 12
    vision_channels: tuple[int, ...] = (24, 48)
    vision_depths: tuple[int, ...] = (1, 1)
    hidden: int = 192
    layers: int = 2
    heads: int = 4
    intermediate: int = 768
    num_queries: int = 64
    text_tokens: int = 12
    grid_position: bool = True
    prompt_template: str = TINY_TEMPLATE

    def __post_init__(self) -> None:
        stride = 4 * 2 ** (len(self.vision_channels) - 1)
        if self.image_size != self.grid * stride:
            raise ValueError(
                f"a {len(self.vision_channels)}-stage tower has stride {stride}: "
                f"image_size must be {self.grid * stride} for a {self.grid}x{self.grid} grid"
            )


MICRO = TinySpec(
    vision_channels=(8, 16),
    hidden=32,
    layers=1,
    heads=2,
    intermediate=64,
    num_queries=16,
    grid=4,
    image_size=32,
)


def tiny_config(spec: TinySpec, vocab_size: int, image_token_id: int) -> LlavaConfig:
    vision = ResNetConfig(
        num_channels=3,
        embedding_size=spec.vision_channels[0],
        hidden_sizes=list(spec.vision_channels),
        depths=list(spec.vision_depths),
        layer_type="basic",
        downsample_in_first_stage=False,
        hidden_size=spec.vision_channels[-1],
        image_size=spec.image_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.grid**2 + 128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    if spec.kind == "pool":
        nesting = NestingConfig(
            "pool",
            pool_scales(spec.grid),
            prompt_template=spec.prompt_template,
            text_tokens=spec.text_tokens,
            grid_position=spec.grid_position,
        )
    else:
        nesting = NestingConfig(
            "query",
            query_scales(spec.num_queries),
            spec.num_queries,
            prompt_template=spec.prompt_template,
            text_tokens=spec.text_tokens,
            grid_position=spec.grid_position,
        )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=spec.grid**2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        nesting=nesting.to_dict(),
    )


def tiny_lmm(
    words: Iterable[str],
    spec: TinySpec | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> NestedLMM:
    """A randomly initialised tiny nested Llava with a word-level tokenizer over `words`."""
    spec = spec or TinySpec()
    tokenizer = word_tokenizer(words)
    config = tiny_config(spec, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    assert SPECIAL_TOKENS.index("</s>") == config.text_config.eos_token_id
    torch.manual_seed(seed)
    model = NestedLlavaForConditionalGeneration(config).to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaImageProcessorPil(  # LLaVA-1.5's rule: pad to a square, crop nothing
        do_pad=True,
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return NestedLMM(model, tokenizer, processor)
