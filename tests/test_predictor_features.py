"""Feature validation and the training-range spec."""

import numpy as np
import pytest

from predictor import FeatureSpec, validate_features
from predictor.features import validate_correct, validate_scales


def test_validate_features_accepts_and_converts():
    X = validate_features([[1, 2], [3, 4]])
    assert X.dtype == np.float32 and X.flags.c_contiguous and X.shape == (2, 2)


def test_validate_features_names_rows_and_features():
    spec = FeatureSpec.from_training(np.zeros((3, 3)), ["a", "b", "c"])
    X = np.zeros((30, 3))
    X[[2, 5], 1] = np.nan
    X[list(range(10, 22)), 2] = np.inf
    with pytest.raises(ValueError) as err:
        validate_features(X, spec)
    msg = str(err.value)
    assert "NaN in rows [2, 5] (features b)" in msg
    assert "inf in rows [10, 11, 12, 13, 14, 15, 16, 17] and 4 more (features c)" in msg
    with pytest.raises(ValueError, match="width 2 but the router was trained on 3 features"):
        validate_features(np.zeros((4, 2)), spec)
    with pytest.raises(ValueError, match="2-D"):
        validate_features(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="numeric"):
        validate_features([["a", "b"]])


def test_out_of_range_uses_margin_and_round_trips():
    train = np.array([[0.0, 10.0], [1.0, 20.0]])
    spec = FeatureSpec.from_training(train, margin=0.1)
    X = np.array([[1.05, 15.0], [1.2, 15.0], [0.5, 9.5], [0.5, 21.0], [0.5, 8.5]])
    assert spec.out_of_range(X).tolist() == [False, True, False, False, True]
    assert spec.names == ("f0", "f1")
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unique"):
        FeatureSpec.from_training(train, ["x", "x"])
    with pytest.raises(ValueError, match="3 entries but X has 2"):
        FeatureSpec.from_training(train, ["x", "y", "z"])


def test_scales_and_correct_validation():
    assert validate_scales([1, 9, 36]) == (1, 9, 36)
    for bad in ([], [9, 1], [0, 1], [1, 1], [1.5, 2]):
        with pytest.raises(ValueError):
            validate_scales(bad)
    assert validate_correct([[0, 1]]).dtype == bool
    with pytest.raises(ValueError, match="0/1"):
        validate_correct([[0, 2]])
