"""Model-free checks of one sample's image and question, shared by the loaders and the model.

A problem is a reason string "<kind>: <detail>" (the form `SkippedSample.reason` stores), so a
batch job that records a bad sample and an API call that refuses it say the same thing. Kinds:
`missing_image`, `unreadable_image`, `empty_image`, `empty_question`, `bad_question` (and, from
the model's checks in `m3core`, `prompt_too_long`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import PIL.Image

from data.schema import SkippedSample

IMAGE_SLOT = "<image>"
"""The prompt template places the image; a question holding this text would add a second one."""


class SampleError(ValueError):
    """A sample the model cannot take. `str()` is "sample <name>: <reason>".

    `reason` is "<kind>: <detail>"; `sample` is the sample's id (or its position in a call)
    and is None until the caller that knows it names it (`named`).
    """

    def __init__(self, reason: str, sample: object = None) -> None:
        self.reason = reason
        self.sample = None if sample is None else str(sample)
        super().__init__(reason if sample is None else f"sample {sample}: {reason}")

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0].strip()

    def named(self, sample: object) -> SampleError:
        return SampleError(self.reason, sample)

    def skipped(self, source: str) -> SkippedSample:
        return SkippedSample(id=str(self.sample), reason=self.reason, source=source)


def check_question(question: object) -> str:
    """The question, stripped; SampleError unless it is a non-empty str without an image slot."""
    if question is None:
        raise SampleError("empty_question: question is missing")
    if not isinstance(question, str):
        raise SampleError(f"bad_question: question must be a string, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise SampleError("empty_question: question is empty")
    if IMAGE_SLOT in text:
        raise SampleError(
            f"bad_question: question contains {IMAGE_SLOT!r}; the prompt template places the "
            "image, remove it from the question"
        )
    return text


def check_image(image: object) -> PIL.Image.Image:
    """`decode_image`, converted to RGB: what the model's image processor expects."""
    image = decode_image(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except Exception as error:  # exotic modes PIL cannot convert
        raise SampleError(
            f"unreadable_image: cannot convert mode {image.mode} to RGB ({error})"
        ) from None


def decode_image(image: object) -> PIL.Image.Image:
    """A fully decoded image from a PIL image, encoded image bytes or a `datasets` image cell
    ({"bytes", "path"}); SampleError names what is wrong. Never a bare path: an API caller's
    string must not make the model read files."""
    where = "image"
    if isinstance(image, Mapping):
        if image.get("bytes"):
            image = bytes(image["bytes"])
        elif image.get("path"):
            where = str(image["path"])
            image = _open(where, where)
        else:
            raise SampleError("missing_image: the image cell holds neither bytes nor a path")
    if isinstance(image, bytes | bytearray):
        if not image:
            raise SampleError("missing_image: the image bytes are empty")
        image = _open(io.BytesIO(image), "image bytes")
    if not isinstance(image, PIL.Image.Image):
        raise SampleError(
            f"unreadable_image: expected a PIL image or encoded image bytes, got "
            f"{type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise SampleError(f"empty_image: image has zero size {image.size}")
    try:
        image.load()
    except Exception as error:  # PIL raises many types for truncated or corrupt files
        raise SampleError(
            f"unreadable_image: {where} is truncated or corrupt ({type(error).__name__}: {error})"
        ) from None
    return image


def _open(source: Any, where: str) -> PIL.Image.Image:
    try:
        return PIL.Image.open(source)
    except FileNotFoundError:
        raise SampleError(f"missing_image: {where}") from None
    except PIL.UnidentifiedImageError:
        raise SampleError(f"unreadable_image: {where} is not an image file PIL reads") from None
    except Exception as error:  # PIL raises many types for files it cannot identify
        raise SampleError(f"unreadable_image: {where}: {type(error).__name__}: {error}") from None


def check_count(name: str, value: object) -> int:
    """`value` when it is an int >= 1 (sizes, token limits), else a ValueError naming `name`;
    a bool or 2.5 is not a count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value
