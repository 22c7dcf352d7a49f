"""Analytic prefill FLOPs of the nesting and the LLM at a scale (2 FLOPs per multiply-add).

Attention scores and values are counted over the whole T x T matrix, as dense kernels compute
them; the LM head is counted once, for the last prompt position that `generate` keeps.
"""

from __future__ import annotations

from m3core.config import POOL, RESAMPLER, NestingConfig, feature_width, grid_side


def llm_prefill_flops(text_config, tokens: int) -> float:
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    ff = text_config.intermediate_size
    per_layer = (
        2 * tokens * d * head_dim * (heads + 2 * kv_heads)  # q, k, v
        + 2 * tokens * heads * head_dim * d  # o
        + 2 * 2 * tokens * tokens * heads * head_dim  # scores, values
        + 2 * tokens * 3 * d * ff  # gated MLP: gate, up, down
    )
    return float(text_config.num_hidden_layers * per_layer + 2 * d * text_config.vocab_size)


def nesting_flops(config, nesting: NestingConfig, scale: int) -> float:
    """Per image (per crop for anyres): pooling is one add per grid value; a query block is a
    transformer block for `scale` queries over the projected grid; a resampler's attention for
    `scale` queries over the tower's grid plus its output map (it replaces the projector)."""
    d = config.text_config.hidden_size
    grid = grid_side(config) ** 2
    if nesting.kind == POOL:
        return float(grid * d)
    if nesting.kind == RESAMPLER:
        c = feature_width(config)
        return float(
            2 * scale * c * c  # q
            + 2 * 2 * grid * c * c  # k, v
            + 2 * 2 * scale * grid * c  # scores, values
            + 2 * scale * c * c  # out
            + 2 * scale * c * d  # proj
        )
    return float(
        2 * scale * d * d  # q
        + 2 * 2 * grid * d * d  # k, v
        + 2 * 2 * scale * grid * d  # scores, values
        + 2 * scale * d * d  # out
        + 2 * 2 * scale * d * 4 * d  # MLP
    )


def prefill_flops(
    config,
    scale: int,
    text_tokens: int,
    nesting: NestingConfig,
    visual_tokens: int | None = None,
    crops: int = 1,
) -> float:
    """Nesting + LLM prefill FLOPs for a prompt of `text_tokens` words and the visual tokens
    of one image at `scale` (`visual_tokens`, default `scale`; an anyres image's crop layout
    gives more, and its `crops` are each nested)."""
    if scale < 1 or text_tokens < 0:
        raise ValueError(f"scale must be >= 1 and text_tokens >= 0, got {scale}, {text_tokens}")
    tokens = scale if visual_tokens is None else visual_tokens
    return crops * nesting_flops(config, nesting, scale) + llm_prefill_flops(
        config.text_config, text_tokens + tokens
    )
