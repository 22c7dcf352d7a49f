"""ProbeRouter: the parts the probe policies route with, saved as one folder.

A probe router folder holds `probe.json` (policy, knob, gate threshold, probe scales), `gate/`
(a `ScaleRouter` on the free router features, which also drives the drift monitor) and one
`probe-<scale>/` per probe scale (a `ScaleRouter` on the free features followed by the probe
features of that scale's prefill), each a normal router folder with its own `router.json` and
`model.onnx`; `calibration.json` and `drift.json` sit beside them as in any router folder.
Pure numpy and ONNX: the caller computes features and runs the prefills.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from predictor.policies import (
    PROBE_POLICIES,
    ProbeScores,
    apply_policy,
    get_policy,
    relative_cost,
)
from predictor.routers.scale_router import ScaleRouter
from predictor.serving import RouterFileError

__all__ = ["PROBE_JSON", "GATE_DIR", "ProbeRouter", "load_router", "stage_dir"]

PROBE_JSON, GATE_DIR = "probe.json", "gate"
_FORMAT, _VERSION = "adaptive-m3/probe-router", 1


def stage_dir(scale: int) -> str:
    return f"probe-{int(scale)}"


class ProbeRouter:
    """A gate `ScaleRouter` and one `ScaleRouter` per probe scale, with the probe policy's
    knob and the gate threshold.

    `stages` maps a probe scale (a visual-token count) to its router, whose features are the
    gate's followed by that scale's probe features. `scores` turns features into the
    `ProbeScores` the probe policies read; `route` applies a policy to them offline.
    """

    def __init__(
        self,
        gate: ScaleRouter,
        stages: Mapping[int, ScaleRouter],
        policy: str = "probe-cascade",
        knob: float = float("nan"),
        gate_threshold: float = 0.0,
    ) -> None:
        if not stages:
            raise ValueError("a probe router needs at least one probe scale")
        self.gate = gate
        self.stages = {int(s): r for s, r in sorted(stages.items())}
        scales = gate.scales_
        for scale, router in self.stages.items():
            if scale not in scales or router.scales_ != scales:
                raise ValueError(
                    f"probe router for scale {scale} predicts scales {router.scales_}; the gate "
                    f"predicts {scales} and the probe scale must be one of them"
                )
            names, base = router.feature_spec_.names, gate.feature_spec_.names
            if names[: len(base)] != base or len(names) == len(base):
                raise ValueError(
                    f"probe router for scale {scale} must read the gate's {len(base)} features "
                    f"followed by probe features; it reads {len(names)} ({', '.join(names[:2])}, "
                    "...)"
                )
        self.policy, self.knob, self.gate_threshold = "probe-cascade", float("nan"), 0.0
        self.set_params(policy=policy, knob=knob, gate_threshold=gate_threshold)

    def set_params(self, **params: object) -> ProbeRouter:
        """policy (a probe policy, or "fixed" with the scale as knob: what an uncertified
        accuracy loss falls back to), knob, gate_threshold."""
        unknown = set(params) - {"policy", "knob", "gate_threshold"}
        if unknown:
            raise ValueError(f"ProbeRouter takes policy, knob and gate_threshold, not {unknown}")
        policy = str(params.get("policy", self.policy))
        if policy not in (*PROBE_POLICIES, "fixed"):
            raise ValueError(f"a probe router serves {PROBE_POLICIES} (or fixed), not {policy!r}")
        self.policy = policy
        self.knob = float(params.get("knob", self.knob))  # type: ignore[arg-type]
        self.gate_threshold = float(params.get("gate_threshold", self.gate_threshold))  # type: ignore[arg-type]
        return self

    @property
    def scales_(self) -> tuple[int, ...]:
        return self.gate.scales_

    @property
    def feature_spec_(self):
        """The free features every sample gets before any prefill (what drift monitors)."""
        return self.gate.feature_spec_

    @property
    def probe_scales(self) -> tuple[int, ...]:
        return tuple(self.stages)

    def probe_width(self, scale: int) -> int:
        """How many probe features the router of `scale` reads after the gate's."""
        return self.stages[scale].feature_spec_.width - self.gate.feature_spec_.width

    def scores(self, X: np.ndarray, probes: Mapping[int, np.ndarray]) -> ProbeScores:
        """`ProbeScores` from the free features `X` (n, F) and each probe scale's probe
        features (n, P), every sample at every probe scale (labels, not serving)."""
        stages = {}
        for scale, router in self.stages.items():
            if scale not in probes:
                raise ValueError(f"no probe features at scale {scale}")
            stages[self.scales_.index(scale)] = router.predict_proba(np.hstack([X, probes[scale]]))
        return ProbeScores(stages, self.gate.predict_proba(X), self.gate_threshold)

    def route(
        self,
        X: np.ndarray,
        probes: Mapping[int, np.ndarray],
        knob: float | None = None,
        policy: str | None = None,
        costs: Sequence[float] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(chosen scale VALUES (n,), prefills paid (n, S)) of the policy on full arrays;
        `costs` is the per-scale token cost (default the scales)."""
        policy = self.policy if policy is None else policy
        get_policy(policy)
        knob = self.knob if knob is None else float(knob)
        cost = relative_cost(self.scales_ if costs is None else costs)
        idx, paid = apply_policy(policy, self.scores(X, probes), knob, self.scales_, cost)
        return np.asarray(self.scales_, dtype=np.int64)[idx], paid

    def gate_route(
        self, X: np.ndarray, costs: Sequence[float] | np.ndarray | None = None
    ) -> np.ndarray:
        """The gate's own scales: the utility policy at this router's knob, the routing the
        drift monitor compares traffic with (the probe policies decide later, per stage)."""
        return self.gate.route(X, knob=self.knob, policy="utility", costs=costs)

    def save(self, directory: str | Path) -> Path:
        """The parts and probe.json into `directory`; the gate is saved with the policy and
        knob of `gate_route`, and is a router folder of its own."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        gate = copy.copy(self.gate)  # the same fitted gate may serve other folders
        gate.set_params(policy="utility", knob=self.knob)
        gate.save(out / GATE_DIR)
        for scale, router in self.stages.items():
            router.save(out / stage_dir(scale))
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "policy": self.policy,
            "knob": self.knob if math.isfinite(self.knob) else None,
            "gate_threshold": self.gate_threshold,
            "probe_scales": list(self.probe_scales),
        }
        (out / PROBE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expected_scales: Sequence[int] | None = None,
        providers: Sequence[str] | None = None,
    ) -> ProbeRouter:
        """Load every part onto onnxruntime; errors name the file at fault."""
        folder = Path(directory)
        path = folder / PROBE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path}: probe.json is missing")
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise ValueError(f"'format' is not {_FORMAT!r}")
            if meta.get("version") != _VERSION:
                raise ValueError(f"unsupported version {meta.get('version')!r}")
            policy, knob = str(meta["policy"]), meta["knob"]
            threshold = float(meta["gate_threshold"])
            probe_scales = [int(s) for s in meta["probe_scales"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RouterFileError(f"{path}: malformed probe router file: {what}") from exc
        gate = ScaleRouter.load(folder / GATE_DIR, expected_scales, providers)
        stages = {
            s: ScaleRouter.load(folder / stage_dir(s), expected_scales, providers)
            for s in probe_scales
        }
        try:
            return cls(
                gate,
                stages,
                policy,
                float("nan") if knob is None else float(knob),
                threshold,
            )
        except ValueError as exc:
            raise RouterFileError(f"{path}: {exc}") from exc


def load_router(
    directory: str | Path,
    expected_scales: Sequence[int] | None = None,
    providers: Sequence[str] | None = None,
) -> ScaleRouter | ProbeRouter:
    """The router in a folder: a `ProbeRouter` where it holds probe.json, else a
    `ScaleRouter`."""
    folder = Path(directory)
    if (folder / PROBE_JSON).is_file():
        return ProbeRouter.load(folder, expected_scales, providers)
    return ScaleRouter.load(folder, expected_scales, providers)
