"""`AdaptiveLMM`: encode each image once, route it to a scale, generate grouped by scale.

The user-facing entry point of the library: a `NestedLMM` plus (optionally) a `ScaleRouter`
folder. With a router, every sample gets the scale the router's policy picks from features of
the encoding already in memory; a call-time budget ("tokens<=20", "loss<=0.01@0.1") re-picks
the knob from the folder's `calibration.json` without labels. Without a router, "auto" is the
confidence cascade: answer at the smallest scale and re-ask only the unsure samples one scale
up, paying for every attempt.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m3core.features import feature_names, router_features
from m3core.lmm import (
    EncodedImages,
    GenerationRecord,
    NestedLMM,
    Prompts,
    check_images,
    check_questions,
)
from predictor.calibrate import CALIBRATION_JSON, TuneResult, knob_for_target, load_calibration
from predictor.routers.scale_router import ROUTER_JSON, ScaleRouter

__all__ = ["AdaptiveLMM", "AdaptiveRecord", "DEFAULT_CASCADE_THRESHOLD"]

DEFAULT_CASCADE_THRESHOLD = -0.1
"""Mean token log-probability an answer needs to stop the cascade (a geometric-mean token
probability of about 0.9); raise it toward 0 to spend more tokens, lower it to spend fewer."""

_ROUTER_POLICIES = ("threshold", "utility")


@dataclass
class AdaptiveRecord:
    """One answer and what it cost.

    `visual_tokens` counts every attempt (a cascade that ran 1 then 9 tokens spent 10);
    `route_seconds` is this sample's equal share of the batch's routing time (features plus
    router), so summing it over a call gives the call's routing overhead.
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

    `router` (optional) must have been trained for `lmm.scales` on `m3core.features` of
    this model; `calibration` is a `predictor.calibration_table` of that router's scores,
    needed only for call-time budgets. After each `generate`, `last_timing` holds
    `encode_s` (images and prompts, both needed at any scale), `route_s`, `generate_s`,
    `total_s`, `route_share` and `n`.
    """

    def __init__(
        self,
        lmm: NestedLMM,
        router: ScaleRouter | None = None,
        calibration: Mapping[str, object] | None = None,
        *,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        router_dir: str | Path | None = None,
    ) -> None:
        self.lmm = lmm
        self.router = router
        self.calibration = dict(calibration) if calibration is not None else None
        self.cascade_threshold = float(cascade_threshold)
        self.router_dir = Path(router_dir) if router_dir is not None else None
        self.last_timing: dict[str, float] = {}
        if router is not None:
            self._check_router(router)
        if self.calibration is not None:
            scales = tuple(self.calibration.get("scales", ()))
            if scales != lmm.scales:
                raise ValueError(
                    f"{self._where(CALIBRATION_JSON)} was computed for scales {scales} but the "
                    f"model runs scales {lmm.scales}; rerun `adaptive-m3 tune`"
                )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        router_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
    ) -> AdaptiveLMM:
        """Load the model and, if given, the router folder (router.json, model.onnx and the
        optional calibration.json). A router trained for other scales fails here, not later."""
        lmm = NestedLMM.from_pretrained(model_dir, device=device, dtype=dtype)
        router = calibration = None
        if router_dir is not None:
            router = ScaleRouter.load(router_dir, expected_scales=lmm.scales)
            calibration = load_calibration(router_dir)
        return cls(
            lmm, router, calibration, cascade_threshold=cascade_threshold, router_dir=router_dir
        )

    @property
    def scales(self) -> tuple[int, ...]:
        return self.lmm.scales

    def _where(self, name: str) -> str:
        return str(self.router_dir / name) if self.router_dir is not None else name

    def _check_router(self, router: ScaleRouter) -> None:
        if tuple(router.scales) != self.scales:
            raise ValueError(
                f"router was trained for scales {tuple(router.scales)} but the model runs "
                f"scales {self.scales}; retrain or pick the matching router"
            )
        names = feature_names(self.lmm)
        spec = router.feature_spec
        generic = spec.names == tuple(f"f{j}" for j in range(spec.width))
        if spec.width != len(names) or (not generic and spec.names != tuple(names)):
            raise ValueError(
                f"{self._where(ROUTER_JSON)}: router expects {spec.width} features "
                f"({', '.join(spec.names[:3])}, ...) but this model gives {len(names)} "
                f"({', '.join(names[:3])}, ...); it was trained on another model's features"
            )

    # -- deciding -------------------------------------------------------------------------
    def resolve_budget(self, budget: str | Mapping[str, object] | TuneResult) -> TuneResult:
        """The policy and knob a budget asks for, from the router folder's calibration.json."""
        if isinstance(budget, TuneResult):
            return budget
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
            return "cascade", float(c)
        if policy in _ROUTER_POLICIES and self.router is None:
            raise ValueError(f"policy {policy!r} needs a router; load one with router_dir=")
        if policy == "fixed":
            self._valid_scale(knob)
        elif policy not in (*_ROUTER_POLICIES, "cascade"):
            raise ValueError(
                f"cannot serve policy {policy!r}; use threshold, utility, cascade or fixed"
            )
        return policy, knob

    def _valid_scale(self, scale: object) -> int:
        ok = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
        if not ok or int(scale) != scale or int(scale) not in self.scales:  # type: ignore[arg-type]
            raise ValueError(
                f"scale must be 'auto' or one of this model's scales {list(self.scales)}, "
                f"got {scale!r}"
            )
        return int(scale)  # type: ignore[arg-type]

    def route(
        self,
        encoded: EncodedImages,
        questions: Sequence[str] | Prompts,
        policy: str | None = None,
        knob: float | None = None,
    ) -> np.ndarray:
        """Router-chosen scale values (n,) for already encoded (and tokenized) samples."""
        if self.router is None:
            raise ValueError("no router is loaded; load one with router_dir=")
        X = router_features(self.lmm, encoded, questions)
        costs = None
        if self.calibration is not None:
            costs = self.calibration.get("token_costs")
        return self.router.route(X, knob=knob, policy=policy, costs=costs)

    # -- generating -----------------------------------------------------------------------
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
    ) -> list[AdaptiveRecord]:
        """Answer every (image, question) pair, in input order.

        `scale="auto"` routes (router policy and knob, or `budget` re-tuned from
        calibration.json) or, without a router, runs the confidence cascade; an int runs
        every sample at that scale. Samples are grouped by scale and generated in batches of
        `batch_size`, so each batch has one visual sequence length. Bad input raises
        ValueError naming the sample.
        """
        images, questions = list(images), list(questions)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(
                f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}"
            )
        fixed = None
        if not (isinstance(scale, str) and scale == "auto"):
            fixed = self._valid_scale(scale)
            if budget is not None:
                raise ValueError("a budget needs scale='auto'; a fixed scale has no knob to tune")
        check_questions(questions)
        images = check_images(images)
        policy, knob = ("fixed", float(fixed)) if fixed is not None else (None, None)
        if policy is None:
            policy, knob = self._decision(budget, cascade_threshold)
        self.last_timing = {"n": len(questions), "encode_s": 0.0, "route_s": 0.0}
        if not questions:
            self.last_timing |= {"generate_s": 0.0, "total_s": 0.0, "route_share": 0.0}
            return []

        start = time.perf_counter()
        encoded = self.lmm.encode(images, batch_size=batch_size)
        prompts = self.lmm.tokenize(questions)
        routed = time.perf_counter()
        self.last_timing["encode_s"] = routed - start
        if policy == "cascade":
            records = self._cascade(encoded, prompts, knob, max_new_tokens, batch_size)
        else:
            if policy == "fixed":
                chosen, routed_by = [int(knob)] * len(questions), "fixed"
            else:
                chosen = self.route(encoded, prompts, policy, knob).tolist()
                routed_by = "router"
                self.last_timing["route_s"] = time.perf_counter() - routed
            records = self._grouped(encoded, prompts, chosen, max_new_tokens, batch_size)
            share = self.last_timing["route_s"] / len(questions)
            for r in records:
                r.routed_by, r.route_seconds = routed_by, share
        end = time.perf_counter()
        route_s = self.last_timing["route_s"]
        self.last_timing |= {
            "generate_s": end - routed - route_s,
            "total_s": end - start,
            "route_share": route_s / (end - start),
        }
        return records

    def _grouped(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        chosen: list[int],
        max_new_tokens: int,
        batch_size: int,
    ) -> list[AdaptiveRecord]:
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
                out[i] = _record(answer, [int(scale)], "fixed")
        return out  # type: ignore[return-value]

    def _cascade(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        threshold: float,
        max_new_tokens: int,
        batch_size: int,
    ) -> list[AdaptiveRecord]:
        """Smallest scale first; a sample moves up while its answer's confidence < threshold
        (the same rule as `predictor.cascade_policy`, so a calibrated knob means the same)."""
        final: list[GenerationRecord | None] = [None] * len(prompts)
        tried: list[list[int]] = [[] for _ in range(len(prompts))]
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
            last = step == len(self.scales) - 1
            unsure = []
            for i, answer in zip(pending, answers, strict=True):
                final[i] = answer
                tried[i].append(scale)
                if not last and not answer.confidence >= threshold:
                    unsure.append(i)
            pending = unsure
        return [_record(a, t, "cascade") for a, t in zip(final, tried, strict=True)]  # type: ignore[arg-type]

    def __repr__(self) -> str:
        router = None
        if self.router is not None:
            router = {"policy": self.router.policy, "knob": self.router.knob}
        info = {
            **self.lmm.describe(),
            "router": router,
            "calibrated": self.calibration is not None,
            "cascade_threshold": self.cascade_threshold,
        }
        return f"AdaptiveLMM({json.dumps(info)})"


def _record(answer: GenerationRecord, tried: list[int], routed_by: str) -> AdaptiveRecord:
    return AdaptiveRecord(
        text=answer.text,
        scale=answer.scale,
        visual_tokens=sum(tried),
        confidence=answer.confidence,
        token_ids=answer.token_ids,
        routed_by=routed_by,
        tried_scales=tried,
    )
