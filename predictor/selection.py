"""Model choice and hyper-parameters by cross-validation (mean log-loss over scales)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss
from sklearn.model_selection import GroupKFold, KFold

from predictor.features import validate_correct, validate_features, validate_scales
from predictor.routers.scale_router import ScaleRouter

__all__ = ["DEFAULT_CANDIDATES", "select_router", "scale_scores"]

DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"estimator": "logreg", "C": 0.01},
    {"estimator": "logreg", "C": 0.1},
    {"estimator": "mlp", "hidden": (64,), "epochs": 15, "weight_decay": 1e-2, "dropout": 0.3},
    {
        "estimator": "lightgbm",
        "n_estimators": 100,
        "num_leaves": 4,
        "learning_rate": 0.05,
        "colsample_bytree": 0.3,
        "min_child_samples": 50,
    },
    {
        "estimator": "lightgbm",
        "n_estimators": 100,
        "num_leaves": 7,
        "learning_rate": 0.05,
        "colsample_bytree": 0.3,
    },
)
"""One small grid over the estimator families, kept from a wider one on the quickstart's labels
(600 and 2,400 calib questions): feature subsampling (`colsample_bytree`) gave LightGBM the
same loss at a third of the time; deeper or more trees, weaker regularisation and a 60-epoch
MLP lost at both sizes. Listed from cheapest to serve to dearest (ONNX, 2,400 rows of 387
features on one core, `bench/router.py`: logreg 2 ms, MLP 5 ms, LightGBM 57 ms), the order
`select_router`'s one-standard-error rule reads."""


def scale_scores(correct: np.ndarray, P: np.ndarray) -> dict:
    """Per-scale and mean log-loss and Brier score of probabilities P against labels."""
    P = np.clip(np.asarray(P, dtype=np.float64), 1e-7, 1 - 1e-7)
    ll = [log_loss(correct[:, s], P[:, s], labels=[False, True]) for s in range(P.shape[1])]
    br = [brier_score_loss(correct[:, s], P[:, s], pos_label=True) for s in range(P.shape[1])]
    return {
        "log_loss": float(np.mean(ll)),
        "brier": float(np.mean(br)),
        "per_scale_log_loss": [float(v) for v in ll],
        "per_scale_brier": [float(v) for v in br],
    }


def select_router(
    X: np.ndarray,
    correct: np.ndarray,
    scales: Sequence[int],
    candidates: Sequence[Mapping[str, object]] | None = None,
    cv: int = 5,
    groups: np.ndarray | None = None,
    seed: int = 0,
    feature_names: Sequence[str] | None = None,
    one_standard_error: bool = True,
) -> tuple[ScaleRouter, dict]:
    """Cross-validate each candidate (ScaleRouter keyword dicts), refit the chosen on all rows.

    Score: out-of-fold mean over scales of log-loss (lower is better), because every policy
    reads the probabilities themselves, not only their ranking. With `one_standard_error`
    the choice is the first candidate (list them cheapest first) whose mean fold loss is
    within one standard error of the lowest (the 1-SE rule of Hastie et al.): routing runs on
    every request, and on the quickstart's labels a 100-tree LightGBM beat logistic
    regression by less than the folds disagree while costing 28x its serving time.
    `groups` (e.g. image ids) keeps all questions about one image in one fold (GroupKFold),
    else shuffled KFold.
    The refitted router carries `oof_proba_`, the winner's out-of-fold probabilities: scores
    on rows its fold-model never saw, fine for budget targets and curves on the same split.
    The accuracy-loss guarantee strictly needs scores from a router fitted on other data
    (out-of-fold scores share training rows across folds). The report is JSON-serialisable.
    """
    scales = validate_scales(scales)
    X = validate_features(X)
    correct = validate_correct(correct, n_scales=len(scales), n=X.shape[0])
    cands = [dict(c) for c in (candidates or DEFAULT_CANDIDATES)]
    if not cands:
        raise ValueError("select_router needs at least one candidate")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (X.shape[0],):
            raise ValueError(f"groups must have shape ({X.shape[0]},), got {groups.shape}")
        splitter = GroupKFold(n_splits=cv, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=cv, shuffle=True, random_state=seed)
    folds = list(splitter.split(X, correct, groups))
    results, oof_all = [], []
    for params in cands:
        ScaleRouter(**params)  # fail fast on a bad candidate, before any fitting
        oof = np.zeros(correct.shape)
        fold_losses = []
        t0 = time.perf_counter()
        for train, test in folds:
            r = ScaleRouter(**params).fit(X[train], correct[train], scales, feature_names)
            oof[test] = r.predict_proba(X[test])
            fold_losses.append(scale_scores(correct[test], oof[test])["log_loss"])
        entry = {"params": _jsonable_params(params), **scale_scores(correct, oof)}
        entry["fold_log_loss_mean"] = float(np.mean(fold_losses))
        entry["fold_log_loss_se"] = float(np.std(fold_losses, ddof=1) / np.sqrt(len(folds)))
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
        oof_all.append(oof)
    means = [r["fold_log_loss_mean"] for r in results]
    lowest = int(np.argmin(means))
    best = lowest
    if one_standard_error:
        bar = means[lowest] + results[lowest]["fold_log_loss_se"]
        best = next(i for i, m in enumerate(means) if m <= bar)
    router = ScaleRouter(**cands[best]).fit(X, correct, scales, feature_names)
    router.oof_proba_ = oof_all[best]
    report = {
        "metric": "out-of-fold mean log-loss over scales (lower is better)",
        "splitter": type(splitter).__name__,
        "cv": cv,
        "n": int(X.shape[0]),
        "scales": list(scales),
        "rule": "first within one standard error of the lowest" if one_standard_error else "lowest",
        "candidates": results,
        "lowest_index": lowest,
        "best_index": best,
        "best_params": results[best]["params"],
    }
    return router, report


def _jsonable_params(params: Mapping[str, object]) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
