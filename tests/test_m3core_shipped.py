"""The shipped checkpoints load and still answer: a broken checkpoint cannot land."""

import json

import pytest

from data.synthetic import make_split
from m3core import NestedLMM
from m3core.evaluate import scale_accuracy
from m3core.shipped import SHIPPED as CHECKPOINTS
from m3core.shipped import resolve_model, shipped_names

SHIPPED = shipped_names()


@pytest.fixture(scope="module")
def test_slice():
    return make_split("test", 30, seed=0)


def test_both_kinds_are_shipped_within_the_size_budget():
    assert {"tiny-m3", "tiny-mqt"} <= set(SHIPPED)
    total = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert total <= 25 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_answers_at_its_largest_scale(name, test_slice):
    folder = CHECKPOINTS / name
    info = json.loads((folder / "training.json").read_text())
    lmm = NestedLMM.from_pretrained(folder, device="cpu")
    accuracy = scale_accuracy(lmm, test_slice, [lmm.scales[-1]])[lmm.scales[-1]]
    assert accuracy >= info["ci_floor"], (name, accuracy)


def test_a_name_resolves_to_its_shipped_folder_and_an_unknown_one_lists_them(tmp_path):
    assert resolve_model("tiny-m3") == CHECKPOINTS / "tiny-m3"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="tiny-m3"):
        resolve_model("no-such-model")
