"""Router features from what the model has computed anyway after `encode`.

Per sample, a float32 vector (names in `feature_names`):
- `spread@s` for every scale s: mean squared distance of the scale's tokens from their mean, an
  image statistic of how much visual detail that scale still holds (grows with small, varied
  content), taken on the encoding instead of the pixels;
- `v1_*`: the 1-token (or first query) visual embedding: what the image is about, coarsely;
- `q_*`: the mean input embedding of the question's words: what is asked.
All of it is a few batched tensor ops on what is already in memory (no pass over the pixels:
that cost 0.9 ms per image with PIL, more than answering at the smallest scale);
`bench/router.py --model` measures the cost against a generate call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from m3core.lmm import EncodedImages, NestedLMM


def feature_names(lmm: NestedLMM) -> list[str]:
    dim = lmm.model.config.text_config.hidden_size
    return (
        [f"spread@{s}" for s in lmm.scales]
        + [f"v1_{i}" for i in range(dim)]
        + [f"q_{i}" for i in range(dim)]
    )


@torch.inference_mode()
def router_features(
    lmm: NestedLMM,
    encoded: EncodedImages,
    questions: Sequence[str],
) -> np.ndarray:
    """(n, F) float32 features; F = len(feature_names(lmm))."""
    if len(encoded) != len(questions):
        raise ValueError(f"got {len(encoded)} encodings for {len(questions)} questions")
    spreads = []
    first = None
    for scale in lmm.scales:
        tokens = lmm.model.visual_tokens(encoded.nested, scale).float()
        if first is None:
            first = tokens[:, 0]
        spreads.append(tokens.pow(2).sum(-1).mean(1) - tokens.mean(1).pow(2).sum(-1))
    word_ids = lmm.tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    width = max(1, max(len(ids) for ids in word_ids))
    padded = torch.zeros((len(word_ids), width), dtype=torch.long)
    mask = torch.zeros((len(word_ids), width, 1))
    for row, ids in enumerate(word_ids):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    words = lmm.model.get_input_embeddings()(padded.to(lmm.device)).float()
    mask = mask.to(lmm.device)
    question_vectors = (words * mask).sum(1) / mask.sum(1).clamp(min=1)
    parts = [torch.stack(spreads, 1), first, question_vectors]
    return torch.cat(parts, 1).cpu().numpy().astype(np.float32)
