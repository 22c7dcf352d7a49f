"""ScaleRouter: features -> P(correct at each scale) -> one scale per sample; save/load as ONNX."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from predictor.features import FeatureSpec, validate_correct, validate_features, validate_scales
from predictor.policies import apply_policy, relative_cost
from predictor.routers.base import ProbabilityEstimator
from predictor.routers.lgbm import LightGBMEstimator
from predictor.routers.logreg import LogisticEstimator
from predictor.routers.mlp import MLPEstimator
from predictor.serving import OnnxProbabilityModel, RouterFileError, sha256_file

__all__ = ["ScaleRouter", "ESTIMATORS", "ROUTER_JSON", "MODEL_ONNX"]

ESTIMATORS: dict[str, type[ProbabilityEstimator]] = {
    "lightgbm": LightGBMEstimator,
    "logreg": LogisticEstimator,
    "mlp": MLPEstimator,
}
ROUTER_POLICIES = ("threshold", "utility", "fixed")
ROUTER_JSON, MODEL_ONNX = "router.json", "model.onnx"
_FORMAT, _VERSION = "adaptive-m3/scale-router", 1
_OWN_PARAMS = ("estimator", "policy", "knob", "fallback_out_of_range", "range_margin")


def _jsonable(v: object) -> object:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


class ScaleRouter:
    """Learns P(correct at scale s | features) for every scale and routes with a policy.

    Parameters
    ----------
    estimator: "lightgbm" | "logreg" | "mlp"; its hyper-parameters go in `**estimator_params`.
    policy: "threshold" (knob tau: smallest scale with P >= tau, else the largest),
        "utility" (knob lam: argmax P_s - lam * tokens_s / tokens_largest) or
        "fixed" (knob: the scale value to always use; what a failed guarantee falls back to).
    fallback_out_of_range: when True, `route` sends every row with a feature outside the
        training range (widened by `range_margin` times its width on each side) to the
        largest scale, since the router's probabilities there are extrapolation. Off by
        default: it costs tokens, and tree models extrapolate flat rather than wildly.

    A fitted router predicts natively (LightGBM / scikit-learn / torch); one from `load`
    predicts through onnxruntime. Both give the same probabilities within 1e-5.
    """

    def __init__(
        self,
        estimator: str = "lightgbm",
        policy: str = "threshold",
        knob: float = 0.5,
        fallback_out_of_range: bool = False,
        range_margin: float = 0.1,
        **estimator_params: object,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
        if policy not in ROUTER_POLICIES:
            raise ValueError(f"unknown router policy {policy!r}; choose one of {ROUTER_POLICIES}")
        valid = ESTIMATORS[estimator]._get_param_names()
        unknown = sorted(set(estimator_params) - set(valid))
        if unknown:
            raise ValueError(f"{estimator} does not take {unknown}; its parameters are {valid}")
        self.estimator = estimator
        self.policy = policy
        self.knob = knob
        self.fallback_out_of_range = fallback_out_of_range
        self.range_margin = range_margin
        self.estimator_params = dict(estimator_params)
        self._model: ProbabilityEstimator | OnnxProbabilityModel | None = None
        self._scales: tuple[int, ...] | None = None
        self._spec: FeatureSpec | None = None

    # -- scikit-learn parameter API -------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        """Router parameters plus every estimator hyper-parameter (defaults filled in)."""
        est = ESTIMATORS[self.estimator](**self.estimator_params).get_params()
        return {k: getattr(self, k) for k in _OWN_PARAMS} | est

    def set_params(self, **params: object) -> ScaleRouter:
        """Policy and knob apply at once; estimator parameters apply at the next `fit`."""
        own = {k: v for k, v in params.items() if k in _OWN_PARAMS}
        est = {k: v for k, v in params.items() if k not in _OWN_PARAMS}
        estimator = own.get("estimator", self.estimator)
        if estimator != self.estimator:
            self.estimator_params = {}
        merged = {**self.estimator_params, **est}
        probe = ScaleRouter(
            **{k: own.get(k, getattr(self, k)) for k in _OWN_PARAMS}, **merged
        )  # validates names and values the same way __init__ does
        for k in _OWN_PARAMS:
            setattr(self, k, getattr(probe, k))
        self.estimator_params = probe.estimator_params
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ScaleRouter({args})"

    # -- fitted state ---------------------------------------------------------------------
    def _fitted(self) -> tuple[ProbabilityEstimator | OnnxProbabilityModel, tuple[int, ...]]:
        if self._model is None or self._scales is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this ScaleRouter is not fitted; call fit() or ScaleRouter.load()")
        return self._model, self._scales

    @property
    def scales(self) -> tuple[int, ...]:
        return self._fitted()[1]

    @property
    def feature_spec(self) -> FeatureSpec:
        self._fitted()
        assert self._spec is not None
        return self._spec

    @property
    def backend(self) -> str:
        """Either "onnx" (a loaded router) or "native" (a fitted one)."""
        return "onnx" if isinstance(self._fitted()[0], OnnxProbabilityModel) else "native"

    @property
    def providers(self) -> list[str] | None:
        """onnxruntime execution providers in use (None when predicting natively)."""
        model = self._fitted()[0]
        return model.providers if isinstance(model, OnnxProbabilityModel) else None

    # -- learning and routing -------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        correct: np.ndarray,
        scales: Sequence[int],
        feature_names: Sequence[str] | None = None,
    ) -> ScaleRouter:
        """Learn P(correct at s | x) for every scale from the (n, S) correctness matrix."""
        scales = validate_scales(scales)
        X = validate_features(X)
        correct = validate_correct(correct, n_scales=len(scales), n=X.shape[0])
        if X.shape[0] < 2:
            raise ValueError("a router needs at least 2 training samples")
        spec = FeatureSpec.from_training(X, feature_names, margin=self.range_margin)
        model = ESTIMATORS[self.estimator](**self.estimator_params).fit(X, correct)
        self._model, self._scales, self._spec = model, scales, spec
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, S) float64: P(correct at each scale). Raises ValueError on bad features."""
        model, _ = self._fitted()
        X = validate_features(X, self._spec)
        return model.predict_proba(X)

    def out_of_range(self, X: np.ndarray) -> np.ndarray:
        """Bool (n,): rows with a feature outside the (widened) training range."""
        return self.feature_spec.out_of_range(validate_features(X, self._spec))

    def route(
        self,
        X: np.ndarray,
        knob: float | None = None,
        policy: str | None = None,
        costs: Mapping[str, object] | Sequence[float] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Chosen scale VALUES (n,) int64, e.g. [1, 36, 9, ...].

        `costs` matters only for utility: a per-scale cost vector or a costs dict (its
        "tokens" entry); it is divided by the largest scale's cost. Default: the scales.
        """
        _, scales = self._fitted()
        policy = self.policy if policy is None else policy
        knob = self.knob if knob is None else knob
        if policy not in ROUTER_POLICIES:
            raise ValueError(f"unknown router policy {policy!r}; choose one of {ROUTER_POLICIES}")
        if isinstance(knob, bool) or not math.isfinite(float(knob)):
            raise ValueError(f"knob must be a finite number, got {knob!r}")
        X = validate_features(X, self._spec)
        P = self._model.predict_proba(X)  # type: ignore[union-attr]
        cost = None
        if policy == "utility":
            raw = costs.get("tokens") if isinstance(costs, Mapping) else costs
            cost = relative_cost(scales if raw is None else raw)
        idx, _ = apply_policy(policy, P, float(knob), scales, cost)
        if self.fallback_out_of_range:
            idx = np.where(self.feature_spec.out_of_range(X), len(scales) - 1, idx)
        return np.asarray(scales, dtype=np.int64)[idx]

    # -- serving --------------------------------------------------------------------------
    def to_onnx(self):  # -> onnx.ModelProto
        model, _ = self._fitted()
        if isinstance(model, OnnxProbabilityModel):
            import onnx

            return onnx.load_from_string(model.model_bytes)
        return model.to_onnx()

    def save(self, directory: str | Path) -> Path:
        """Write `model.onnx` and `router.json` into `directory`; returns the folder."""
        _, scales = self._fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = out / MODEL_ONNX
        onnx_path.write_bytes(self.to_onnx().SerializeToString())
        knob = float(self.knob)
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "scales": list(scales),
            "estimator": self.estimator,
            "estimator_params": {k: _jsonable(v) for k, v in self.estimator_params.items()},
            "policy": self.policy,
            "knob": knob if math.isfinite(knob) else None,
            "fallback_out_of_range": bool(self.fallback_out_of_range),
            "feature_spec": self.feature_spec.to_dict(),
            "onnx": {"file": MODEL_ONNX, "sha256": sha256_file(onnx_path)},
        }
        (out / ROUTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expected_scales: Sequence[int] | None = None,
        providers: Sequence[str] | None = None,
    ) -> ScaleRouter:
        """Load a saved router onto onnxruntime (CUDA first when usable, else CPU).

        Raises FileNotFoundError / RouterFileError (a ValueError) naming the missing or
        malformed file, and ValueError naming both tuples when `expected_scales` (the model's
        scales) differ from the router's.
        """
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: router folder does not exist")
        meta_path = folder / ROUTER_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: router.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RouterFileError(f"{meta_path}: not valid JSON ({exc})") from exc
        try:
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise ValueError(f"'format' is not {_FORMAT!r}")
            if meta.get("version") != _VERSION:
                raise ValueError(f"unsupported version {meta.get('version')!r}")
            scales = validate_scales(meta["scales"])
            spec = FeatureSpec.from_dict(meta["feature_spec"])
            params = dict(meta.get("estimator_params", {}))
            if "hidden" in params:
                params["hidden"] = tuple(params["hidden"])
            knob = meta["knob"]
            router = cls(
                estimator=meta["estimator"],
                policy=meta["policy"],
                knob=float("nan") if knob is None else float(knob),
                fallback_out_of_range=bool(meta["fallback_out_of_range"]),
                range_margin=spec.margin,
                **params,
            )
            onnx_name = str(meta["onnx"]["file"])
            checksum = str(meta["onnx"]["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RouterFileError(f"{meta_path}: malformed router file: {what}") from exc
        if expected_scales is not None and tuple(expected_scales) != scales:
            raise ValueError(
                f"router at {folder} was trained for scales {scales} but the model runs "
                f"scales {tuple(expected_scales)}; retrain or pick the matching router"
            )
        onnx_path = folder / onnx_name
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path}: ONNX model named in router.json is missing")
        if sha256_file(onnx_path) != checksum:
            raise RouterFileError(
                f"{onnx_path}: contents do not match the sha256 in {meta_path} "
                "(the file was changed or belongs to another router)"
            )
        router._model = OnnxProbabilityModel(onnx_path, spec.width, len(scales), providers)
        router._scales, router._spec = scales, spec
        return router
