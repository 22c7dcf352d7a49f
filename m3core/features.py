"""Router features from what the model has computed anyway after `encode`, plus image statistics.

Per sample, a float32 vector (names in `feature_names`):
- `spread@s` for every scale s: mean squared distance of the scale's tokens from their mean, a
  measure of how much visual detail that scale still holds (grows with small, varied content);
- `v1_*`: the 1-token (or first query) visual embedding: what the image is about, coarsely;
- `q_*`: the mean input embedding of the question's words: what is asked;
- `img_*`: cheap pixel statistics (edge energy, colour spread) of the image at 64 px.
All of it is a few pooling ops on tensors already in memory; `bench/router.py` measures the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from m3core.lmm import EncodedImages, NestedLMM

IMAGE_STATS = ("edge_mean", "edge_std", "colour_std", "luma_std")


def feature_names(lmm: NestedLMM) -> list[str]:
    dim = lmm.model.config.text_config.hidden_size
    return (
        [f"spread@{s}" for s in lmm.scales]
        + [f"v1_{i}" for i in range(dim)]
        + [f"q_{i}" for i in range(dim)]
        + [f"img_{name}" for name in IMAGE_STATS]
    )


def image_stats(images: Sequence[Image.Image], side: int = 64) -> np.ndarray:
    rows = []
    for image in images:
        pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255
        luma = pixels.mean(-1)
        edges = np.abs(np.diff(luma, axis=0))[:, :-1] + np.abs(np.diff(luma, axis=1))[:-1]
        rows.append([edges.mean(), edges.std(), pixels.std(axis=(0, 1)).mean(), luma.std()])
    return np.asarray(rows, dtype=np.float32)


@torch.inference_mode()
def router_features(
    lmm: NestedLMM,
    encoded: EncodedImages,
    questions: Sequence[str],
    images: Sequence[Image.Image],
) -> np.ndarray:
    """(n, F) float32 features; F = len(feature_names(lmm))."""
    if not (len(encoded) == len(questions) == len(images)):
        raise ValueError(
            f"got {len(encoded)} encodings, {len(questions)} questions, {len(images)} images"
        )
    spreads = []
    first = None
    for scale in lmm.scales:
        tokens = lmm.model.visual_tokens(encoded.nested, scale).float()
        if first is None:
            first = tokens[:, 0]
        centred = tokens - tokens.mean(1, keepdim=True)
        spreads.append(centred.pow(2).sum(-1).mean(1))
    embed = lmm.model.get_input_embeddings()
    word_ids = lmm.tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    question_vectors = torch.stack(
        [
            embed(torch.tensor(ids or [lmm.tokenizer.unk_token_id], device=lmm.device))
            .float()
            .mean(0)
            for ids in word_ids
        ]
    )
    parts = [torch.stack(spreads, 1), first, question_vectors]
    model_part = torch.cat(parts, 1).cpu().numpy()
    return np.concatenate([model_part, image_stats(images)], axis=1).astype(np.float32)
