"""`NestedLMM`: encode an image once, answer at any visual scale.

The user-facing wrapper around `NestedLlavaForConditionalGeneration` with its tokenizer and image
processor, packaged like a transformers model (`from_pretrained` / `save_pretrained` on a local
folder). Generation is transformers' own `generate` with the KV cache; the visual tokens of each
sample are handed in through `mm_encoder_outputs`, so one batch may mix scales.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from data.validation import SampleError, check_count, check_image, check_question
from m3core.anyres import num_crops
from m3core.config import NestingConfig, nesting_of
from m3core.cost import prefill_flops
from m3core.loading import load_model, read_model_type
from m3core.modeling import NESTED_CLASSES, NestedLlavaForConditionalGeneration, encoder_outputs
from m3core.shipped import resolve_model


@dataclass
class EncodedImages:
    """Output of `NestedLMM.encode`: what any scale needs, once per distinct image.

    `distinct` holds the projected grid (pool) or all M query outputs (queries) per image,
    (N, L, D); for an anyres (LLaVA-NeXT) model every crop's grid, (N, C, G*G, D), with each
    image's (height, width) in `sizes`, which fixes its crop layout. Samples that share an image
    share one row of `distinct`: `index[i]` is sample i's row (None: row i). Selecting samples
    moves indices, never encodings, so a batch of four questions per image holds, pools and
    featurises each image once.
    """

    distinct: torch.Tensor
    index: torch.Tensor | None = None
    sizes: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.distinct.shape[0] if self.index is None else len(self.index)

    def select(self, indices: Sequence[int]) -> EncodedImages:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        index = rows if self.index is None else self.index[rows]
        return EncodedImages(self.distinct, index, self.sizes)

    @property
    def nested(self) -> torch.Tensor:
        """One row per sample, copied from `distinct` where samples share images."""
        return self.distinct if self.index is None else self.distinct[self.index]

    def images(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(the distinct encodings these samples use, their sizes, each sample's row in them)."""
        if self.index is None:
            return self.distinct, self.sizes, torch.arange(len(self))
        used, inverse = torch.unique(self.index, return_inverse=True)
        if len(used) == self.distinct.shape[0]:
            return self.distinct, self.sizes, inverse
        sizes = None if self.sizes is None else self.sizes[used]
        return self.distinct[used], sizes, inverse


@dataclass
class Prompts:
    """Output of `NestedLMM.tokenize`: each question's prompt ids with one `<image>` slot.

    The slot is expanded to a scale's image tokens only when a batch is generated, so one
    tokenization serves every scale, and the router features read the same ids.
    """

    questions: list[str]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.questions)

    def select(self, indices: Sequence[int]) -> Prompts:
        return Prompts([self.questions[i] for i in indices], [self.ids[i] for i in indices])


@dataclass
class GenerationRecord:
    """One answer: its text, the scale it was produced at, the visual tokens the LLM read
    (the scale, or for an anyres model what the image's crop layout gives at that scale), and
    its mean token log-probability.

    With `generate(..., probe=True)` also `probe`, the features the prefill of this very call
    gave (`m3core.features.probe_vector`), and `prefill_seconds`, this sample's equal share of
    the batch's prefill time."""

    text: str
    scale: int
    visual_tokens: int
    confidence: float
    token_ids: list[int]
    probe: np.ndarray | None = None
    prefill_seconds: float | None = None


class PrefillProbe:
    """For the span of one `generate` call: the final norm's output at the last position of
    the first forward (the prefill; left padding puts every prompt's end there), and the time
    that forward ended. Decoding steps run the norm again and are ignored."""

    def __init__(self, norm: torch.nn.Module) -> None:
        self.norm = norm
        self.hidden: torch.Tensor | None = None
        self.ended: float | None = None

    def __enter__(self) -> PrefillProbe:
        self.handle = self.norm.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def _keep(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        if self.hidden is None:
            self.hidden = output[:, -1].float()
            self.ended = time.perf_counter()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class CheckedImages(list):
    """Images `check_images` has decoded and converted: it passes them through unchanged, so
    an image is checked once per call however many layers hand it on."""


def check_images(images: Iterable[object]) -> CheckedImages:
    """Decoded RGB images; a `SampleError` (a ValueError) names the first unusable sample by
    its position. Takes what `data.validation.check_image` takes."""
    if isinstance(images, CheckedImages):
        return images
    checked = CheckedImages()
    for index, image in enumerate(images):
        try:
            checked.append(check_image(image))
        except SampleError as error:
            raise error.named(index) from None
    return checked


def model_scales(path: str | Path) -> tuple[int, ...]:
    """The scales of the model folder at `path`, read from its config alone: jobs check their
    arguments against them before loading any weights or writing any output."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder: config.json is missing")
    read_model_type(path)
    return nesting_of(AutoConfig.from_pretrained(path, local_files_only=True), None).scales


def dedupe_images(images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """The distinct images (equal pixels, size and mode) and, per input, its distinct index."""
    slots: dict[tuple, int] = {}
    distinct, index = [], []
    for image in images:
        key = (image.size, image.mode, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
        if key not in slots:
            slots[key] = len(distinct)
            distinct.append(image)
        index.append(slots[key])
    return distinct, index


def check_questions(questions: Iterable[object]) -> list[str]:
    """The questions, stripped; a `SampleError` names the first unusable one by position."""
    checked = []
    for index, question in enumerate(questions):
        try:
            checked.append(check_question(question))
        except SampleError as error:
            raise error.named(index) from None
    return checked


@dataclass
class CheckedSamples:
    """Output of `NestedLMM.check`: the samples the model can take, and why it cannot take the
    others, in input order.

    `names[i]` and `rows[i]` are kept sample i's id and position in the input; its image is
    decoded RGB (`encode` takes `images` without checking again) and its prompt, tokenized,
    fits the model's context at the largest scale the check was told will be tried.
    """

    names: list[str]
    rows: list[int]
    images: CheckedImages
    prompts: Prompts
    errors: list[SampleError]

    def __len__(self) -> int:
        return len(self.rows)

    def raise_first(self) -> CheckedSamples:
        """Self when every sample passed; else the first sample's error (what an API raises)."""
        if self.errors:
            raise self.errors[0]
        return self

    def select(self, indices: Sequence[int]) -> CheckedSamples:
        """Kept samples `indices` (positions in this object); errors stay behind."""
        return CheckedSamples(
            [self.names[i] for i in indices],
            [self.rows[i] for i in indices],
            CheckedImages(self.images[i] for i in indices),
            self.prompts.select(indices),
            [],
        )


class NestedLMM:
    """A Matryoshka multimodal model: one set of weights, any number of visual tokens.

    `encode` runs the vision tower and projector once per image; `generate` answers at one scale
    for the whole batch or one scale per sample; `cost` is the analytic prefill FLOPs of a scale.
    """

    def __init__(
        self,
        model: NestedLlavaForConditionalGeneration,
        tokenizer,
        image_processor,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.nesting: NestingConfig = model.nesting_config
        self.image_token_id = int(model.config.image_token_index)
        self._vision_flops: float | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        nesting: NestingConfig | dict | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> NestedLMM:
        """Load our nested checkpoints or a stock llava-hf Llava / LlavaNext folder from local
        disk (or a shipped checkpoint by name: tiny-m3, tiny-mqt), never a hub.

        A stock checkpoint is pooled at inference (M3's training-free baseline); `nesting` may
        name the expected kind or give a `NestingConfig` (other scales or prompt). Every weight
        the model needs must be in the folder: a missing, unexpected or mis-shaped one is a
        ValueError that lists them. A folder in the original LLaVA format is refused with the
        `adaptive-m3 convert` command that converts it.
        """
        path = resolve_model(path)
        model_class = NESTED_CLASSES[read_model_type(path)]
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config.nesting = nesting_of(config, nesting).to_dict()
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        model = load_model(path, model_class, config, dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, processor)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.nesting.scales

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def context_length(self) -> int | None:
        """Positions the LLM was trained for (None when its config does not say)."""
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    def check_scale(self, scale: object) -> int:
        """`scale` as an int when it is one of the model's scales, else a ValueError.

        An int, or a float with an integral value (9.0: JSON and calibrated knobs carry
        floats); never a bool or a string.
        """
        ok = (
            isinstance(scale, numbers.Real)
            and not isinstance(scale, bool)
            and math.isfinite(scale)
            and int(scale) == scale
            and int(scale) in self.scales
        )
        if not ok:
            raise ValueError(
                f"scale {scale!r} is not one of this model's scales {list(self.scales)}"
            )
        return int(scale)  # type: ignore[call-overload]

    def check_scales(self, scales: Iterable[object]) -> list[int]:
        """`check_scale` of each; the error names the sample by its position."""
        if isinstance(scales, str | bytes):
            raise ValueError(f"scales must be ints, one per sample, got the string {scales!r}")
        checked = []
        for index, scale in enumerate(scales):
            try:
                checked.append(self.check_scale(scale))
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from None
        return checked

    def prompt_problem(self, ids: Sequence[int], scale: int, max_new_tokens: int) -> str | None:
        """Why a tokenized prompt cannot run at `scale` (a `SampleError` reason), or None.

        The prompt must hold one image slot, and its text tokens plus the visual tokens of
        `scale` (for an anyres model, those of the crop layout that gives the most) plus the
        answer's `max_new_tokens` must fit the LLM's positions: past them the answer is noise,
        not an error.
        """
        if (problem := self._slot_problem(ids)) is not None:
            return problem
        text = len(ids) - 1
        visual = self.most_visual_tokens(scale)
        total = text + visual + max_new_tokens
        if self.context_length is not None and total > self.context_length:
            return (
                f"prompt_too_long: {text} text tokens + {visual} visual tokens + "
                f"{max_new_tokens} new tokens = {total} positions, over the model's "
                f"{self.context_length}"
            )
        return None

    def _slot_problem(self, ids: Sequence[int]) -> str | None:
        if (slots := list(ids).count(self.image_token_id)) != 1:
            return (
                f"bad_question: the prompt holds {slots} image slots, expected one (does the "
                "question contain the model's image token?)"
            )
        return None

    def check(
        self,
        images: Sequence[object],
        questions: Sequence[object],
        ids: Sequence[object] | None = None,
        *,
        largest_scale: int | None = None,
        max_new_tokens: int = 0,
    ) -> CheckedSamples:
        """Check every sample once: the one boundary between raw input and the model.

        Never raises for a bad sample: its `SampleError` (named by its id, default its
        position) lands in `errors`, so a batch job records it and answers the rest, and an
        API call raises `raise_first()`. Each question is a non-empty string without an image
        slot, each image decodes (converted to RGB), and each prompt fits the context with
        `largest_scale` (default the model's largest) visual tokens and `max_new_tokens`.
        """
        images, questions = list(images), list(questions)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        names = [str(i) for i in range(len(images))] if ids is None else [str(i) for i in ids]
        if len(names) != len(images):
            raise ValueError(f"got {len(names)} ids for {len(images)} samples")
        scale = self.scales[-1] if largest_scale is None else self.check_scale(largest_scale)
        errors: list[SampleError] = []
        rows, texts, pictures = [], [], CheckedImages()
        for row, (name, image, question) in enumerate(zip(names, images, questions, strict=True)):
            try:
                text = check_question(question)
                picture = check_image(image)
            except SampleError as error:
                errors.append(error.named(name))
                continue
            rows.append(row)
            texts.append(text)
            pictures.append(picture)
        keep, tokenized = [], self._prompt_ids(texts)
        for j, ids_j in enumerate(tokenized):
            if (reason := self.prompt_problem(ids_j, scale, max_new_tokens)) is not None:
                errors.append(SampleError(reason, names[rows[j]]))
            else:
                keep.append(j)
        position = {name: row for row, name in enumerate(names)}
        errors.sort(key=lambda error: position[error.sample])
        prompts = Prompts([texts[j] for j in keep], [tokenized[j] for j in keep])
        return CheckedSamples(
            [names[rows[j]] for j in keep],
            [rows[j] for j in keep],
            CheckedImages(pictures[j] for j in keep),
            prompts,
            errors,
        )

    @property
    def anyres(self) -> bool:
        return self.model.anyres

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel values, per-image (height, width) for an anyres model, else None), by the
        folder's image processor: pad to square for LLaVA-1.5 / M3 / MQT (and the tiny
        models), tiles for LLaVA-NeXT."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        sizes = out["image_sizes"].to(self.device) if self.anyres else None
        return out["pixel_values"].to(self.device, self.dtype), sizes

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocess(images)[0]

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image], batch_size: int = 64) -> EncodedImages:
        """Run the vision tower and projector once per distinct image (and the queries, for MQT).

        Samples that share an image (several questions about one picture) share its encoding.
        """
        images = check_images(images)
        if not images:
            raise ValueError("no images to encode")
        distinct, index = dedupe_images(images)
        chunks, sizes = [], []
        for start in range(0, len(distinct), batch_size):
            pixels, chunk_sizes = self.preprocess(distinct[start : start + batch_size])
            chunks.append(self.model.encode_images(pixels, chunk_sizes))
            sizes.append(chunk_sizes)
        shared = None if len(distinct) == len(images) else torch.tensor(index)
        if not self.anyres:
            return EncodedImages(torch.cat(chunks), shared)
        crops = max(chunk.shape[1] for chunk in chunks)
        padded = [torch.nn.functional.pad(c, (0, 0, 0, 0, 0, crops - c.shape[1])) for c in chunks]
        return EncodedImages(torch.cat(padded), shared, torch.cat(sizes))

    def visual_tokens(self, encoded: EncodedImages, scales: Sequence[int]) -> list[torch.Tensor]:
        """One (tokens_i, D) tensor per sample; nesting is grouped so each scale is one op."""
        tokens: list[torch.Tensor | None] = [None] * len(scales)
        for scale in sorted(set(scales)):
            rows = [i for i, s in enumerate(scales) if s == scale]
            distinct, sizes, inverse = encoded.select(rows).images()
            nested = self.model.visual_tokens(distinct, scale, sizes)
            for row, at in zip(rows, inverse.tolist(), strict=True):
                tokens[row] = nested[at]
        return tokens

    def most_visual_tokens(self, scale: int) -> int:
        """The most visual tokens one image can give at `scale`: the scale, or for an anyres
        model the count of its largest crop layout before the unpad step trims it."""
        if not self.anyres:
            return scale
        crop = self.model.config.vision_config.image_size
        side = math.isqrt(scale)
        layouts = [(h // crop, w // crop) for h, w in self.model.config.image_grid_pinpoints]
        return scale + max(rows * side * (cols * side + 1) for rows, cols in layouts)

    def token_count(self, scale: int, image_size: Sequence[int] | None = None) -> int:
        """Visual tokens the LLM reads at `scale` for an image of (height, width); an anyres
        model's count depends on the crop layout (default: a square image)."""
        if self.anyres and image_size is None:
            image_size = (self.model.config.vision_config.image_size,) * 2
        return self.model.token_count(scale, image_size)

    def tokenize(self, questions: Sequence[str]) -> Prompts:
        """Prompt ids of each question; a `SampleError` names the first unusable sample."""
        texts = check_questions(questions)
        encoded = self._prompt_ids(texts)
        for index, ids in enumerate(encoded):
            if (reason := self._slot_problem(ids)) is not None:
                raise SampleError(reason, index)
        return Prompts(texts, encoded)

    def _prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        prompts = [self.nesting.prompt_template.format(question=q) for q in texts]
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def prompt_ids(
        self, questions: Sequence[str] | Prompts, counts: Sequence[int]
    ) -> list[list[int]]:
        """Token ids of each prompt with its `<image>` slot expanded to `counts[i]` image
        tokens (the scale, or an anyres image's `token_count`)."""
        prompts = questions if isinstance(questions, Prompts) else self.tokenize(questions)
        expanded = []
        for ids, count in zip(prompts.ids, counts, strict=True):
            at = ids.index(self.image_token_id)
            expanded.append(ids[:at] + [self.image_token_id] * count + ids[at + 1 :])
        return expanded

    def pad_right(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding: every row's positions start at 0, as in a plain forward."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def pad_left(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _scales_for(self, scale: object, n: int) -> list[int]:
        if scale is None:
            return [self.scales[-1]] * n
        if isinstance(scale, Iterable) and not isinstance(scale, str | bytes):
            scales = self.check_scales(scale)
            if len(scales) != n:
                raise ValueError(f"got {len(scales)} scales for {n} samples")
            return scales
        return [self.check_scale(scale)] * n

    @torch.inference_mode()
    def generate(
        self,
        images_or_encoded: Sequence[Image.Image] | EncodedImages,
        questions: Sequence[str] | Prompts,
        scale: int | Sequence[int] | None = None,
        max_new_tokens: int = 8,
        batch_size: int | None = None,
        probe: bool = False,
    ) -> list[GenerationRecord]:
        """Greedy answers, one record per sample; `scale` is one int or one per sample.

        Pass `encode`'s and `tokenize`'s outputs to answer the same samples at several scales
        without encoding or tokenizing them again. With `probe`, each record also carries the
        probe features read from this call's own prefill (no second forward).
        """
        check_count("max_new_tokens", max_new_tokens)
        prompts = questions if isinstance(questions, Prompts) else self.tokenize(questions)
        encoded = images_or_encoded
        kind = "encoded images" if isinstance(encoded, EncodedImages) else "images"
        if not isinstance(encoded, EncodedImages | CheckedImages):
            encoded = list(encoded)
        if len(encoded) != len(prompts):
            raise ValueError(f"got {len(encoded)} {kind} for {len(prompts)} questions")
        scales = self._scales_for(scale, len(prompts))
        for index, (ids, s) in enumerate(zip(prompts.ids, scales, strict=True)):
            if (reason := self.prompt_problem(ids, s, max_new_tokens)) is not None:
                raise SampleError(reason, index)
        if not isinstance(encoded, EncodedImages):
            encoded = self.encode(encoded)
        step = batch_size or len(prompts)
        records: list[GenerationRecord] = []
        for start in range(0, len(prompts), step):
            rows = range(start, min(start + step, len(prompts)))
            batch_scales = [scales[i] for i in rows]
            records += self._generate_batch(
                encoded.select(rows), prompts.select(rows), batch_scales, max_new_tokens, probe
            )
        return records

    def final_norm(self) -> torch.nn.Module:
        """The LLM's last normalisation, whose output the LM head reads."""
        norm = getattr(self.model.model.language_model, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            kind = type(self.model.model.language_model).__name__
            raise ValueError(f"probe features need the LLM's final norm; {kind} has no .norm")
        return norm

    def _generate_batch(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        scales: list[int],
        max_new_tokens: int,
        probe: bool = False,
    ) -> list[GenerationRecord]:
        tokens = self.visual_tokens(encoded, scales)
        counts = [len(t) for t in tokens]
        ids, mask = self.pad_left(self.prompt_ids(prompts, counts))
        hook = PrefillProbe(self.final_norm()) if probe else None
        started = time.perf_counter()
        with hook if hook is not None else contextlib.nullcontext():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                mm_encoder_outputs=encoder_outputs(tokens),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=probe,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        probes, prefill = [None] * len(scales), None
        if hook is not None:
            from m3core.features import probe_vector

            first = out.logits[0].float().log_softmax(-1)  # the model's own, before processors
            probes = list(probe_vector(hook.hidden, first).cpu().numpy())
            prefill = (hook.ended - started) / len(scales)
        new_tokens = out.sequences[:, ids.shape[1] :]
        # scores: the logits after the checkpoint's own processors, e.g. a converted model's
        # suppressed <image> token, so confidence is over the tokens it can answer with
        logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        chosen = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        records = []
        for row, scale in enumerate(scales):
            tokens = new_tokens[row].tolist()
            length = len(tokens)
            if self.tokenizer.eos_token_id in tokens:
                length = tokens.index(self.tokenizer.eos_token_id) + 1
            answer = tokens[:length]
            records.append(
                GenerationRecord(
                    text=self.tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    scale=scale,
                    visual_tokens=counts[row],
                    confidence=float(chosen[row, :length].mean()) if length else float("-inf"),
                    token_ids=answer,
                    probe=probes[row],
                    prefill_seconds=prefill,
                )
            )
        return records

    def answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """Token ids of each answer as `generate` would produce it: its tokens, then EOS."""
        encoded = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        return [list(ids) + [self.tokenizer.eos_token_id] for ids in encoded]

    @torch.inference_mode()
    def continuation_logprob(
        self,
        encoded: EncodedImages,
        prompts: Prompts,
        continuations: Sequence[Sequence[int]],
        scale: int,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """log P(continuation | prompt at `scale`) per sample, by teacher forcing: one
        right-padded forward over prompt + continuation on the encodings in hand (no second
        vision pass), the LM head applied only where a continuation token is predicted."""
        scale = self.check_scale(scale)
        if not len(encoded) == len(prompts) == len(continuations):
            raise ValueError(
                f"got {len(encoded)} encodings, {len(prompts)} prompts and "
                f"{len(continuations)} continuations"
            )
        out = np.zeros(len(prompts))
        step = batch_size or max(len(prompts), 1)
        for start in range(0, len(prompts), step):
            rows = list(range(start, min(start + step, len(prompts))))
            tokens = self.visual_tokens(encoded.select(rows), [scale] * len(rows))
            contexts = self.prompt_ids(prompts.select(rows), [len(t) for t in tokens])
            tails = [list(continuations[i]) for i in rows]
            ids, mask = self.pad_right([c + t for c, t in zip(contexts, tails, strict=True)])
            hidden = self.model.model(
                input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoder_outputs(tokens)
            ).last_hidden_state
            row_of, at, target = [], [], []
            for j, (context, tail) in enumerate(zip(contexts, tails, strict=True)):
                row_of += [j] * len(tail)
                at += range(len(context) - 1, len(context) - 1 + len(tail))
                target += tail
            if not target:
                continue
            where = torch.tensor(row_of, device=hidden.device)
            logits = self.model.lm_head(hidden[where, torch.tensor(at, device=hidden.device)])
            picked = logits.float().log_softmax(-1)
            picked = picked.gather(-1, torch.tensor(target, device=hidden.device)[:, None])[:, 0]
            sums = torch.zeros(len(rows), device=hidden.device).index_add_(0, where, picked)
            out[rows] = sums.cpu().numpy()
        return out

    def vision_flops(self) -> float:
        """FLOPs of the vision tower + projector for one image, counted once by torch.

        Counting beats a formula here: the tower may be any transformers vision model.
        """
        if self._vision_flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            side = self.model.config.vision_config.image_size
            pixels = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
            counter = FlopCounterMode(display=False)
            with torch.inference_mode(), counter:
                self.model.image_grid(pixels)
            self._vision_flops = float(counter.get_total_flops())
        return self._vision_flops

    def cost(
        self,
        scale: int,
        text_tokens: int | None = None,
        image_size: Sequence[int] | None = None,
    ) -> float:
        """Prefill FLOPs at `scale`: vision + projector (+ queries) on every crop, nesting,
        and the LLM prompt with `token_count(scale, image_size)` visual tokens."""
        self.check_scales([scale])
        text = self.nesting.text_tokens if text_tokens is None else text_tokens
        crops = self.crops(image_size)
        if self.anyres:
            side = self.model.config.vision_config.image_size
            image_size = image_size or (side, side)
        tokens = self.token_count(scale, image_size)
        return self.image_flops(image_size) + prefill_flops(
            self.model.config, scale, text, self.nesting, visual_tokens=tokens, crops=crops
        )

    def crops(self, image_size: Sequence[int] | None = None) -> int:
        """Crops the vision tower runs for an image of (height, width): 1 unless anyres."""
        if not self.anyres:
            return 1
        side = self.model.config.vision_config.image_size
        return num_crops(image_size or (side, side), self.model.config.image_grid_pinpoints, side)

    def image_flops(self, image_size: Sequence[int] | None = None) -> float:
        """The vision tower's part of `cost`: paid once per image, whatever scales run after."""
        return self.crops(image_size) * self.vision_flops()

    def describe(self) -> dict:
        """Sizes a report or a CLI prints about the model."""
        return {
            "nesting": self.nesting.kind,
            "scales": list(self.scales),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def __repr__(self) -> str:
        return f"NestedLMM({json.dumps(self.describe())})"
