"""Router features from what the model has computed anyway: after `encode`, and in a prefill.

Per sample, a float32 vector (names in `feature_names`):
- `v1_*`: the 1-token (or first query) visual embedding: what the image is about, coarsely;
- `q_*`: the mean input embedding of the prompt's text tokens: what is asked (the template's
  tokens are the same in every prompt; the question's vary).

The cost is per-op overhead, not FLOPs, so the code keeps the ops few and their number fixed:
one reduction of the distinct encodings and one weighted `embedding_bag` over every prompt's ids
(those that generate needs anyway: pass `NestedLMM.tokenize`'s `Prompts`). Features that
cost more were measured and dropped: a pass over the pixels (0.9 ms per image with PIL, more
than answering at the smallest scale) and the spread of the tokens at the middle scales (three
poolings of the grid that left the chosen router's cross-validated log-loss unchanged).
`bench/router.py` times the features beside a generate call.

The probe features (names in `probe_feature_names`) are what the model's own prefill at one
scale says about the answer it is about to give: the final-norm hidden state at the last prompt
position (what the LM head reads) and a summary of the first answer token's distribution that
does not depend on the vocabulary (entropy, top probability, top-1 minus top-2 probability, and
the `PROBE_TOP_K` largest log-probabilities, sorted). `NestedLMM.generate(..., probe=True)`
reads them out of its own prefill, so they cost no extra forward. Image-side features (how much
the pooled tokens change from one scale to the next, their variance, per-channel differences)
were measured beside them and dropped: cross-validated log-loss did not improve.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from m3core.lmm import EncodedImages, NestedLMM, Prompts

FEATURES_VERSION = 4
"""Changes whenever what labelling records as features changes (4: probe features at the probe
scales; 3: no token spreads; 2: prompt ids instead of bare question words): label folders
record it, so a resumed labelling run never mixes rows of two feature sets."""
PROBE_TOP_K = 8
"""Sorted first-token log-probabilities in the probe: enough to see a close second or third
answer, few enough to mean the same for any vocabulary."""


def feature_names(lmm: NestedLMM) -> list[str]:
    dim = lmm.model.config.text_config.hidden_size
    return [f"v1_{i}" for i in range(dim)] + [f"q_{i}" for i in range(dim)]


@torch.inference_mode()
def image_features(lmm: NestedLMM, encoded: EncodedImages) -> torch.Tensor:
    """(n, D) first visual token at the smallest scale, per sample."""
    tokens = lmm.model.visual_tokens(encoded.distinct, lmm.scales[0], encoded.sizes)
    first = torch.stack([t[0] for t in tokens]) if lmm.anyres else tokens[:, 0]
    first = first.float()
    return first if encoded.index is None else first[encoded.index.to(first.device)]


@torch.inference_mode()
def question_features(lmm: NestedLMM, prompts: Prompts) -> torch.Tensor:
    """(n, D) mean input embedding of each prompt's text tokens, the image slot left out: one
    weighted `embedding_bag` for the whole batch (the slot weighs 0, a text token 1/count)."""
    weight = lmm.model.get_input_embeddings().weight
    # numpy builds the id tensor from Python ints 4x faster than torch.tensor does
    ids = np.fromiter(chain.from_iterable(prompts.ids), dtype=np.int64)
    lengths = np.fromiter(map(len, prompts.ids), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    text = ids != lmm.image_token_id
    weights = text / np.repeat(np.maximum(np.add.reduceat(text, starts), 1), lengths)
    sums = F.embedding_bag(
        torch.from_numpy(ids).to(weight.device),
        weight,
        torch.from_numpy(starts).to(weight.device),
        mode="sum",
        per_sample_weights=torch.from_numpy(weights).to(weight),
    )
    return sums.float()


def router_features(
    lmm: NestedLMM,
    encoded: EncodedImages,
    questions: Sequence[str] | Prompts,
) -> np.ndarray:
    """(n, F) float32 features; F = len(feature_names(lmm))."""
    if len(encoded) != len(questions):
        raise ValueError(f"got {len(encoded)} encodings for {len(questions)} questions")
    prompts = questions if isinstance(questions, Prompts) else lmm.tokenize(questions)
    features = torch.cat([image_features(lmm, encoded), question_features(lmm, prompts)], 1)
    return features.cpu().numpy()


def probe_feature_names(lmm: NestedLMM) -> list[str]:
    """Names of `probe_vector`'s columns for this model."""
    dim = lmm.model.config.text_config.hidden_size
    summary = ["probe_entropy", "probe_top_prob", "probe_margin"]
    top = [f"probe_logprob_{k + 1}" for k in range(PROBE_TOP_K)]
    return [f"probe_h_{i}" for i in range(dim)] + summary + top


def probe_vector(hidden: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(n, D + 3 + PROBE_TOP_K) float32 probe features from the final-norm hidden state at the
    last prompt position, (n, D), and the first answer token's log-probabilities, (n, V)."""
    logprobs = logprobs.float()
    probs = logprobs.exp()
    entropy = -(probs * torch.where(probs > 0, logprobs, 0.0)).sum(-1)
    k = min(PROBE_TOP_K, logprobs.shape[-1])
    top = logprobs.topk(k, dim=-1).values
    if k < PROBE_TOP_K:  # a vocabulary smaller than K repeats its least likely token
        top = torch.cat([top, top[:, -1:].expand(-1, PROBE_TOP_K - k)], -1)
    top_probs = top[:, :2].exp()
    margin = top_probs[:, 0] - top_probs[:, 1]
    summary = torch.stack([entropy, top_probs[:, 0], margin], -1)
    return torch.cat([hidden.float(), summary, top], -1)
