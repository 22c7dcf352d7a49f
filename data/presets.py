"""Presets for the common VQA benchmark releases: column map, prompt and metric of each.

The layouts are those of the parquet releases lmms-eval evaluates (one row per question, the
image in the row), read from a local copy:

| preset | id | question | answers | options | metric |
|---|---|---|---|---|---|
| textvqa | question_id | question | answers (list) | - | vqa |
| docvqa | questionId | question | answers (list) | - | anls |
| chartqa | (row number) | question | answer | - | relaxed |
| gqa | id | question | answer | - | exact |
| vqav2 | question_id | question | answers ({"answer": ...} list) | - | vqa |
| pope | question_id | question | answer (yes/no) | - | yesno |
| mmbench | index | question (+ hint) | answer (letter) | columns A-D | mc |
| scienceqa | (row number) | question (+ hint) | answer (index) | choices (list) | mc |
| seed | question_id | question | answer (letter) | choice_a-d | mc |

Prompts follow LLaVA's evaluation: a short-answer question gets "Answer the question using a
single word or phrase." on a new line; a multiple-choice question gets its options as
"A. ..." lines and "Answer with the option's letter from the given choices directly.".
GQA's instructions release keeps images apart: without an `image` column, the image is the
file `images/<imageId>.jpg` beside the data file (or under `image_root`).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from data.schema import encode_meta, sample_meta

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


def _absent(value: Any) -> bool:
    """None, NaN, or an empty / "nan" string: how the releases mark a missing option or hint."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class PresetError(ValueError):
    """A row a preset cannot turn into a sample; the message is the skip reason."""


@dataclass(frozen=True)
class Preset:
    """Where a benchmark release keeps each field, and how a question is asked and scored.

    `options` names the option columns in letter order; `choices` names one column holding
    the options as a list; `answer_index` means the answer is the right choice's index.
    `image_file` is a path pattern for releases that keep images out of the table.
    """

    name: str
    id: str | None
    question: str
    answers: str
    metric: str
    image: str = "image"
    options: tuple[str, ...] = ()
    choices: str | None = None
    answer_index: bool = False
    hint: str | None = None
    hint_format: str = "{hint}\n"
    image_file: str | None = None

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options or self.choices)

    def _field(self, row: Mapping[str, Any], column: str) -> Any:
        if column not in row:
            raise PresetError(f"missing_column: {column!r} not in {sorted(row)}")
        return row[column]

    def option_texts(self, row: Mapping[str, Any]) -> dict[str, str]:
        """{letter: text} of the options this question offers, in order; like LLaVA, the
        options end at the first missing one."""
        if self.choices is not None:
            values = self._field(row, self.choices)
            values = [] if _absent(values) else list(values)
        else:
            values = [self._field(row, column) for column in self.options]
        offered = {}
        for letter, value in zip(LETTERS, values, strict=False):
            if _absent(value):
                break
            offered[letter] = str(value).strip()
        if not offered:
            raise PresetError("no_options: the question offers no options")
        return offered

    def gold(self, row: Mapping[str, Any]) -> list[str] | Any:
        """The gold answers as the release stores them; for multiple choice, [the letter]."""
        value = self._field(row, self.answers)
        if not self.multiple_choice:
            return value
        offered = self.option_texts(row)
        if self.answer_index:
            if _absent(value) or not str(value).strip().lstrip("-").isdigit():
                raise PresetError(f"no_answers: answer index {value!r} is not a number")
            index = int(value)
            if not 0 <= index < len(offered):
                raise PresetError(
                    f"answer_not_an_option: index {index}, but {len(offered)} options offered"
                )
            return [LETTERS[index]]
        letter = "" if _absent(value) else str(value).strip().upper()
        if not letter:
            return []
        if letter not in offered:
            raise PresetError(
                f"answer_not_an_option: {letter!r} not among the offered {''.join(offered)}"
            )
        return [letter]

    def prompt(self, row: Mapping[str, Any]) -> str:
        """The question as the model is asked it (LLaVA's evaluation prompts)."""
        question = self._field(row, self.question)
        question = "" if _absent(question) else str(question).strip()
        if not self.multiple_choice:
            return f"{question}\n{SHORT_ANSWER}" if question else ""
        hint = row.get(self.hint) if self.hint else None
        head = "" if _absent(hint) else self.hint_format.format(hint=str(hint).strip())
        lines = [f"{letter}. {text}" for letter, text in self.option_texts(row).items()]
        body = "\n".join([f"{head}{question}", *lines, MC_ANSWER])
        return body if question else ""

    def image_value(self, row: Mapping[str, Any]) -> Any:
        """The row's image cell, or the relative path of its image file."""
        if self.image not in row and self.image_file is not None:
            try:
                return self.image_file.format(**row)
            except KeyError as missing:
                reason = f"missing_column: {missing.args[0]!r} not in {sorted(row)}"
                raise PresetError(reason) from None
        value = self._field(row, self.image)
        if isinstance(value, list | tuple):
            if len(value) != 1:
                raise PresetError(
                    f"unsupported_image: {len(value)} images (video frames); "
                    "one image per question is supported"
                )
            value = value[0]
        return value

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The uniform fields (id, image, question, answers, meta) of a release row; raises
        PresetError whose message is the skip reason."""
        fields: dict[str, Any] = {}
        if self.id is not None:
            fields["id"] = self._field(row, self.id)
        fields["question"] = self.prompt(row)
        fields["answers"] = self.gold(row)
        fields["image"] = self.image_value(row)
        used = {self.id, self.image, self.question, self.answers, self.choices, self.hint}
        used |= set(self.options) | {"meta"}
        meta = sample_meta(row) if isinstance(row.get("meta"), str | Mapping) else {}
        meta.update({k: v for k, v in row.items() if k not in used and _jsonable(v)})
        meta["preset"] = self.name
        meta["raw_question"] = str(row.get(self.question, ""))
        if self.multiple_choice:
            meta["options"] = self.option_texts(row)
        fields["meta"] = encode_meta(meta)
        return fields


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("textvqa", "question_id", "question", "answers", "vqa"),
        Preset("docvqa", "questionId", "question", "answers", "anls"),
        Preset("chartqa", None, "question", "answer", "relaxed"),
        Preset("gqa", "id", "question", "answer", "exact", image_file="images/{imageId}.jpg"),
        Preset("vqav2", "question_id", "question", "answers", "vqa"),
        Preset("pope", "question_id", "question", "answer", "yesno"),
        Preset("mmbench", "index", "question", "answer", "mc", options=tuple("ABCD"), hint="hint"),
        Preset(
            "scienceqa",
            None,
            "question",
            "answer",
            "mc",
            choices="choices",
            answer_index=True,
            hint="hint",
            hint_format="Context: {hint}\n",
        ),
        Preset(
            "seed",
            "question_id",
            "question",
            "answer",
            "mc",
            options=("choice_a", "choice_b", "choice_c", "choice_d"),
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def open_image(value: Any, base_dir: str | Path | None = None) -> PIL.Image.Image:
    """A PIL image from a dataset cell: an image, {"bytes", "path"}, bytes, or a path
    (relative to `base_dir`)."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return PIL.Image.open(io.BytesIO(value))
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return PIL.Image.open(path)
