import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines import routing
from pipelines.cli import main
from pipelines.labels import LabelSet, read_labels
from pipelines.report import (
    diagnosis,
    granularity,
    granularity_markdown,
    oracle_gain_by_family,
    quickstart_markdown,
    why_missed,
)
from pipelines.targets import grade, parse_targets
from predictor import (
    ScaleRouter,
    chance_corrected,
    knob_for_target,
    load_calibration,
    oracle_point,
)

SCALES = ("1", "9", "36", "144")
TARGETS = "gap_closed>=-5,router_overhead<=1e-9"  # one always met, one always missed


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One small quickstart on the shipped model, counting router saves and failing on any
    in-process read of the saved out-of-fold scores."""
    out = tmp_path_factory.mktemp("quickstart")
    saves = []
    save = ScaleRouter.save

    def counted(self, directory):
        saves.append(directory)
        return save(self, directory)

    def no_read_back(*args, **kwargs):
        raise AssertionError("the quickstart read back the scores it holds in memory")

    args = ["quickstart", "--small", "--workers", "0", "--out", str(out), "--targets", TARGETS]
    console = io.StringIO()  # capsys is per test; this run is shared
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
        patch.setattr(ScaleRouter, "save", counted)
        patch.setattr(routing, "calibration_scores", no_read_back)
        code = main(args)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    return SimpleNamespace(out=out, report=report, saves=saves, console=console.getvalue())


def frontier_area(points: np.ndarray, grid: np.ndarray) -> float:
    """Mean over `grid` of the best accuracy reachable by mixing two operating points at
    random within each budget: gap_closed's definition, written out pairwise."""
    x, y = points[:, 0], points[:, 1]
    values = []
    for b in grid:
        alone = y[x <= b + 1e-12]
        best = alone.max() if alone.size else np.nan
        lo, hi = x[:, None], x[None, :]
        pair = (lo <= b) & (hi >= b) & (hi > lo)
        if pair.any():
            w = (b - lo) / np.where(hi > lo, hi - lo, 1)
            mixed = np.where(pair, y[:, None] + w * (y[None, :] - y[:, None]), -np.inf)
            best = max(best, mixed.max()) if alone.size else mixed.max()
        values.append(best)
    return float(np.mean(values))


def test_quickstart_reports_values_consistent_with_its_labels(quickstart):
    report, out = quickstart.report, quickstart.out
    test = read_labels(out / "labels-test")
    assert report["samples"] == {"calib": 48, "test": 48, "extra_test": 48}
    assert report["scales"] == [1, 9, 36, 144]
    assert list(report["fixed"]) == list(SCALES)
    for j, scale in enumerate(SCALES):
        point = report["fixed"][scale]
        assert 0 <= point["accuracy"] <= 1 and point["mean_tokens"] == int(scale)
        assert point["accuracy"] == pytest.approx(test.correct[:, j].mean())
    oracle = report["oracle"]
    assert oracle["accuracy"] == pytest.approx(test.correct.any(axis=1).mean())
    assert oracle["accuracy"] >= max(p["accuracy"] for p in report["fixed"].values())
    assert 1 <= oracle["mean_tokens"] <= 144

    # gap_closed from the reported curves, over the same log-token grid as the library
    fixed = np.array([[p["mean_tokens"], p["accuracy"]] for p in report["fixed"].values()])
    smallest = fixed[:1]
    router = np.array([[p["mean_tokens"], p["accuracy"]] for p in report["router"]])
    oracle_curve = np.array(report["budgeted_oracle"])
    grid = np.geomspace(1, 144, 2001)
    a_fixed = frontier_area(fixed, grid)
    a_router = frontier_area(np.vstack([router, smallest]), grid)
    a_oracle = frontier_area(np.vstack([oracle_curve, smallest]), grid)
    gap = (a_router - a_fixed) / (a_oracle - a_fixed)
    assert report["gap_closed"] == pytest.approx(gap, abs=1e-9)


def saved_policy(folder) -> tuple[str, float]:
    """(policy, knob) a router folder serves: router.json, or a probe router's probe.json."""
    name = "probe.json" if (folder / "probe.json").is_file() else "router.json"
    saved = json.loads((folder / name).read_text())
    return saved["policy"], saved["knob"]


def test_every_router_is_at_its_tuned_knob_and_the_default_won_on_calib(quickstart):
    report, out = quickstart.report, quickstart.out
    assert list(report["routers"]) == ["router", "probe", "probe-cascade"]
    offered = report["routers_offered"]
    default = report["default_router"]
    assert offered[default]["calib_gap_closed"] == max(
        row["calib_gap_closed"] for row in offered.values()
    )
    assert saved_policy(out / "router") == saved_policy(out / "routers" / default)
    assert report["gap_closed"] == report["routers"][default]["gap_closed"]
    for split in (report, report["extra_test"]):
        for name, row in split["routers"].items():
            nl = row["no_loss_point"]
            policy, knob = saved_policy(out / "routers" / name)
            assert knob == nl["knob"] == offered[name]["knob"]
            on_curve = next(p for p in row["curve"] if p["knob"] == nl["knob"])
            assert (on_curve["accuracy"], on_curve["mean_tokens"]) == (
                nl["accuracy"],
                nl["mean_tokens"],
            )
            assert nl["token_fraction"] == pytest.approx(nl["mean_tokens"] / 144)
            assert nl["largest_scale_accuracy"] == split["fixed"]["144"]["accuracy"]
            assert row["serving"]["speedup"] > 0
    # the knob follows its rule on the calib split's table
    nl = report["no_loss_point"]
    table = load_calibration(out / "router")
    rows = {row["knob"]: row for row in table["rows"]}
    certified = knob_for_target(table, "loss<=0.005@0.1")
    if nl["knob_rule"] == "certified":
        assert certified.knob == nl["knob"]
    else:
        assert nl["knob_rule"] == "calib" and not certified.certified
        chosen = rows[nl["knob"]]
        reach = [r for r in rows.values() if r["accuracy"] >= table["largest_accuracy"]]
        edge = reach or [
            r for r in rows.values() if r["accuracy"] >= table["largest_accuracy"] - 0.005
        ]
        assert chosen in edge
        assert chosen["mean_tokens"] == min(r["mean_tokens"] for r in edge)


def test_oracle_a_and_the_luck_follow_the_labels(quickstart):
    report, out = quickstart.report, quickstart.out
    for split, folder in ((report, "labels-test"), (report["extra_test"], "labels-extra-test")):
        labels = read_labels(out / folder)
        A = chance_corrected(labels.correct, labels.gold_prob)
        accuracy, tokens = oracle_point(A, labels.scales)
        assert split["luck"]["oracle_a"] == {"accuracy": accuracy, "mean_tokens": tokens}
        lucky = (labels.correct & (labels.gold_prob < 0.5)).mean(0)
        assert list(split["luck"]["plurality_right"].values()) == pytest.approx(lucky.tolist())
        assert split["oracle"]["accuracy"] >= accuracy  # the papers' oracle banks the luck
        for row in split["routers"].values():
            assert np.isfinite(row["gap_closed_oracle_a"])
    assert report["extra_test"]["seed"] == 1
    assert "second test split (generator seed 1)" in (out / "report.md").read_text()


def test_quickstart_grades_the_users_targets_without_planning_words(quickstart):
    report, out = quickstart.report, quickstart.out
    targets = report["targets"]
    assert list(targets) == [
        "accuracy_loss",
        "token_fraction",
        "gap_closed",
        "family_margin",
        "speedup",
        "router_overhead",
    ]
    assert (targets["gap_closed"]["target"], targets["gap_closed"]["met"]) == (-5.0, True)
    assert targets["router_overhead"]["target"] == 1e-9 and not targets["router_overhead"]["met"]
    assert targets["accuracy_loss"]["target"] == 0.005  # a default kept
    margin = report["gap_closed"] - report["family_prior"]["gap_closed"]
    assert targets["family_margin"]["measured"] == pytest.approx(margin)
    nl, timing = report["no_loss_point"], report["timing"]
    assert targets["accuracy_loss"]["measured"] == nl["largest_scale_accuracy"] - nl["accuracy"]
    assert targets["gap_closed"]["measured"] == report["gap_closed"]
    assert targets["speedup"]["measured"] == pytest.approx(
        timing["adaptive_samples_per_s"] / timing["largest_scale_samples_per_s"]
    )
    for row in targets.values():
        value, bar = row["measured"], row["target"]
        assert row["met"] == (value <= bar if row["op"] == "<=" else value >= bar)
    assert set(report["why_missed"]) == {name for name, row in targets.items() if not row["met"]}
    extra = report["extra_test"]["targets"]
    assert list(extra) == list(targets) and extra["gap_closed"]["target"] == -5.0
    assert "ms per sample or more" in report["why_missed"]["router_overhead"]
    markdown = (out / "report.md").read_text()
    assert "| gap_closed >= -5 |" in markdown and "| router_overhead <= 1e-09 |" in markdown
    for text in (markdown, json.dumps(report)):
        assert "issue" not in text.lower() and "at_least" not in text and "at_most" not in text
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "curves" / "curve.png").exists()  # the plot is written once, as pareto.png


def test_quickstart_announces_every_step_and_saves_each_router_once(quickstart):
    console = quickstart.console
    assert [f"[{i}/8]" in console for i in range(1, 9)] == [True] * 8
    assert "gap_closed" in console and "wrote " in console and "default router" in console
    saved = [Path(d).relative_to(quickstart.out / "routers").as_posix() for d in quickstart.saves]
    parts = ("gate", "probe-1", "probe-9")
    assert sorted(saved) == sorted(
        ["router"] + [f"{p}/{part}" for p in ("probe", "probe-cascade") for part in parts]
    )
    # the out-of-fold scores stay on disk for a later `adaptive-m3 tune` on the calib split
    router_dir = quickstart.out / "routers" / "router"
    calib = read_labels(quickstart.out / "labels-calib")
    served = ScaleRouter.load(router_dir)
    stored = json.loads((router_dir / routing.OOF_JSON).read_text())
    held_out = routing.calibration_scores(served, calib, router_dir)
    np.testing.assert_array_equal(held_out, np.asarray(stored["proba"]))
    assert not np.allclose(held_out, served.predict_proba(calib.features), atol=1e-3)


def test_tune_on_a_probe_router_folder_reads_back_the_quickstarts_scores(quickstart, tmp_path):
    """`adaptive-m3 tune` on a copy of a probe router folder rebuilds the same calibration
    table from the parts' stored out-of-fold scores, at the same gate threshold."""
    source = quickstart.out / "routers" / "probe-cascade"
    folder = tmp_path / "probe-cascade"
    shutil.copytree(source, folder)
    (folder / "calibration.json").unlink()
    labels = str(quickstart.out / "labels-calib")
    args = ["tune", "--labels", labels, "--router", str(folder), "--target", "loss<=0.005@0.1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--report", str(tmp_path / "report")]) == 0
    assert load_calibration(folder) == load_calibration(source)
    before = json.loads((source / "probe.json").read_text())
    after = json.loads((folder / "probe.json").read_text())
    assert after["gate_threshold"] == before["gate_threshold"]
    certified = knob_for_target(load_calibration(folder), "loss<=0.005@0.1")
    assert (after["policy"], after["knob"]) == (certified.policy, certified.knob)
    assert (tmp_path / "report" / "curve.json").is_file()


def test_train_router_prints_the_candidates_and_the_choice(quickstart, tmp_path, capsys):
    labels = str(quickstart.out / "labels-calib")
    assert main(["train-router", "--labels", labels, "--out", str(tmp_path), "--cv", "2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "cv_report.json").read_text())
    chosen = report["candidates"][report["best_index"]]
    assert f"* {chosen['fold_log_loss_mean']:.4f}" in printed
    assert json.dumps(chosen["params"]) in printed and "* chosen: first within one" in printed
    assert printed.count("\n") == len(report["candidates"]) + 3  # not a 2,000-character dump


def test_quickstart_refuses_an_out_folder_with_other_split_sizes(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    manifest = {"seed": 0, "sizes": {"calib": 12, "test": 12}}
    (tmp_path / "data" / "benchmark.json").write_text(json.dumps(manifest))
    args = ["quickstart", "--workers", "0", "--out", str(tmp_path), "--test-images", "40"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "'test': 12" in error and "'test': 40" in error and "new --out" in error


def test_targets_parse_by_name_over_the_defaults():
    targets = parse_targets("speedup>=1.5, gap_closed>=0.4")
    assert targets == {
        "accuracy_loss": 0.005,
        "token_fraction": 0.2,
        "gap_closed": 0.4,
        "family_margin": 0.1,
        "speedup": 1.5,
        "router_overhead": 0.05,
    }
    with pytest.raises(ValueError, match="gap_closed takes >="):
        parse_targets("gap_closed<=0.4")
    with pytest.raises(ValueError, match="NAME one of accuracy_loss"):
        parse_targets("speed>=2")


def test_diagnosis_counts_flips_and_scores_the_router_per_scale():
    correct = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    labels = SimpleNamespace(scales=(1, 4), correct=correct)
    result = diagnosis(correct.astype(float), labels)
    assert result["flip_rate"] == 0.25
    assert result["router_auc"] == {"1": 1.0, "4": 1.0}
    assert result["choice_auc"] == {"4": 1.0}
    blind = np.full(correct.shape, 0.5)
    assert diagnosis(blind, labels)["router_auc"] == {"1": 0.5, "4": 0.5}
    assert diagnosis(blind, labels)["choice_auc"] == {"4": 0.5}


DIAGNOSIS = {"router_auc": {"1": 0.8}, "choice_auc": {"4": 0.6}, "flip_rate": 0.1}
MEASURED = {  # what grade and why_missed read
    "gap_closed": 0.3,
    "oracle": {"accuracy": 0.9},
    "no_loss_point": {
        "accuracy": 0.8,
        "mean_tokens": 2.0,
        "largest_scale_accuracy": 0.8,
        "token_fraction": 0.5,
    },
    "timing": {
        "speedup": 1.7,
        "router_overhead_fraction": 0.001,
        "adaptive_mean_visual_tokens": 2.0,
        "smallest_scale_speedup": 1.71,
        "route_ms_per_sample": 0.01,
        "smallest_scale_ms_per_sample": 1.0,
    },
    "scales": [1, 4],
    "diagnosis": {"test": DIAGNOSIS, "calib": DIAGNOSIS},
}


def graded(targets: str | None = None, **changes) -> dict:
    report = json.loads(json.dumps(MEASURED)) | changes
    report["targets"] = grade(report, parse_targets(targets))
    return report


def test_why_missed_explains_each_missed_target_with_the_users_bars():
    report = graded()
    assert report["targets"]["family_margin"]["met"] is None  # no families: not measurable
    assert [n for n, row in report["targets"].items() if row["met"] is False] == [
        "token_fraction",
        "gap_closed",
        "speedup",
    ]
    reasons = why_missed(report)
    assert set(reasons) == {"token_fraction", "gap_closed", "speedup"}
    assert "staying within 0.5 points costs 2.0 mean visual" in reasons["token_fraction"]
    # a missed speed-up is blamed on the model when even the smallest scale cannot reach it
    assert "serves only 1.71x" in reasons["speedup"] and "reaches 2x" in reasons["speedup"]
    lenient = graded("speedup>=1.8,accuracy_loss<=0.02,token_fraction<=0.4")
    assert "reaches 1.8x" in why_missed(lenient)["speedup"]
    assert "within 2 points" in why_missed(lenient)["token_fraction"]
    fast = graded(timing={**MEASURED["timing"], "smallest_scale_speedup": 3.0})
    assert "to stay within 0.5 points" in why_missed(fast)["speedup"]
    markdown = quickstart_markdown(
        report
        | {
            "fixed": {"1": {"accuracy": 0.5, "mean_tokens": 1.0}},
            "oracle": {"accuracy": 0.9, "mean_tokens": 1.5},
            "no_loss_point": {**report["no_loss_point"], "knob_rule": "calib"},
            "policy": "utility",
            "cascade_gap_closed": 0.1,
            "timing": {
                **report["timing"],
                "adaptive_samples_per_s": 1.7,
                "largest_scale_samples_per_s": 1.0,
            },
            "why_missed": reasons,
        }
    )
    assert "| speedup >= 2 |" in markdown and "| 1.700 | NO |" in markdown
    assert "- token_fraction:" in markdown


def label_set(correct: np.ndarray, families: list[str]) -> LabelSet:
    n, s = correct.shape
    zeros = np.zeros((n, s))
    return LabelSet(
        ids=[str(i) for i in range(n)],
        groups=families,
        scales=(1, 4),
        correct=correct,
        observed=np.ones((n, s), dtype=bool),
        score=zeros,
        confidence=zeros,
        flops=zeros,
        latency=zeros,
        answers=[[""] * s] * n,
        features=np.zeros((n, 1)),
        feature_names=["f"],
        families=families,
        levels=families,
        skipped=[],
    )


def test_oracle_gain_by_family_finds_the_families_right_only_below_the_largest_scale():
    correct = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=bool)
    families = ["guess", "guess", "guess", "easy", "easy", "easy"]
    gain = oracle_gain_by_family(label_set(correct, families))
    assert [row["family"] for row in gain] == ["guess", "easy"]
    assert gain[0]["share"] == pytest.approx(2 / 3) and gain[0]["samples"] == 0.5
    assert gain[0]["largest_accuracy"] == pytest.approx(1 / 3)
    assert oracle_gain_by_family(label_set(correct, [""] * 6)) is None
    report = graded(family_prior=None, oracle_gain_by_family=gain)
    reason = why_missed(report)["gap_closed"]
    assert "67 % of that gain comes from guess (50 % of the samples, 33 % right" in reason
    assert "half-guesses" in reason
    report["oracle_gain_by_family"] = None
    assert "of that gain" not in why_missed(report)["gap_closed"]
    prior = {"gap_closed": 0.2, "hindsight_gap_closed": 0.35}
    assert "cannot reach 0.6" in why_missed(graded(family_prior=prior))["gap_closed"]
    near = why_missed(graded("gap_closed>=0.32", family_prior=prior))["gap_closed"]
    assert "cannot reach" not in near and "misses part of what the question type" in near
    margin = why_missed(graded(family_prior=prior))["family_margin"]
    assert "closes 0.300 of the gap against 0.200 for routing by question family (+0.100" in margin
    luck = {
        "threshold": 0.5,
        "plurality_right": {"1": 0.06, "4": 0.0},
        "oracle_a_share_of_gap": 0.9,
    }
    lucky = graded(luck=luck, gap_closed_oracle_a=0.35)
    assert (
        "6.0 % of the samples are right at the smallest scale only by a plurality"
        in (why_missed(lucky)["gap_closed"])
    )
    assert "against it the router closes 0.350" in why_missed(lucky)["gap_closed"]


def test_granularity_reports_the_luck_and_oracle_a_from_the_gold_probabilities():
    correct = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=bool)
    gold = np.array([[0.4, 0.9], [0.7, 0.2], [0.1, 0.8], [0.3, 0.45]])
    labels = label_set(correct, ["a", "a", "b", "b"])
    labels.gold_prob = gold
    report = granularity(labels)
    # oracle A: the 1-token rights at P 0.4 and 0.3 are plurality wins; 4 tokens keeps greedy
    assert report["all"]["oracle_a"] == {"accuracy": 1.0, "mean_tokens": (4 + 1 + 4 + 4) / 4}
    assert report["all"]["oracle"] == {"accuracy": 1.0, "mean_tokens": (1 + 1 + 4 + 1) / 4}
    assert report["all"]["plurality_right"] == {"1": 0.5, "4": 0.25}
    assert report["by_family"]["b"]["plurality_right"] == {"1": 0.5, "4": 0.5}
    assert report["luck"]["oracle_a"] == report["all"]["oracle_a"]
    assert 0 < report["luck"]["oracle_a_share_of_gap"] < 1
    markdown = granularity_markdown(report)
    assert "| oracle A | A tok | right by plurality at 1, 4 |" in markdown
    assert "| **all** | 4 | 75.0 | 75.0 | 100.0 | 1.8 | 100.0 | 3.2 | 50.0/25.0 |" in markdown
    labels.gold_prob = None
    assert granularity(labels)["luck"] is None
    assert "oracle A" not in granularity_markdown(granularity(labels))
