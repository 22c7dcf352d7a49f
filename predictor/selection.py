"""Model choice and hyper-parameters by cross-validation (mean log-loss over scales)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, KFold
from tqdm.auto import tqdm

from predictor.features import validate_correct, validate_features, validate_scales
from predictor.routers.base import scale_scores
from predictor.routers.scale_router import ScaleRouter

__all__ = ["DEFAULT_CANDIDATES", "Selection", "select_router", "scale_scores"]

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
MLP lost at both sizes. Listed from cheapest to serve to dearest (ONNX, 2,400 rows of the
tiny model's router features on one core, `bench/router.py`: logreg 2 ms, MLP 5 ms, LightGBM
57 ms), the order `select_router`'s one-standard-error rule reads."""


@dataclass
class Selection:
    """What `select_router` chose: the router refitted on every row, the JSON-ready report,
    and `oof_proba`, the winner's out-of-fold P(correct) (each row scored by the fold model
    that did not see it)."""

    router: ScaleRouter
    report: dict
    oof_proba: np.ndarray


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
    progress: bool = False,
) -> Selection:
    """Cross-validate each candidate (ScaleRouter keyword dicts), refit the chosen on all rows.

    Score: out-of-fold mean over scales of log-loss (lower is better), because every policy
    reads the probabilities themselves, not only their ranking. With `one_standard_error`
    the choice is the first candidate (list them cheapest first) whose mean fold loss is
    within one standard error of the lowest (the 1-SE rule of Hastie et al.): routing runs on
    every request, and on the quickstart's labels a 100-tree LightGBM beat logistic
    regression by less than the folds disagree while costing 28x its serving time.
    `groups` (e.g. image ids) keeps all questions about one image in one fold (GroupKFold),
    else shuffled KFold. `scales` go into each candidate's parameters.
    The selection's `oof_proba` are the winner's out-of-fold probabilities: scores on rows
    its fold-model never saw, fine for budget targets and curves on the same split. The
    accuracy-loss guarantee strictly needs scores from a router fitted on other data
    (out-of-fold scores share training rows across folds). `progress` shows a bar over the
    fits.
    """
    scales = validate_scales(scales)
    X = validate_features(X)
    correct = validate_correct(correct, n_scales=len(scales), n=X.shape[0])
    cands = [{**c, "scales": scales} for c in (candidates or DEFAULT_CANDIDATES)]
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
    for params in cands:
        ScaleRouter(**params)  # fail fast on a bad candidate, before any fitting
    fits = tqdm(total=len(cands) * len(folds) + 1, desc="router", unit="fit", disable=not progress)
    results, oof_all = [], []
    for params in cands:
        oof = np.zeros(correct.shape)
        fold_losses = []
        t0 = time.perf_counter()
        for train, test in folds:
            r = ScaleRouter(**params).fit(X[train], correct[train], feature_names=feature_names)
            oof[test] = r.predict_proba(X[test])
            fold_losses.append(scale_scores(correct[test], oof[test])["log_loss"])
            fits.update()
        shown = {k: v for k, v in params.items() if k != "scales"}
        entry = {"params": _jsonable_params(shown), **scale_scores(correct, oof)}
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
    router = ScaleRouter(**cands[best]).fit(X, correct, feature_names=feature_names)
    fits.update()
    fits.close()
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
    return Selection(router, report, oof_all[best])


def _jsonable_params(params: Mapping[str, object]) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
