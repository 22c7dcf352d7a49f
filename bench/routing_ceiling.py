"""How much of the oracle gap routing by question type, the probe routers and a perfect check
can close, against the papers' oracle and the chance-corrected oracles.

    python bench/routing_ceiling.py runs/quickstart

Reads a quickstart folder's labels (calib, test, and the second test split when there is one)
and its report.json. Per test split, every row is gap closed against three oracles:
- the papers' (M3's: any right answer at a smaller scale counts);
- A: a right answer below the largest scale counts only where the model gives the gold answer
  with probability >= 0.5 (re-asking would be right more often than not);
- B: per family and scale, a right answer is dropped with the probability that it is chance
  agreement (Cohen's kappa against an image-blind guesser with the model's answer frequencies
  on this split), averaged over 20 draws: an analysis metric, fitted on the evaluated split.
Fixed scales and routers are always scored on their greedy answers.

Rows: the quickstart's routers (router, probe, probe-cascade: its curves are recomputed here
from the saved router folders); each question family sent to one scale (fitted on calib, and
on the split itself in hindsight); the family crossed with the image's true detail level,
which no router sees; and where the rest of the gap lives: the family prior with each sample's
correctness at the smallest scale known (a perfect check of the 1-token answer; free, and at a
cascade's cost: every sample answered at 1 token first), that check replaced by the 1-token
answer's own confidence (isotonic on calib), the check knowing only the right answers that are
not plurality wins, and every scale's correctness known at a cascade's cost.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
from sklearn.isotonic import IsotonicRegression

from pipelines.labels import LabelSet, read_labels
from pipelines.routing import group_prior_curve
from predictor import (
    PROBE_POLICIES,
    budgeted_oracle_curve,
    chance_corrected,
    evaluate_choices,
    fixed_points,
    gap_closed,
    group_prior,
    load_router,
    sweep,
)
from predictor.policies import default_knobs, relative_cost, utility_policy


def split_meta(labels: LabelSet, samples: Path) -> tuple[list[str], list[str]]:
    """(family x the generator's detail level, the first gold answer) per sample."""
    meta = datasets.load_from_disk(str(samples)).select_columns(["id", "meta", "answers"])
    rows = {row["id"]: row for row in meta}
    detail = [json.loads(rows[i]["meta"]).get("detail", "") for i in labels.ids]
    groups = [f"{fam}/{d}" for fam, d in zip(labels.families, detail, strict=True)]
    return groups, [rows[i]["answers"][0] for i in labels.ids]


def kappa_luck(labels: LabelSet, gold: list[str]) -> np.ndarray:
    """(n, S) probability that a right answer is chance agreement (0 at the largest scale)."""
    families = np.asarray(labels.families)
    gold_norm = np.asarray([g.strip().lower() for g in gold])
    out = np.zeros(labels.correct.shape)
    for family in set(families):
        members = families == family
        n = int(members.sum())
        truth = Counter(gold_norm[members])
        for j in range(len(labels.scales) - 1):
            said = Counter(labels.answers[i][j].strip().lower() for i in np.flatnonzero(members))
            chance = sum(said[a] / n * truth[a] / n for a in truth)
            accuracy = labels.correct[members, j].mean()
            if accuracy > 0 and chance < 1:
                kappa = np.clip((accuracy - chance) / (1 - chance), 0, 1)
                out[members, j] = min(1.0, (1 - kappa) * chance / accuracy)
    return out


def oracles(labels: LabelSet, gold: list[str], draws: int = 20) -> dict[str, list]:
    """Budgeted-oracle curves: the papers', A, and B's draws."""
    tokens = labels.tokens
    out = {"papers": [budgeted_oracle_curve(labels.correct, tokens)]}
    if labels.gold_prob is not None:
        out["A"] = [
            budgeted_oracle_curve(chance_corrected(labels.correct, labels.gold_prob), tokens)
        ]
    luck = kappa_luck(labels, gold)
    rng = np.random.default_rng(0)
    out["B"] = []
    for _ in range(draws):
        drop = rng.random(luck.shape) < luck
        drop[:, -1] = False
        out["B"].append(budgeted_oracle_curve(labels.correct & ~drop, tokens))
    return out


def gaps(curve: list[dict], fixed: list[dict], against: dict[str, list]) -> str:
    values = {k: np.mean([gap_closed(curve, fixed, o) for o in v]) for k, v in against.items()}
    return " ".join(f"{values.get(k, float('nan')):6.3f}" for k in ("papers", "A", "B"))


def checked_first(labels: LabelSet, prior: np.ndarray, first: np.ndarray) -> list[dict]:
    """The family prior with P(correct at the smallest scale) replaced by `first`, every
    sample answered at the smallest scale first (paid, the tower once) and moved by the
    utility policy on the rest."""
    n, S = labels.correct.shape
    P = prior.copy()
    P[:, 0] = np.clip(first.astype(float), 0.01, 0.99)
    cost = relative_cost(labels.tokens)

    def choose(lam: float) -> tuple[np.ndarray, np.ndarray]:
        idx = utility_policy(P, np.where(np.arange(S) == 0, 0.0, cost), lam)
        paid = np.zeros((n, S), dtype=np.int64)
        paid[:, 0] = 1
        paid[np.arange(n), idx] += idx > 0
        return idx, paid

    return evaluate_choices(choose, labels.correct, labels.costs(), default_knobs("utility"))


def known_all(labels: LabelSet) -> list[dict]:
    """Every scale's correctness known, climbing the scales as a cascade pays for them."""
    n, S = labels.correct.shape
    idx = np.where(labels.correct.any(1), labels.correct.argmax(1), S - 1)
    paid = (np.arange(S)[None, :] <= idx[:, None]).astype(np.int64)
    return evaluate_choices(lambda _: (idx, paid), labels.correct, labels.costs(), [0.0])


def router_curves(root: Path, labels: LabelSet, report: dict) -> dict[str, list[dict]]:
    """The quickstart's routers on `labels`, from their saved folders, each swept over the
    policy it was tuned for."""
    curves = {}
    costs = labels.costs()
    for name in ("router", *PROBE_POLICIES):
        folder = root / "routers" / name
        if not folder.is_dir():
            continue
        router = load_router(folder, expected_scales=labels.scales)
        if name == "router":
            policy = report.get("routers", {}).get("router", {}).get("policy", router.policy)
            P = router.predict_proba(labels.features)
            curves[f"router ({policy})"] = sweep(policy, P, labels.correct, labels.scales, costs)
        elif labels.probe:
            probes = {s: labels.probe_at(s) for s in router.probe_scales}
            scores = router.scores(labels.features, probes)
            curves[name] = sweep(name, scores, labels.correct, labels.scales, costs)
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quickstart_dir", type=Path)
    args = parser.parse_args()
    root = args.quickstart_dir
    report = json.loads((root / "report.json").read_text())
    calib = read_labels(root / "labels-calib")
    calib_detail, _ = split_meta(calib, root / "labels-calib" / "samples")
    splits = [("test", "labels-test")]
    if (root / "labels-extra-test").is_dir():
        splits.append(("second test split", "labels-extra-test"))
    print(
        f"gap closed against the papers' oracle, oracle A and oracle B; default router: "
        f"{report.get('default_router', 'router')}"
    )
    for title, folder in splits:
        labels = read_labels(root / folder)
        detail, gold = split_meta(labels, root / folder / "samples")
        fixed = fixed_points(labels.correct, labels.scales, labels.costs())
        against = oracles(labels, gold)
        print(f"\n== {title}: {len(labels)} questions ==")
        print(f"{'':62s} papers      A      B")
        rows = router_curves(root, labels, report)
        rows["question family (calib)"] = group_prior_curve(
            calib, calib.families, labels, labels.families
        )
        rows["question family (hindsight)"] = group_prior_curve(
            labels, labels.families, labels, labels.families
        )
        rows["family x true detail (calib)"] = group_prior_curve(
            calib, calib_detail, labels, detail
        )
        rows["family x true detail (hindsight)"] = group_prior_curve(labels, detail, labels, detail)
        prior = group_prior(calib.correct, calib.families, labels.families)
        known = labels.correct[:, 0]
        rows["family + 1-token correctness known, free"] = sweep(
            "utility",
            np.column_stack([np.clip(known, 0.01, 0.99), prior[:, 1:]]),
            labels.correct,
            labels.scales,
            labels.costs(),
        )
        rows["family + 1-token correctness known, cascade cost"] = checked_first(
            labels, prior, known
        )
        isotonic = IsotonicRegression(y_min=0.01, y_max=0.99, out_of_bounds="clip")
        isotonic.fit(calib.confidence[:, 0], calib.correct[:, 0])
        rows["family + 1-token answer's confidence, cascade cost"] = checked_first(
            labels, prior, isotonic.predict(labels.confidence[:, 0])
        )
        if labels.gold_prob is not None:
            reliable = chance_corrected(labels.correct, labels.gold_prob)[:, 0]
            rows["family + only non-luck 1-token rights known, cascade cost"] = checked_first(
                labels, prior, reliable
            )
        rows["every scale's correctness known, cascade cost"] = known_all(labels)
        for name, curve in rows.items():
            print(f"{name:62s} {gaps(curve, fixed, against)}")


if __name__ == "__main__":
    main()
