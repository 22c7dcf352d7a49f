"""Accuracy-vs-cost curves: evaluate choices, sweep a policy's knob, gap_closed, reports."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from predictor.features import validate_correct, validate_scales
from predictor.policies import (
    ProbeScores,
    apply_policy,
    default_knobs,
    get_policy,
    relative_cost,
)

__all__ = [
    "COST_KEYS",
    "cost_matrix",
    "evaluate_choice",
    "fixed_points",
    "group_prior",
    "evaluate_knobs",
    "evaluate_choices",
    "checked_scores",
    "vision_flops",
    "sweep",
    "frontier",
    "gap_closed",
    "no_loss_point",
    "write_curve_report",
]

COST_KEYS = ("tokens", "flops", "latency")
Curve = Sequence[Mapping[str, float]] | Sequence[tuple[float, float]] | np.ndarray


def cost_matrix(costs: Mapping[str, object] | None, key: str, n: int, S: int) -> np.ndarray | None:
    """costs[key] as an (n, S) float array (per-scale vectors are broadcast), None if absent."""
    if costs is None or costs.get(key) is None:
        return None
    c = np.asarray(costs[key], dtype=np.float64)
    if c.shape == (S,):
        return np.broadcast_to(c, (n, S))
    if c.shape == (n, S):
        return c
    raise ValueError(f"costs[{key!r}] must have shape ({S},) or ({n}, {S}), got {c.shape}")


def checked_scores(
    scores: np.ndarray | ProbeScores, shape: tuple[int, ...]
) -> np.ndarray | ProbeScores:
    """A policy's scores as float64 (or `ProbeScores`), shaped like the correctness matrix."""
    if isinstance(scores, ProbeScores):
        if scores.shape != shape:
            raise ValueError(f"probe scores have shape {scores.shape}, correct has {shape}")
        return scores
    out = np.asarray(scores, dtype=np.float64)
    if out.shape != shape:
        raise ValueError(f"scores have shape {out.shape}, correct has {shape}")
    return out


def _with_tokens(costs: Mapping[str, object] | None, scales: Sequence[int]) -> dict:
    out = dict(costs or {})
    out.setdefault("tokens", np.asarray(scales, dtype=np.float64))
    return out


def evaluate_choice(
    chosen_idx: np.ndarray,
    correct: np.ndarray,
    costs: Mapping[str, object],
    tried: np.ndarray | None = None,
) -> dict:
    """Accuracy and mean cost of one scale choice per sample.

    With `tried` (n, S), from a policy that runs more than the chosen scale (a bool mask from
    the cascade, counts from the probe policies), every prefill it paid is counted, as often
    as it was paid. The image is encoded once whatever runs after, so where `costs` holds
    "vision_flops" (one number or one per sample: the vision tower's part of each scale's
    FLOPs) it is counted once per sample, not once per attempt. Costs missing from `costs`
    come back as None.
    """
    correct = validate_correct(correct)
    n, S = correct.shape
    idx = np.asarray(chosen_idx, dtype=np.int64)
    if idx.shape != (n,) or (n and (idx.min() < 0 or idx.max() >= S)):
        raise ValueError(f"chosen_idx must be {n} indices in [0, {S}), got shape {idx.shape}")
    if tried is not None:
        tried = np.asarray(tried)
        if tried.shape != (n, S):
            raise ValueError(f"tried must have shape ({n}, {S}), got {tried.shape}")
        tried = tried.astype(np.float64)
    vision = vision_flops(costs, n)
    rows = np.arange(n)
    out: dict = {"accuracy": float(correct[rows, idx].mean())}
    for key in COST_KEYS:
        c = cost_matrix(costs, key, n, S)
        if c is None:
            out[f"mean_{key}"] = None
        elif tried is None:
            out[f"mean_{key}"] = float(c[rows, idx].mean())
        elif key == "flops" and vision is not None:
            paid = ((c - vision[:, None]) * tried).sum(axis=1) + vision * (tried.sum(axis=1) > 0)
            out[f"mean_{key}"] = float(paid.mean())
        else:
            out[f"mean_{key}"] = float((c * tried).sum(axis=1).mean())
    out["scale_share"] = [float(v) for v in np.bincount(idx, minlength=S) / max(n, 1)]
    return out


def vision_flops(costs: Mapping[str, object] | None, n: int) -> np.ndarray | None:
    """costs["vision_flops"] as (n,) floats, None if absent."""
    if costs is None or costs.get("vision_flops") is None:
        return None
    v = np.asarray(costs["vision_flops"], dtype=np.float64)
    if v.shape not in ((), (n,)):
        raise ValueError(f"costs['vision_flops'] must be one number or {n}, got shape {v.shape}")
    return np.broadcast_to(v, (n,))


def fixed_points(
    correct: np.ndarray, scales: Sequence[int], costs: Mapping[str, object] | None = None
) -> list[dict]:
    """One evaluate_choice record per fixed scale (the baseline every router must beat)."""
    scales = validate_scales(scales)
    correct = validate_correct(correct, n_scales=len(scales))
    costs = _with_tokens(costs, scales)
    n = correct.shape[0]
    return [
        {"scale": s, "knob": float(s), **evaluate_choice(np.full(n, i), correct, costs)}
        for i, s in enumerate(scales)
    ]


def group_prior(
    correct: np.ndarray, groups: Sequence[str], eval_groups: Sequence[str]
) -> np.ndarray:
    """P(correct at each scale) = the accuracy of the sample's group on the fit split.

    The baseline a router must beat to show it reads more than the question type: sweeping a
    policy over it routes every question of a group (e.g. a benchmark family) to one scale.
    Groups unseen in the fit split get the overall accuracy. Returns (len(eval_groups), S).
    """
    correct = validate_correct(correct).astype(np.float64)
    groups = np.asarray(groups, dtype=object)
    if groups.shape != (correct.shape[0],):
        raise ValueError(f"{groups.size} groups for {correct.shape[0]} rows of correct")
    overall = correct.mean(axis=0)
    table = {g: correct[groups == g].mean(axis=0) for g in np.unique(groups)}
    rows = [table.get(g, overall) for g in eval_groups]
    return np.array(rows, dtype=np.float64).reshape(len(rows), correct.shape[1])


def evaluate_knobs(
    policy: str,
    scores: np.ndarray | ProbeScores,
    correct: np.ndarray,
    scales: tuple[int, ...],
    costs: Mapping[str, object],
    knobs: Sequence[float] | np.ndarray,
) -> list[dict]:
    """`evaluate_choices` of a registered policy on its scores: for a cost-weight knob
    (utility, the probe policies) the weight is on relative tokens (tokens / largest tokens).
    Expects validated inputs (as `sweep` makes them) with `costs["tokens"]` set."""
    n, S = correct.shape
    weight = None
    if get_policy(policy).knob_kind == "weight":
        weight = relative_cost(cost_matrix(costs, "tokens", n, S))
    return evaluate_choices(
        lambda k: apply_policy(policy, scores, k, scales, weight), correct, costs, knobs
    )


def evaluate_choices(
    choose: Callable[[float], tuple[np.ndarray, np.ndarray | None]],
    correct: np.ndarray,
    costs: Mapping[str, object],
    knobs: Sequence[float] | np.ndarray,
) -> list[dict]:
    """The one knob loop: per knob, `evaluate_choice` of `choose(knob)` = (chosen index,
    prefills paid or None), in `knobs` order.

    Each row is {"knob", accuracy, mean costs, scale_share, "losses"}; `losses` counts the
    samples right at the largest scale and wrong at the chosen one, what Learn-then-Test
    tests. Any knob -> choice mapping works: calibration needs nothing else.
    """
    n = correct.shape[0]
    rows, largest = np.arange(n), correct[:, -1]
    out = []
    for k in np.asarray(knobs, dtype=np.float64):
        idx, tried = choose(float(k))
        losses = int(np.sum(largest & ~correct[rows, idx]))
        out.append(
            {"knob": float(k), **evaluate_choice(idx, correct, costs, tried), "losses": losses}
        )
    return out


def sweep(
    policy_name: str,
    P_or_conf: np.ndarray | ProbeScores,
    correct: np.ndarray,
    scales: Sequence[int],
    costs: Mapping[str, object] | None = None,
    knobs: Sequence[float] | np.ndarray | None = None,
) -> list[dict]:
    """`evaluate_knobs` over a policy's knob grid: the router's accuracy-vs-cost curve.

    `P_or_conf` is what `POLICIES[policy_name].scores` says: P(correct) (threshold, utility),
    answer confidence (cascade), oracle-scale class probabilities (quantile) or `ProbeScores`
    (the probe policies). Knobs default to `default_knobs` (for cascade, the confidence
    quantiles). Missing `costs["tokens"]` defaults to the scales themselves.
    """
    scales = validate_scales(scales)
    correct = validate_correct(correct, n_scales=len(scales))
    scores = checked_scores(P_or_conf, correct.shape)
    if knobs is None:
        knobs = default_knobs(policy_name, scores if policy_name == "cascade" else None)
    return evaluate_knobs(policy_name, scores, correct, scales, _with_tokens(costs, scales), knobs)


def _xy(curve: Curve, x_key: str = "mean_tokens") -> np.ndarray:
    """(m, 2) array of (cost, accuracy) from dict records, (cost, accuracy) pairs or an array."""
    if isinstance(curve, np.ndarray):
        arr = np.asarray(curve, dtype=np.float64)
    elif len(curve) and isinstance(curve[0], Mapping):
        arr = np.array([[p[x_key], p["accuracy"]] for p in curve], dtype=np.float64)
    else:
        arr = np.asarray(curve, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"a curve needs (cost, accuracy) points, got shape {arr.shape}")
    return arr[np.all(np.isfinite(arr), axis=1)]


def frontier(curve: Curve, x_key: str = "mean_tokens") -> np.ndarray:
    """What a curve can reach by mixing its operating points at random: the non-decreasing
    upper concave envelope in linear cost (mixing two points reaches the segment between).
    Returns its vertices, (m, 2), sorted by cost."""
    pts = _xy(curve, x_key)
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]
    hull: list[np.ndarray] = []
    for p in pts:
        if hull and p[0] == hull[-1][0]:
            continue  # same cost, lower accuracy (sorted accuracy-descending within a cost)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()  # hull[-1] lies on or below the chord from hull[-2] to p
            else:
                break
        hull.append(p)
    h = np.array(hull)
    return h[: int(np.argmax(h[:, 1])) + 1]  # past the best point more cost buys nothing


def _area(vertices: np.ndarray, grid: np.ndarray) -> float:
    y = np.interp(grid, vertices[:, 0], vertices[:, 1])
    y[grid < vertices[0, 0] - 1e-9] = np.nan
    return float(np.mean(y))


def gap_closed(
    router_curve: Curve,
    fixed_points: Curve,
    budgeted_oracle_curve: Curve,
    x_key: str = "mean_tokens",
    n_grid: int = 2001,
) -> float:
    """Share of the fixed-scale -> budgeted-oracle gap that the router closes.

    Each curve is replaced by its frontier (the non-decreasing upper concave envelope in
    linear tokens, which random mixing of operating points achieves; for fixed scales this
    is the linear interpolation between them). Areas under the frontiers are taken over a
    log-token axis from the smallest to the largest fixed scale, and
    gap_closed = (A_router - A_fixed) / (A_oracle - A_fixed): 0 = no better than mixing fixed
    scales, 1 = the budgeted oracle, negative = worse than fixed scales. The smallest fixed
    point is added to the router and oracle curves (anyone can always fall back to it), so a
    curve that starts above the smallest scale is not left undefined there. NaN when the
    oracle is no better than fixed scales.
    """
    fixed = _xy(fixed_points, x_key)
    lo_pt = fixed[np.argmin(fixed[:, 0])]
    lo, hi = float(fixed[:, 0].min()), float(fixed[:, 0].max())
    if not 0 < lo < hi:
        raise ValueError(f"fixed points must span a positive cost range, got [{lo}, {hi}]")
    grid = np.geomspace(lo, hi, n_grid)
    a_fix = _area(frontier(fixed), grid)
    a_rtr = _area(frontier(np.vstack([_xy(router_curve, x_key), lo_pt])), grid)
    a_orc = _area(frontier(np.vstack([_xy(budgeted_oracle_curve, x_key), lo_pt])), grid)
    if not a_orc - a_fix > 1e-12:
        return float("nan")
    return (a_rtr - a_fix) / (a_orc - a_fix)


def no_loss_point(
    curve: Curve, largest_accuracy: float, tol: float = 0.0, x_key: str = "mean_tokens"
) -> dict | None:
    """The cheapest point whose accuracy >= largest_accuracy - tol, or None if none reaches it.

    Returns the original record (dicts) or {x_key, accuracy} (pairs).
    """
    pts = _xy(curve, x_key)
    ok = np.flatnonzero(pts[:, 1] >= largest_accuracy - tol - 1e-12)
    if ok.size == 0:
        return None
    best = ok[np.argmin(pts[ok, 0])]
    if not isinstance(curve, np.ndarray) and isinstance(curve[0], Mapping):
        finite = [p for p in curve if np.isfinite(p[x_key]) and np.isfinite(p["accuracy"])]
        return dict(finite[best])
    return {x_key: float(pts[best, 0]), "accuracy": float(pts[best, 1])}


def _summary(curve: Curve, fixed: np.ndarray, boracle: Curve, largest: float, tol: float) -> dict:
    pts = _xy(curve)
    nl, near = no_loss_point(curve, largest), no_loss_point(curve, largest, tol)
    return {
        "gap_closed": gap_closed(curve, fixed, boracle),
        "best_accuracy": float(pts[:, 1].max()),
        "no_loss_tokens": None if nl is None else nl["mean_tokens"],
        "no_loss_point": nl,
        "no_loss_tol": tol,
        "no_loss_tol_tokens": None if near is None else near["mean_tokens"],
    }


def _fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def write_curve_report(
    out_dir: str | Path,
    curves: Mapping[str, Sequence[Mapping]],
    fixed_points: Sequence[Mapping],
    oracle_point: tuple[float, float],
    budgeted_oracle: Sequence[tuple[float, float]],
    title: str = "adaptive-m3 routing",
    tol: float = 0.01,
    png: str | Path | None = None,
) -> dict[str, Path]:
    """Write curve.json, curve.md and the plot (accuracy vs mean visual tokens, log x) to
    `png`, by default curve.png beside them.

    `curves` maps a name (e.g. "lightgbm/threshold") to `sweep` output; `fixed_points` is
    `fixed_points(...)` output; `oracle_point` is (accuracy, mean_tokens). The fewest mean
    tokens matching the largest scale are reported exactly and within `tol` accuracy, since
    on a finite calib split an exact match is partly luck.
    """
    from matplotlib.figure import Figure  # Figure without pyplot: no global backend state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed_xy = _xy(fixed_points)
    largest = float(fixed_xy[np.argmax(fixed_xy[:, 0]), 1])
    bo = [(float(b), float(a)) for b, a in budgeted_oracle]
    summaries = {name: _summary(c, fixed_xy, bo, largest, tol) for name, c in curves.items()}
    bo_nl = no_loss_point(bo, largest)
    report = {
        "title": title,
        "largest_scale_accuracy": largest,
        "fixed_points": [dict(p) for p in fixed_points],
        "oracle": {"accuracy": float(oracle_point[0]), "mean_tokens": float(oracle_point[1])},
        "budgeted_oracle": {
            "points": [list(p) for p in bo],
            "no_loss_tokens": None if bo_nl is None else bo_nl["mean_tokens"],
        },
        "curves": {
            name: {**summaries[name], "points": [dict(p) for p in c]} for name, c in curves.items()
        },
    }
    paths = {
        "json": out / "curve.json",
        "markdown": out / "curve.md",
        "png": out / "curve.png" if png is None else Path(png),
    }

    def _clean(o: object) -> object:
        if isinstance(o, float) and not np.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: _clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [_clean(v) for v in o]
        if isinstance(o, np.generic):
            return _clean(o.item())
        return o

    paths["json"].write_text(json.dumps(_clean(report), indent=1) + "\n")

    lines = [
        f"# {title}",
        "",
        f"Largest scale accuracy: {_fmt(largest)}. Oracle: {_fmt(float(oracle_point[0]))} at "
        f"{_fmt(float(oracle_point[1]))} mean tokens. Budgeted oracle matches the largest scale "
        f"at {_fmt(report['budgeted_oracle']['no_loss_tokens'])} mean tokens.",
        "",
        "| curve | gap_closed | best accuracy | fewest mean tokens with no loss | "
        f"... within {tol:g} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {_fmt(s['gap_closed'], 3)} | {_fmt(s['best_accuracy'])} | "
            f"{_fmt(s['no_loss_tokens'])} | {_fmt(s['no_loss_tol_tokens'])} |"
        )
    lines += [
        "",
        "## Fixed scales",
        "",
        "| scale | accuracy | mean tokens | mean FLOPs | mean latency |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in fixed_points:
        lines.append(
            f"| {p.get('scale', '-')} | {_fmt(p['accuracy'])} | {_fmt(p['mean_tokens'])} | "
            f"{_fmt(p.get('mean_flops'))} | {_fmt(p.get('mean_latency'))} |"
        )
    for name, c in curves.items():
        f = frontier(c)
        lines += [
            "",
            f"## {name}: frontier vertices",
            "",
            "| mean tokens | accuracy |",
            "| --- | --- |",
        ]
        lines += [f"| {_fmt(float(x))} | {_fmt(float(y))} |" for x, y in f]
    paths["markdown"].write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    fx = np.geomspace(fixed_xy[:, 0].min(), fixed_xy[:, 0].max(), 400)
    fvert = frontier(fixed_xy)
    ax.plot(fx, np.interp(fx, fvert[:, 0], fvert[:, 1]), "k--", lw=1, label="fixed scales, mixed")
    ax.plot(fixed_xy[:, 0], fixed_xy[:, 1], "ks", label="fixed scales")
    bxy = np.array(bo)
    ax.step(bxy[:, 0], bxy[:, 1], where="post", color="tab:gray", label="budgeted oracle")
    ax.plot([oracle_point[1]], [oracle_point[0]], "r*", ms=12, label="oracle")
    for name, c in curves.items():
        xy = _xy(c)
        xy = xy[np.argsort(xy[:, 0], kind="stable")]
        gc = summaries[name]["gap_closed"]
        ax.plot(xy[:, 0], xy[:, 1], ".-", ms=3, label=f"{name} (gap closed {_fmt(gc, 3)})")
    ax.set_xscale("log")
    ax.set_xlabel("mean visual tokens")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    return paths
