"""Synthetic routing data where the truth is known: the predictor tests' fixture.

A latent detail level d_i depends on a few features; sample i is solved at scale s iff
d_i + noise_is < t_s, with thresholds t_s growing in log(scale), and any answer may also be
a lucky guess (as in multiple choice). So P(correct at s | x) is learnable, differs across
samples, and is not monotone in scale for every sample (noise and guesses are drawn per
scale), as in real Matryoshka labels where the oracle beats the largest scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticRouting", "make_synthetic"]


@dataclass
class SyntheticRouting:
    """Arrays in the labelling layout; `p_true` is the exact P(correct at s | x)."""

    X: np.ndarray
    correct: np.ndarray
    confidence: np.ndarray
    scales: tuple[int, ...]
    costs: dict
    p_true: np.ndarray
    difficulty: np.ndarray


def make_synthetic(
    n: int = 2000,
    n_features: int = 32,
    scales: Sequence[int] = (1, 9, 36, 144),
    n_informative: int = 4,
    noise: float = 0.3,
    hopeless: float = 0.1,
    guess: float = 0.15,
    seed: int = 0,
) -> SyntheticRouting:
    """`hopeless` is the share of samples wrong at every scale (M3 counts them at scale 0)."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    scales = tuple(int(s) for s in scales)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    w = np.linspace(1.0, 0.4, n_informative)
    w /= np.linalg.norm(w)
    mean_d = X[:, :n_informative].astype(np.float64) @ w
    latent = rng.normal(scale=0.3, size=n)
    d = mean_d + latent
    logs = np.log(np.asarray(scales, dtype=np.float64))
    t = -1.0 + 2.5 * logs / logs[-1]
    eps = rng.normal(scale=noise, size=(n, len(scales)))
    lost = rng.random(n) < hopeless
    lucky = rng.random((n, len(scales))) < guess
    correct = ((d[:, None] + eps < t[None, :]) & ~lost[:, None]) | lucky
    sd = np.sqrt(0.3**2 + noise**2)
    solved = norm.cdf((t[None, :] - mean_d[:, None]) / sd) * (1 - hopeless)
    p_true = 1 - (1 - solved) * (1 - guess)
    margin = t[None, :] - d[:, None] - eps
    confidence = -np.logaddexp(0.0, -2.0 * margin + rng.normal(scale=0.7, size=margin.shape))
    tokens = np.asarray(scales, dtype=np.float64)
    costs = {
        "tokens": tokens,
        "flops": 2.0e9 + 1.2e7 * tokens,
        "latency": (11.0 + 0.04 * tokens)[None, :] * rng.uniform(0.9, 1.1, size=(n, 1)),
    }
    return SyntheticRouting(X, correct, confidence, scales, costs, p_true, d)
