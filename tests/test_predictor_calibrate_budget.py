"""Call-time budgets: a stored calibration table answers every target exactly as `tune` does."""

import json

import numpy as np
import pytest

from predictor import (
    CALIBRATION_JSON,
    RouterFileError,
    calibration_table,
    knob_for_target,
    load_calibration,
    save_calibration,
    tune,
)
from tests.routing_data import make_synthetic

TARGETS = (
    "tokens<=6",
    "tokens<=20",
    "tokens<=80",
    "flops<=2.3e9",
    "latency<=12",
    "loss<=0.02@0.1",
    "loss<=0.05@0.05",
    "loss<=0.001@0.1",  # not certifiable: falls back to the largest scale
)


@pytest.fixture(scope="module")
def calib():
    d = make_synthetic(n=600, n_features=4, seed=3)
    return d, d.costs  # latency is per sample (n, S); the table keeps its means


@pytest.mark.parametrize("policy", ["threshold", "utility"])
def test_table_gives_the_same_result_as_tune_after_a_json_round_trip(calib, policy, tmp_path):
    d, costs = calib
    table = calibration_table(d.p_true, d.correct, d.scales, costs, policy)
    save_calibration(table, tmp_path)
    stored = load_calibration(tmp_path)
    assert stored == json.loads(json.dumps(table))
    for target in TARGETS:
        expected = tune(d.p_true, d.correct, d.scales, costs, target, policy)
        got = knob_for_target(stored, target)
        assert got.to_dict() == expected.to_dict(), target
    fallback = knob_for_target(stored, "loss<=0.001@0.1")
    assert (fallback.policy, fallback.knob, fallback.certified) == ("fixed", 144.0, False)


def test_table_rows_count_losses_against_the_largest_scale(calib):
    d, costs = calib
    table = calibration_table(d.p_true, d.correct, d.scales, costs, "threshold", knobs=[0.0, 1.01])
    cheapest, dearest = table["rows"]
    largest = d.correct[:, -1]
    assert cheapest["losses"] == int(np.sum(largest & ~d.correct[:, 0]))
    assert cheapest["mean_tokens"] == 1.0 and dearest["mean_tokens"] == 144.0
    assert dearest["losses"] == 0 and table["largest_accuracy"] == pytest.approx(largest.mean())
    assert table["n"] == 600 and table["scales"] == [1, 9, 36, 144]


def test_cascade_table_pays_for_every_tried_scale(calib):
    d, costs = calib
    table = calibration_table(d.confidence, d.correct, d.scales, costs, "cascade")
    top = max(table["rows"], key=lambda r: r["knob"])
    assert top["mean_tokens"] == sum(d.scales)  # a threshold above every confidence runs all
    res = knob_for_target(table, "tokens<=30")
    assert res.policy == "cascade" and res.metrics["mean_tokens"] <= 30


def test_errors_name_what_is_missing(calib, tmp_path):
    d, _ = calib
    table = calibration_table(d.p_true, d.correct, d.scales, {"tokens": d.scales}, "threshold")
    with pytest.raises(ValueError, match="needs costs\\['flops'\\]"):
        knob_for_target(table, "flops<=1e9")
    with pytest.raises(ValueError, match="cheapest reaches 1"):
        knob_for_target(table, "tokens<=0.5")
    with pytest.raises(ValueError, match="epsilon and delta"):
        knob_for_target(table, {"metric": "accuracy_loss", "epsilon": 0.0, "delta": 0.1})
    with pytest.raises(ValueError, match="malformed calibration table: missing key 'rows'"):
        knob_for_target({k: v for k, v in table.items() if k != "rows"}, "tokens<=9")
    assert load_calibration(tmp_path) is None
    (tmp_path / CALIBRATION_JSON).write_text("{not json")
    with pytest.raises(RouterFileError, match=CALIBRATION_JSON):
        load_calibration(tmp_path)
