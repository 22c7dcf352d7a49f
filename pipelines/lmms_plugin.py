"""`adaptive_m3`: an lmms-eval model that spends visual tokens only where a question needs them.

    lmms-eval --model adaptive_m3 \\
        --model_args pretrained=DIR,router=DIR,scale=auto,budget=tokens<=20 --tasks ...

Registered through the `lmms_eval.models` entry point. model_args: `pretrained` (a model
folder or a shipped name), `router` (a router folder), `scale` ("auto", or one of the model's
scales), `budget` (a call-time budget; needs the router's calibration.json),
`max_new_tokens` (overrides the task's), `chunk` (requests encoded at once),
`cascade_threshold`, plus lmms-eval's own `batch_size` and `device`.

`generate_until` encodes each chunk of requests once, routes them, and generates grouped by
scale (`AdaptiveLMM.generate`). `loglikelihood` scores the continuation at the requested or
routed scale. Every answer's logged `token_counts` carries its `scale`, `visual_tokens` (all
attempts), `tried_scales`, `confidence` and `routed_by`; a request the model cannot take is
answered "" and logged with `skipped: <reason>`. The run's results carry
`throughput.avg_visual_tokens` (and `avg_visual_tokens_<task>`) next to the tasks' metrics.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from m3core.lmm import Prompts
from m3core.modeling import encoder_outputs
from m3core.shipped import resolve_model
from pipelines.adaptive import AdaptiveLMM

DEFAULT_MAX_NEW_TOKENS = 16
_KNOWN_ARGS = ("batch_size", "max_batch_size", "device")


@dataclass
class ScaleCounts(TokenCounts):
    """lmms-eval's per-request token counts plus what the scale decision spent."""

    scale: int | None = None
    visual_tokens: int | None = None
    tried_scales: list[int] = field(default_factory=list)
    confidence: float | None = None
    routed_by: str | None = None
    latency_s: float | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {
            "scale": self.scale,
            "visual_tokens": self.visual_tokens,
            "tried_scales": self.tried_scales or None,
            "confidence": self.confidence,
            "routed_by": self.routed_by,
            "latency_s": self.latency_s,
            "skipped": self.skipped,
        }
        return {**super().to_dict(), **{k: v for k, v in extra.items() if v is not None}}


def question_of(context: str) -> str:
    """The question the model is asked for an lmms-eval context: its own prompt template
    places the image, so `<image>` placeholders in the context are dropped."""
    return context.replace("<image>", " ").strip()


def stop_at(text: str, until: str | Sequence[str] | None) -> str:
    """The text up to the first stop string."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def _flatten(visuals: Any) -> list:
    if isinstance(visuals, list | tuple):
        return [v for item in visuals for v in _flatten(item)]
    return [] if visuals is None else [visuals]


class AdaptiveM3(lmms):
    """lmms-eval's "simple" model interface over `AdaptiveLMM` (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "tiny-m3",
        router: str | None = None,
        scale: str | int = "auto",
        budget: str | None = None,
        max_new_tokens: int | None = None,
        chunk: int = 128,
        cascade_threshold: float | None = None,
        batch_size: int | str | None = None,
        device: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if k not in _KNOWN_ARGS}
        if unknown:
            raise ValueError(
                f"adaptive_m3: unknown model_args {sorted(unknown)}; expected pretrained, "
                "router, scale, budget, max_new_tokens, chunk, cascade_threshold"
            )
        extra = {} if cascade_threshold is None else {"cascade_threshold": cascade_threshold}
        self.adaptive = AdaptiveLMM.from_pretrained(
            resolve_model(str(pretrained)), router, device=device, **extra
        )
        self.lmm = self.adaptive.lmm
        self.scale: str | int = "auto" if str(scale) == "auto" else int(scale)
        if self.scale != "auto" and self.scale not in self.lmm.scales:
            raise ValueError(
                f"adaptive_m3: scale must be 'auto' or one of {list(self.lmm.scales)}, got {scale}"
            )
        if budget is not None and self.scale != "auto":
            raise ValueError("adaptive_m3: a budget needs scale=auto")
        self.budget = budget
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.chunk = int(chunk)

    # -- inputs ----------------------------------------------------------------------------
    def _raw_inputs(self, requests, indices) -> tuple[list, list[str], list[str], list[str]]:
        """(images, questions, names, visual problems) of the requests: each doc's one visual
        and its question, named "<task> doc <id>" for every reason; a doc with none or
        several visuals gets no image and its problem."""
        images, questions, names, problems = [], [], [], []
        for i in indices:
            context, _, doc_to_visual, doc_id, task, split = requests[i].args
            visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
            images.append(visuals[0] if len(visuals) == 1 else None)
            questions.append(question_of(context))
            names.append(f"{task} doc {doc_id}")
            problems.append(
                ""
                if len(visuals) == 1
                else f"sample {names[-1]}: adaptive_m3 answers about exactly one image, "
                f"got {len(visuals)}"
            )
        return images, questions, names, problems

    def _record_errors(self, checked, indices, names, problems, out, value) -> None:
        """Answer each request the model's check refused with `value`, logging why."""
        for error in checked.errors:
            row = names.index(error.sample)
            reason = problems[row] or str(error)
            out[indices[row]] = GenerationResult(value, ScaleCounts(skipped=reason))

    # -- generate_until --------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            kwargs = request.args[1] or {}
            key = {"max_new_tokens": kwargs.get("max_new_tokens"), "until": kwargs.get("until")}
            groups[json.dumps(key, sort_keys=True, default=str)].append(index)
        for key, indices in groups.items():
            settings = json.loads(key)
            steps = self.max_new_tokens or settings["max_new_tokens"] or DEFAULT_MAX_NEW_TOKENS
            for start in range(0, len(indices), self.chunk):
                self._generate_chunk(
                    requests, indices[start : start + self.chunk], int(steps), settings, out
                )
        return out  # type: ignore[return-value]

    def _generate_chunk(self, requests, indices, steps, settings, out) -> None:
        images, questions, names, problems = self._raw_inputs(requests, indices)
        checked = self.adaptive.check(
            images, questions, names, scale=self.scale, budget=self.budget, max_new_tokens=steps
        )
        self._record_errors(checked, indices, names, problems, out, "")
        if not len(checked):
            return
        started = time.perf_counter()
        records = self.adaptive.generate_checked(
            checked,
            scale=self.scale,
            budget=self.budget,
            max_new_tokens=steps,
            batch_size=self.batch_size,
        )
        share = (time.perf_counter() - started) / len(checked)
        text_tokens = [len(ids) - 1 for ids in checked.prompts.ids]
        for row, record, tokens in zip(checked.rows, records, text_tokens, strict=True):
            i = indices[row]
            counts = ScaleCounts(
                input_tokens=tokens + record.scale,
                output_tokens=len(record.token_ids),
                scale=record.scale,
                visual_tokens=record.visual_tokens,
                tried_scales=list(record.tried_scales),
                confidence=record.confidence,
                routed_by=record.routed_by,
                latency_s=share,
            )
            out[i] = GenerationResult(stop_at(record.text, settings["until"]), counts)
            self._log(requests[i].args[4], record.visual_tokens, len(record.token_ids), share)

    def _log(self, task: str, visual_tokens: int, new_tokens: int, seconds: float) -> None:
        """One record per answer, so lmms-eval's throughput summary averages over answers."""
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=new_tokens,
            avg_speed=new_tokens / seconds if seconds > 0 else 0.0,
            additional_metrics={
                "total_requests": 1,
                "visual_tokens": visual_tokens,
                f"visual_tokens_{task}": visual_tokens,
            },
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("adaptive_m3 answers single-turn questions only")

    # -- loglikelihood ---------------------------------------------------------------------
    def _scales_for(self, encoded, prompts) -> tuple[list[int], str]:
        """The requested scale, or the router's choice; the confidence cascade decides by
        generating, so it cannot pick a scale for a likelihood."""
        n = len(prompts)
        if self.scale != "auto":
            return [int(self.scale)] * n, "fixed"
        policy, knob = self.adaptive._decision(self.budget, None)
        if policy == "fixed":
            return [int(knob)] * n, "fixed"
        if policy == "cascade":
            raise ValueError(
                "adaptive_m3: loglikelihood with scale=auto needs a router (router=DIR); the "
                "confidence cascade decides by generating. Pass scale=N or a router."
            )
        return [int(s) for s in self.adaptive.route(encoded, prompts, policy, knob)], "router"

    def _continuation(self, question: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prompt ids with one image slot, continuation ids): the prompt and the two
        together tokenized as one text, so a word split at the seam is scored as the model
        reads it."""
        text = self.lmm.nesting.prompt_template.format(question=question)
        context = self.lmm.tokenizer(text, add_special_tokens=True)["input_ids"]
        whole = self.lmm.tokenizer(text + continuation, add_special_tokens=True)["input_ids"]
        if whole[: len(context)] != context:
            extra = self.lmm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            return context, extra
        return context, whole[len(context) :]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean negative log-likelihood per continuation token, whether greedy decoding gives
        the continuation) per request, as lmms-eval's LLaVA models return it (its
        multiple-choice scoring takes the argmin), at the requested or routed scale.

        Returned inside `GenerationResult`: lmms-eval 0.7 turns a bare (float, bool) answer
        into a string before scoring, and the wrapper carries the scale to the sample log.
        """
        out: list[GenerationResult | None] = [None] * len(requests)
        for start in range(0, len(requests), self.chunk):
            self._likelihood_chunk(
                requests, range(start, min(start + self.chunk, len(requests))), out
            )
        return out  # type: ignore[return-value]

    def _likelihood_chunk(self, requests, indices, out) -> None:
        for i in indices:
            if len(requests[i].args) != 6:
                raise ValueError(
                    "adaptive_m3: a loglikelihood request without an image (acc_mutual_info's "
                    "unconditional request) cannot be scored; drop that metric"
                )
        indices = list(indices)
        images, questions, names, problems = self._raw_inputs(requests, indices)
        checked = self.lmm.check(images, questions, names)
        self._record_errors(checked, indices, names, problems, out, (float("inf"), False))
        if not len(checked):
            return
        kept = [indices[row] for row in checked.rows]
        continuations = []
        for i in kept:
            _, continuation, _, doc_id, task, split = requests[i].args
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            continuations.append(str(continuation))
        encoded = self.lmm.encode(checked.images, batch_size=self.batch_size)
        scales, routed_by = self._scales_for(encoded, checked.prompts)
        pairs = [
            self._continuation(q, c)
            for q, c in zip(checked.prompts.questions, continuations, strict=True)
        ]
        for scale in sorted(set(scales)):
            rows = [j for j, s in enumerate(scales) if s == scale]
            for begin in range(0, len(rows), self.batch_size):
                batch = rows[begin : begin + self.batch_size]
                started = time.perf_counter()
                scored = self.score_continuations(
                    encoded.select(batch), [pairs[j] for j in batch], scale
                )
                share = (time.perf_counter() - started) / len(batch)
                for j, (nll, greedy) in zip(batch, scored, strict=True):
                    context, extra = pairs[j]
                    counts = ScaleCounts(
                        input_tokens=len(context) - 1 + scale + len(extra),
                        output_tokens=0,
                        scale=scale,
                        visual_tokens=scale,
                        tried_scales=[scale],
                        routed_by=routed_by,
                        latency_s=share,
                    )
                    out[kept[j]] = GenerationResult((nll, greedy), counts)
                    self._log(requests[kept[j]].args[4], scale, 0, share)

    def score_continuations(
        self, encoded, pairs: list[tuple[list[int], list[int]]], scale: int
    ) -> list[tuple[float, bool]]:
        """One right-padded forward at `scale`: (mean NLL of the continuation tokens, greedy)."""
        lmm = self.lmm
        prompts = Prompts([""] * len(pairs), [context for context, _ in pairs])
        contexts = lmm.prompt_ids(prompts, [scale] * len(pairs))
        sequences = [c + extra for c, (_, extra) in zip(contexts, pairs, strict=True)]
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), lmm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = lmm.model(
            input_ids=ids.to(lmm.device),
            attention_mask=mask.to(lmm.device),
            mm_encoder_outputs=encoder_outputs(lmm.visual_tokens(encoded, [scale] * len(pairs))),
        ).logits.float()
        results = []
        for row, (context, (_, extra)) in enumerate(zip(contexts, pairs, strict=True)):
            if not extra:
                results.append((0.0, True))
                continue
            at = len(context)
            predicted = logits[row, at - 1 : at - 1 + len(extra)]
            target = torch.tensor(extra, device=predicted.device)
            nll = F.cross_entropy(predicted, target)
            greedy = bool((predicted.argmax(-1) == target).all())
            results.append((float(nll), greedy))
        return results
