"""`AdaptiveLMM`: encode each image once, route it to a scale, generate grouped by scale.

The user-facing entry point of the library: a `NestedLMM` plus (optionally) a `ScaleRouter`
folder. With a router, every sample gets the scale the router's policy picks from features of
the encoding already in memory; a call-time budget ("tokens<=20", "loss<=0.01@0.1") re-picks
the knob from the folder's `calibration.json` without labels. Without a router, "auto" is the
confidence cascade: answer at the smallest scale and re-ask only the unsure samples one scale
up, paying for every attempt.

A probe router folder (`predictor.ProbeRouter`) serves the probe policies: every sample's free
features go to the gate; samples are answered (probe-cascade) or only prefilled (probe) at the
probe scales with `generate(..., probe=True)`, whose own prefill gives the probe features; the
probe router of that scale keeps each answer or sends the sample on, and the rest are answered
at their scale, grouped by scale. Every prefill a sample paid is in its record.

Every sample is checked once, at `NestedLMM.check` (the error names it); a router folder with
`drift.json` also has every call's features compared with its calibration data
(`predictor.drift`): the score lands in `last_timing`, a `DriftWarning` is issued once, and
`on_drift="conservative"` serves routed samples at the largest scale while drift lasts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.validation import check_count
from m3core.features import feature_names, probe_feature_names, router_features
from m3core.lmm import CheckedSamples, EncodedImages, GenerationRecord, NestedLMM, Prompts
from predictor.calibrate import CALIBRATION_JSON, TuneResult, knob_for_target, load_calibration
from predictor.drift import DRIFT_JSON, DriftMonitor, DriftReference, load_drift_reference
from predictor.policies import ORACLE_CLASS, POLICIES, PROBE_POLICIES, StagedRoute, relative_cost
from predictor.routers.probe_router import PROBE_JSON, ProbeRouter, load_router, stage_dir
from predictor.routers.scale_router import ROUTER_JSON, ScaleRouter

__all__ = ["AdaptiveLMM", "AdaptiveRecord", "DEFAULT_CASCADE_THRESHOLD", "ON_DRIFT"]

DEFAULT_CASCADE_THRESHOLD = -0.1
"""Mean token log-probability an answer needs to stop the cascade (a geometric-mean token
probability of about 0.9); raise it toward 0 to spend more tokens, lower it to spend fewer."""

ON_DRIFT = ("warn", "conservative")
"""What happens while the drift monitor reports drift: warn once and route as usual, or also
serve every routed sample at the largest scale (`routed_by="drift"`)."""
_SERVED = tuple(name for name, p in POLICIES.items() if p.scores != ORACLE_CLASS)
"""Every policy but the oracle-scale classifier's: the router's, the cascade, a fixed scale."""


@dataclass
class AdaptiveRecord:
    """One answer and what it cost.

    `visual_tokens` counts every attempt (a cascade that ran 1 then 9 tokens spent 10) and
    `tried_scales` lists them in order (a scale twice where the probe policy's prefill was at
    the scale it then answered at); `route_seconds` is this sample's equal share of the
    batch's routing time (features, routers, and the probe calls whose answers were not
    kept), so summing it over a call gives the call's routing overhead. `routed_by` is "router",
    "probe", "probe-cascade", "cascade", "fixed", or "drift" (served at the largest scale
    under drift).
    """

    text: str
    scale: int
    visual_tokens: int
    confidence: float
    token_ids: list[int]
    routed_by: str
    tried_scales: list[int] = field(default_factory=list)
    route_seconds: float = 0.0


class AdaptiveLMM:
    """A Matryoshka LMM that spends visual tokens only where a question needs them.

    `router` (optional; a `ScaleRouter` or a probe policies' `ProbeRouter`) must have been
    trained for `lmm.scales` on `m3core.features` of this model; `calibration` is a
    `predictor.calibration_table` of that router's scores,
    needed only for call-time budgets; `drift` (the router folder's `drift.json`) turns on the
    drift monitor over the last `drift_window` samples. After each `generate`, `last_timing`
    holds `encode_s` (images and prompts, both needed at any scale), `route_s` (features,
    routers, and for the probe policies every probe call whose answer was not kept),
    `probe_prefill_s` (the prefill time of every probe call, kept or not), `generate_s`,
    `total_s`, `route_share` and `n`, plus `drift_score`, `drift_p` and `drift_n` when
    monitoring; `last_drift` holds the full `DriftReport`.
    """

    def __init__(
        self,
        lmm: NestedLMM,
        router: ScaleRouter | ProbeRouter | None = None,
        calibration: Mapping[str, object] | None = None,
        *,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        router_dir: str | Path | None = None,
        drift: DriftReference | None = None,
        on_drift: str = "warn",
        drift_window: int = 512,
    ) -> None:
        self.lmm = lmm
        self.router = router
        self.calibration = dict(calibration) if calibration is not None else None
        self.cascade_threshold = _threshold(cascade_threshold)
        self.router_dir = Path(router_dir) if router_dir is not None else None
        if on_drift not in ON_DRIFT:
            raise ValueError(f"on_drift must be one of {ON_DRIFT}, got {on_drift!r}")
        self.on_drift = on_drift
        self.last_timing: dict[str, float] = {}
        self.last_drift = None
        self.last_drift_stats: np.ndarray | None = None
        if router is not None:
            self._check_router(router)
        if self.calibration is not None:
            scales = tuple(self.calibration.get("scales", ()))
            if scales != lmm.scales:
                raise ValueError(
                    f"{self._where(CALIBRATION_JSON)} was computed for scales {scales} but the "
                    f"model runs scales {lmm.scales}; rerun `adaptive-m3 tune`"
                )
        self.monitor = None
        if drift is not None:
            self._check_drift(drift)
            self.monitor = DriftMonitor(drift, window=drift_window)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        router_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        on_drift: str = "warn",
    ) -> AdaptiveLMM:
        """Load the model and, if given, the router folder (router.json and model.onnx, or a
        probe router's probe.json and parts, and the optional calibration.json and
        drift.json). A router trained for other scales fails here, not later."""
        lmm = NestedLMM.from_pretrained(model_dir, device=device, dtype=dtype)
        return cls.with_router(lmm, router_dir, cascade_threshold, on_drift)

    @classmethod
    def with_router(
        cls,
        lmm: NestedLMM,
        router_dir: str | Path | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        on_drift: str = "warn",
    ) -> AdaptiveLMM:
        """`from_pretrained` on a model already loaded: several router folders, one model."""
        router = calibration = drift = None
        if router_dir is not None:
            router = load_router(router_dir, expected_scales=lmm.scales)
            calibration = load_calibration(router_dir)
            drift = load_drift_reference(router_dir)
        return cls(
            lmm,
            router,
            calibration,
            cascade_threshold=cascade_threshold,
            router_dir=router_dir,
            drift=drift,
            on_drift=on_drift,
        )

    @property
    def scales(self) -> tuple[int, ...]:
        return self.lmm.scales

    def _where(self, name: str) -> str:
        return str(self.router_dir / name) if self.router_dir is not None else name

    @property
    def gate(self) -> ScaleRouter | None:
        """The router on the free features: the router itself, or a probe router's gate."""
        return self.router.gate if isinstance(self.router, ProbeRouter) else self.router

    def _check_router(self, router: ScaleRouter | ProbeRouter) -> None:
        if router.scales_ != self.scales:
            raise ValueError(
                f"router was trained for scales {router.scales_} but the model runs "
                f"scales {self.scales}; retrain or pick the matching router"
            )
        names = feature_names(self.lmm)
        parts = [(ROUTER_JSON, router, names)]
        if isinstance(router, ProbeRouter):
            probe = names + probe_feature_names(self.lmm)
            parts = [(f"gate/{ROUTER_JSON}", router.gate, names)] + [
                (f"{stage_dir(s)}/{ROUTER_JSON}", part, probe) for s, part in router.stages.items()
            ]
        for where, part, expected in parts:
            spec = part.feature_spec_
            generic = spec.names == tuple(f"f{j}" for j in range(spec.width))
            if spec.width != len(expected) or (not generic and spec.names != tuple(expected)):
                raise ValueError(
                    f"{self._where(where)}: router expects {spec.width} features "
                    f"({', '.join(spec.names[:3])}, ...) but this model gives {len(expected)} "
                    f"({', '.join(expected[:3])}, ...); it was trained on another model's features"
                )

    def _check_drift(self, drift: DriftReference) -> None:
        if self.router is None:
            raise ValueError("a drift reference describes a router's inputs; load the router too")
        spec = self.router.feature_spec_
        if tuple(drift.scales) != self.scales or drift.width != spec.width:
            raise ValueError(
                f"{self._where(DRIFT_JSON)} describes {drift.width} features at scales "
                f"{tuple(drift.scales)}, but the router takes {spec.width} at {self.scales}; "
                "rerun `adaptive-m3 tune`"
            )

    # -- deciding -------------------------------------------------------------------------
    def resolve_budget(self, budget: str | Mapping[str, object] | TuneResult) -> TuneResult:
        """The policy and knob a budget asks for, from the router folder's calibration.json."""
        if isinstance(budget, TuneResult):
            return budget
        if not isinstance(budget, str | Mapping):
            raise ValueError(
                "budget must be a target such as 'tokens<=20' or 'loss<=0.01@0.1', a dict such "
                f"as {{'metric': 'tokens', 'value': 20}}, or a TuneResult; got "
                f"{type(budget).__name__}"
            )
        if self.calibration is None:
            where = (
                f"router folder {self.router_dir} has no {CALIBRATION_JSON}"
                if self.router_dir is not None
                else f"no calibration table ({CALIBRATION_JSON}) is loaded"
            )
            raise ValueError(
                f"a call-time budget needs a calibrated router: {where}; run `adaptive-m3 "
                "tune` on labelled calibration data to write it"
            )
        return knob_for_target(self.calibration, budget)

    def _decision(self, budget: object, cascade_threshold: float | None) -> tuple[str, float]:
        """(policy, knob): the router's own, a budget's, or the cascade's threshold."""
        if budget is not None:
            tuned = self.resolve_budget(budget)  # type: ignore[arg-type]
            policy, knob = tuned.policy, float(tuned.knob)
        elif self.router is not None:
            policy, knob = self.router.policy, float(self.router.knob)
            if not math.isfinite(knob):
                raise ValueError(
                    f"{self._where(ROUTER_JSON)} holds no knob; pass budget= or rerun tuning"
                )
        else:
            c = self.cascade_threshold if cascade_threshold is None else cascade_threshold
            return "cascade", _threshold(c)
        if policy not in _SERVED:
            raise ValueError(f"cannot serve policy {policy!r}; use one of {_SERVED}")
        if POLICIES[policy].needs_router and self.router is None:
            raise ValueError(f"policy {policy!r} needs a router; load one with router_dir=")
        if POLICIES[policy].needs_probe and not isinstance(self.router, ProbeRouter):
            raise ValueError(
                f"policy {policy!r} needs a probe router folder ({PROBE_JSON}); load one with "
                "router_dir="
            )
        if policy == "fixed":
            self._valid_scale(knob)
        return policy, knob

    def _valid_scale(self, scale: object) -> int:
        try:
            return self.lmm.check_scale(scale)
        except ValueError:
            raise ValueError(
                f"scale must be 'auto' or one of this model's scales {list(self.scales)}, "
                f"got {scale!r}"
            ) from None

    def _plan(
        self,
        scale: object,
        budget: object,
        cascade_threshold: float | None,
        max_new_tokens: object,
        batch_size: object,
    ) -> tuple[str, float]:
        """(policy, knob) for a call, every call-level argument checked before any sample."""
        check_count("max_new_tokens", max_new_tokens)
        check_count("batch_size", batch_size)
        if cascade_threshold is not None:
            _threshold(cascade_threshold)
        if isinstance(scale, str) and scale == "auto":
            return self._decision(budget, cascade_threshold)
        fixed = self._valid_scale(scale)
        if budget is not None:
            raise ValueError("a budget needs scale='auto'; a fixed scale has no knob to tune")
        return "fixed", float(fixed)

    def route(
        self,
        encoded: EncodedImages,
        questions: Sequence[str] | Prompts,
        policy: str | None = None,
        knob: float | None = None,
    ) -> np.ndarray:
        """Router-chosen scale values (n,) for already encoded (and tokenized) samples.

        The probe policies prefill samples at their probe scales to decide, one token each:
        probe-cascade's decisions read only each prefill, so they are those `generate` makes."""
        if self.router is None:
            raise ValueError("no router is loaded; load one with router_dir=")
        prompts = questions if isinstance(questions, Prompts) else self.lmm.tokenize(questions)
        X = router_features(self.lmm, encoded, prompts)
        policy = self.router.policy if policy is None else policy
        knob = self.router.knob if knob is None else knob
        if policy in PROBE_POLICIES:
            route = self._probe_route(encoded, prompts, X, policy, float(knob), 1, len(X))
            return np.asarray(self.scales, dtype=np.int64)[route[0].current]
        return self.gate.route(X, knob=knob, policy=policy, costs=self._token_costs())  # type: ignore[union-attr]

    def _token_costs(self) -> list[float] | None:
        return None if self.calibration is None else self.calibration.get("token_costs")

    # -- generating -----------------------------------------------------------------------
    def check(
        self,
        images: Sequence[object],
        questions: Sequence[object],
        ids: Sequence[object] | None = None,
        *,
        scale: str | int = "auto",
        budget: str | Mapping[str, object] | TuneResult | None = None,
        max_new_tokens: int = 8,
    ) -> CheckedSamples:
        """`NestedLMM.check` against the largest scale this call may run: what `generate`
        checks, for callers that answer the good samples and record the bad ones."""
        policy, knob = self._plan(scale, budget, None, max_new_tokens, 1)
        return self._check(images, questions, ids, policy, knob, max_new_tokens)

    def _check(self, images, questions, ids, policy: str, knob: float, max_new_tokens: int):
        largest = int(knob) if policy == "fixed" else self.scales[-1]
        return self.lmm.check(
            images, questions, ids, largest_scale=largest, max_new_tokens=max_new_tokens
        )

    def generate(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        scale: str | int = "auto",
        budget: str | Mapping[str, object] | TuneResult | None = None,
        max_new_tokens: int = 8,
        batch_size: int = 32,
        cascade_threshold: float | None = None,
        ids: Sequence[object] | None = None,
    ) -> list[AdaptiveRecord]:
        """Answer every (image, question) pair, in input order.

        `scale="auto"` routes (router policy and knob, or `budget` re-tuned from
        calibration.json) or, without a router, runs the confidence cascade; an int runs
        every sample at that scale. Samples are grouped by scale and generated in batches of
        `batch_size`, so each batch has one visual sequence length. Bad input raises
        ValueError: call arguments first, then the first bad sample, named by its `ids`
        entry (default its position); `check` + `generate_checked` answer the rest instead.
        """
        policy, knob = self._plan(scale, budget, cascade_threshold, max_new_tokens, batch_size)
        checked = self._check(images, questions, ids, policy, knob, max_new_tokens)
        return self._answer(checked.raise_first(), policy, knob, max_new_tokens, batch_size)

    def generate_checked(
        self,
        checked: CheckedSamples,
        *,
        scale: str | int = "auto",
        budget: str | Mapping[str, object] | TuneResult | None = None,
        max_new_tokens: int = 8,
        batch_size: int = 32,
        cascade_threshold: float | None = None,
    ) -> list[AdaptiveRecord]:
        """`generate` for the samples `check` kept (its `errors` are the caller's to record),
        one record per kept sample, nothing checked twice."""
        policy, knob = self._plan(scale, budget, cascade_threshold, max_new_tokens, batch_size)
        return self._answer(checked, policy, knob, max_new_tokens, batch_size)

    def _answer(
        self,
        checked: CheckedSamples,
        policy: str,
        knob: float,
        max_new_tokens: int,
        batch_size: int,
    ) -> list[AdaptiveRecord]:
        n = len(checked)
        self.last_timing = {"n": n, "encode_s": 0.0, "route_s": 0.0, "probe_prefill_s": 0.0}
        self.last_drift_stats = None
        if n == 0:
            self.last_timing |= {"generate_s": 0.0, "total_s": 0.0, "route_share": 0.0}
            return []

        start = time.perf_counter()
        encoded = self.lmm.encode(checked.images, batch_size=batch_size)
        prompts = checked.prompts
        routed = time.perf_counter()
        self.last_timing["encode_s"] = routed - start
        X, chosen = self._route_and_monitor(encoded, prompts, policy, knob)
        if X is not None:
            self.last_timing["route_s"] = time.perf_counter() - routed
        if policy != "fixed" and self.on_drift == "conservative" and self._drifted():
            policy, chosen = "drift", [self.scales[-1]] * n
        first = None
        if policy == "cascade":
            records, first = self._cascade(encoded, prompts, knob, max_new_tokens, batch_size)
        elif policy in POLICIES and POLICIES[policy].needs_probe:
            records = self._staged(encoded, prompts, X, policy, knob, max_new_tokens, batch_size)
        else:
            if policy == "fixed":
                chosen, routed_by = [int(knob)] * n, "fixed"
            else:
                routed_by = "drift" if policy == "drift" else "router"
            records = self._grouped(encoded, prompts, chosen, max_new_tokens, batch_size)
            for r in records:
                r.routed_by = routed_by
            smallest = policy == "fixed" and int(knob) == self.scales[0]
            first = [r.confidence for r in records] if smallest else None  # never a routed subset
        share = self.last_timing["route_s"] / n
        for r in records:
            r.route_seconds = share
        self._report_drift(first)
        end = time.perf_counter()
        route_s = self.last_timing["route_s"]
        self.last_timing |= {
            "generate_s": end - routed - route_s,
            "total_s": end - start,
            "route_share": route_s / (end - start),
        }
        return records

    def _route_and_monitor(
        self, encoded: EncodedImages, prompts: Prompts, policy: str, knob: float
    ) -> tuple[np.ndarray | None, list[int] | None]:
        """(the free router features, the router's scales for this call): None without a
        router or when nothing needs them; scales only for a router policy. The drift monitor
        is fed the features and the gate router's own choice."""
        entry = POLICIES.get(policy)
        routing = entry is not None and entry.needs_router
        probing = entry is not None and entry.needs_probe
        gate = self.gate
        if gate is None or not (routing or probing or self.monitor is not None):
            return None, None
        X = router_features(self.lmm, encoded, prompts)
        costs = self._token_costs()
        own = None
        if routing or self.monitor is not None:
            own = (
                self.router.gate_route(X, costs)
                if isinstance(self.router, ProbeRouter)
                else gate.route(X, costs=costs)
            )
        chosen = own
        if routing and (gate is not self.router or (policy, knob) != (gate.policy, gate.knob)):
            chosen = gate.route(X, knob=knob, policy=policy, costs=costs)
        if self.monitor is not None:
            stats = self.monitor.reference.statistics(X, own)
            self.monitor.add(stats)
            self.last_drift_stats = stats
        return X, None if chosen is None or not routing else [int(s) for s in chosen]

    def _drifted(self) -> bool:
        return self.monitor is not None and self.monitor.report().drifted

    def _report_drift(self, smallest_confidence: list[float] | None) -> None:
        """Test the window (with this call's smallest-scale confidences where that scale ran
        for every sample), put the score in `last_timing`, and warn once."""
        if self.monitor is None:
            return
        if smallest_confidence is not None:
            self.monitor.set_confidence(np.asarray(smallest_confidence, dtype=np.float64))
            if self.last_drift_stats is not None:
                self.last_drift_stats[:, -1] = smallest_confidence
        report = self.monitor.report()
        self.last_drift = report
        self.last_timing |= {
            "drift_score": report.score,
            "drift_p": report.p_value,
            "drift_n": float(report.n),
        }
        action = (
            " Serving routed samples at the largest scale while it lasts."
            if self.on_drift == "conservative"
            else " on_drift='conservative' (`run --on-drift conservative`) serves the largest "
            "scale meanwhile."
        )
        self.monitor.warn(report, action, stacklevel=4)  # the caller of generate

    def _grouped(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        chosen: Sequence[int],
        max_new_tokens: int,
        batch_size: int,
    ) -> list[AdaptiveRecord]:
        """Each sample at its scale, one generate call per scale."""
        out: list[AdaptiveRecord | None] = [None] * len(prompts)
        for scale in sorted(set(chosen)):
            rows = [i for i, s in enumerate(chosen) if s == scale]
            answers = self.lmm.generate(
                encoded.select(rows),
                prompts.select(rows),
                scale=int(scale),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            for i, answer in zip(rows, answers, strict=True):
                out[i] = _record(answer, [int(scale)], "fixed", answer.visual_tokens)
        return out  # type: ignore[return-value]

    def _probe_route(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        X: np.ndarray,
        policy: str,
        knob: float,
        max_new_tokens: int,
        batch_size: int,
    ) -> tuple[StagedRoute, list[list[GenerationRecord]], float, float]:
        """Run a probe policy's stages: per stage, generate with the probe at that scale for
        the samples there and feed its probe router. Returns the route, each sample's stage
        records in order, the routing time (the routers, and every probe call whose answer is
        not kept: probe's one-token prefills; probe-cascade's answers that its probe sent on,
        each sample's share of its call) and the prefill time of every probe call."""
        router = self.router
        assert isinstance(router, ProbeRouter)
        n, S = len(prompts), len(self.scales)
        started = time.perf_counter()
        cost = np.broadcast_to(relative_cost(self._token_costs() or self.scales), (n, S))
        gate = router.gate.predict_proba(X) if policy == "probe-cascade" else None
        stages = [self.scales.index(s) for s in router.probe_scales]
        route = StagedRoute(policy, cost, knob, stages, gate, router.gate_threshold)
        spent, prefill = time.perf_counter() - started, 0.0
        done: list[list[GenerationRecord]] = [[] for _ in range(n)]
        for k in route.stages:
            rows = route.at(k)
            if not len(rows):
                continue
            called = time.perf_counter()
            answers = self.lmm.generate(
                encoded.select(rows.tolist()),
                prompts.select(rows.tolist()),
                scale=self.scales[k],
                max_new_tokens=1 if policy == "probe" else max_new_tokens,
                batch_size=batch_size,
                probe=True,
            )
            answered = time.perf_counter()
            probes = np.stack([a.probe for a in answers])
            P = router.stages[self.scales[k]].predict_proba(np.hstack([X[rows], probes]))
            route.observe(k, rows, P)
            discarded = np.mean(~route.answered[rows]) if policy != "probe" else 1.0
            spent += discarded * (answered - called) + time.perf_counter() - answered
            prefill += sum(a.prefill_seconds or 0.0 for a in answers)
            for i, answer in zip(rows, answers, strict=True):
                done[i].append(answer)
        return route, done, spent, prefill

    def _staged(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        X: np.ndarray | None,
        policy: str,
        knob: float,
        max_new_tokens: int,
        batch_size: int,
    ) -> list[AdaptiveRecord]:
        """A probe policy: the stages, then the samples still unanswered at their scale."""
        assert X is not None
        route, done, spent, prefill = self._probe_route(
            encoded, prompts, X, policy, knob, max_new_tokens, batch_size
        )
        self.last_timing["route_s"] += spent
        self.last_timing["probe_prefill_s"] += prefill
        rest = route.remaining().tolist()
        chosen = [self.scales[route.current[i]] for i in rest]
        route.finish()
        answered = self._grouped(
            encoded.select(rest), prompts.select(rest), chosen, max_new_tokens, batch_size
        )
        later = dict(zip(rest, answered, strict=True))
        records = []
        for i, stage in enumerate(done):
            attempts = [*stage, later[i]] if i in later else stage
            tried = [a.scale for a in attempts]
            spent_tokens = sum(a.visual_tokens for a in attempts)
            records.append(_record(attempts[-1], tried, policy, spent_tokens))
        return records

    def _cascade(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        threshold: float,
        max_new_tokens: int,
        batch_size: int,
    ) -> tuple[list[AdaptiveRecord], list[float]]:
        """Smallest scale first; a sample moves up while its answer's confidence < threshold
        (the same rule as `predictor.cascade_policy`, so a calibrated knob means the same).
        Also returns each sample's confidence at the smallest scale."""
        final: list[GenerationRecord | None] = [None] * len(prompts)
        tried: list[list[int]] = [[] for _ in range(len(prompts))]
        first: list[float] = []
        spent = [0] * len(prompts)
        pending = list(range(len(prompts)))
        for step, scale in enumerate(self.scales):
            if not pending:
                break
            answers = self.lmm.generate(
                encoded.select(pending),
                prompts.select(pending),
                scale=scale,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            if step == 0:
                first = [a.confidence for a in answers]
            last = step == len(self.scales) - 1
            unsure = []
            for i, answer in zip(pending, answers, strict=True):
                final[i] = answer
                tried[i].append(scale)
                spent[i] += answer.visual_tokens
                if not last and not answer.confidence >= threshold:
                    unsure.append(i)
            pending = unsure
        records = [
            _record(a, t, "cascade", n)  # type: ignore[arg-type]
            for a, t, n in zip(final, tried, spent, strict=True)
        ]
        return records, first

    def __repr__(self) -> str:
        router = None
        if self.router is not None:
            router = {"policy": self.router.policy, "knob": self.router.knob}
        info = {
            **self.lmm.describe(),
            "router": router,
            "calibrated": self.calibration is not None,
            "cascade_threshold": self.cascade_threshold,
            "drift_monitor": self.monitor is not None,
            "on_drift": self.on_drift,
        }
        return f"AdaptiveLMM({json.dumps(info)})"


def _record(
    answer: GenerationRecord | AdaptiveRecord, tried: list[int], routed_by: str, spent: int
) -> AdaptiveRecord:
    return AdaptiveRecord(
        text=answer.text,
        scale=answer.scale,
        visual_tokens=spent,
        confidence=answer.confidence,
        token_ids=answer.token_ids,
        routed_by=routed_by,
        tried_scales=tried,
    )


def _threshold(value: object) -> float:
    """A cascade threshold: a number, +-inf allowed (run every scale / stop at once), not NaN."""
    try:
        threshold = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        threshold = float("nan")
    if isinstance(value, bool) or math.isnan(threshold):
        raise ValueError(f"cascade_threshold must be a number, got {value!r}")
    return threshold
