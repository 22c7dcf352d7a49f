"""Router features from what the model has computed anyway after `encode`.

Per sample, a float32 vector (names in `feature_names`):
- `spread@s` for the scales between 1 token and the largest (`spread_scales`): mean squared
  distance of the scale's tokens from their mean, an image statistic of how much visual detail
  that scale still holds (grows with small, varied content), taken on the encoding instead of
  the pixels;
- `v1_*`: the 1-token (or first query) visual embedding: what the image is about, coarsely;
- `q_*`: the mean input embedding of the prompt's text tokens: what is asked (the template's
  tokens are the same in every prompt; the question's vary).

The cost is memory passes and per-op overhead, not FLOPs, so the code keeps both few: image
features are computed once per distinct image and question features once per distinct
question (a benchmark asks several questions per image, and the same question of many), from
the prompt ids that generate needs anyway (pass `NestedLMM.tokenize`'s `Prompts`; tokenizing
cost more than all the rest); each scale is pooled from the next finer one where its side
divides (one pass over the grid in all), squared norms are one reduction per scale, and the
question vectors are one `embedding_bag`. No pass over the pixels: that cost 0.9 ms per image
with PIL, more than answering at the smallest scale. `bench/router.py` times it beside a
generate call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m3core.lmm import EncodedImages, NestedLMM, Prompts

FEATURES_VERSION = 2
"""Changes whenever what `router_features` computes changes (2: no spread at 1 token or the
largest scale, prompt ids instead of bare question words): label folders record it, so a
resumed labelling run never mixes rows of two feature sets."""


def feature_names(lmm: NestedLMM) -> list[str]:
    dim = lmm.model.config.text_config.hidden_size
    return (
        [f"spread@{s}" for s in spread_scales(lmm)]
        + [f"v1_{i}" for i in range(dim)]
        + [f"q_{i}" for i in range(dim)]
    )


def spread_scales(lmm: NestedLMM) -> list[int]:
    """Every scale but 1 token (no spread) and the largest (a second pass over the whole grid
    that left the quickstart router's cross-validated log-loss unchanged: 0.4524 vs 0.4526)."""
    return [s for s in lmm.scales[:-1] if s > 1]


@torch.inference_mode()
def image_features(lmm: NestedLMM, nested: torch.Tensor) -> torch.Tensor:
    """(N, len(spread_scales) + D) spreads and first smallest-scale token of N encodings."""
    squares, means = {}, {}
    wanted = spread_scales(lmm)
    tokens = nested
    for scale in sorted(lmm.scales, reverse=True):
        chained = math.isqrt(tokens.shape[1]) % math.isqrt(scale) == 0  # else from the grid
        tokens = lmm.model.visual_tokens(tokens if chained else nested, scale)
        values = tokens.float()
        if scale in wanted:
            squares[scale] = torch.linalg.vector_norm(values, dim=(1, 2)).square() / scale
            if lmm.nesting.kind != "pool":
                means[scale] = values.mean(1)
    first = values[:, 0]  # the loop ends at the smallest scale
    # Equal-block average pooling keeps the grid's mean, so every pooled scale shares the
    # smallest one's: one pass over the grid fewer.
    centre = values.mean(1)
    spreads = [squares[s] - means.get(s, centre).square().sum(-1) for s in wanted]
    return torch.cat([torch.stack(spreads, 1), first], 1) if spreads else first


@torch.inference_mode()
def question_features(lmm: NestedLMM, prompts: Prompts) -> torch.Tensor:
    """(Q, D) mean input embedding of each prompt's text tokens (the image slot left out)."""
    words = [[i for i in ids if i != lmm.image_token_id] for ids in prompts.ids]
    offsets = torch.tensor([0, *(len(ids) for ids in words[:-1])]).cumsum(0)
    return F.embedding_bag(
        torch.tensor([i for ids in words for i in ids], dtype=torch.long, device=lmm.device),
        lmm.model.get_input_embeddings().weight,
        offsets.to(lmm.device),
        mode="mean",
    ).float()


def router_features(
    lmm: NestedLMM,
    encoded: EncodedImages,
    questions: Sequence[str] | Prompts,
) -> np.ndarray:
    """(n, F) float32 features; F = len(feature_names(lmm))."""
    if len(encoded) != len(questions):
        raise ValueError(f"got {len(encoded)} encodings for {len(questions)} questions")
    prompts = questions if isinstance(questions, Prompts) else lmm.tokenize(questions)
    first: dict[str, int] = {}
    for row, question in enumerate(prompts.questions):
        first.setdefault(question, row)
    slot = {question: k for k, question in enumerate(first)}
    question_rows = torch.tensor([slot[q] for q in prompts.questions])
    distinct, image_rows = encoded.images()
    images = image_features(lmm, distinct).cpu()[image_rows]
    words = question_features(lmm, prompts.select(list(first.values()))).cpu()[question_rows]
    return torch.cat([images, words], 1).numpy()
