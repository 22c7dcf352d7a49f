"""Load local benchmark files into the uniform sample schema, recording every bad sample.

Formats: a `datasets` folder (save_to_disk), parquet, JSON lines, an `imagefolder` with
`metadata.jsonl`, and the LLaVA evaluation layout (questions JSONL with `question_id`,
`image`, `text`; an answers JSONL; an image folder). Each sample is checked (id present and
unique, at least one gold answer, and the question and image checks of `data.validation`,
which the model applies too); a failing sample is recorded as a `SkippedSample` and left out,
and a file that cannot be parsed is recorded and the load goes on with the other files.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import PIL.Image

from data.presets import Preset, PresetError, get_preset
from data.schema import SAMPLE_FEATURES, LoadResult, SkippedSample, encode_meta, sample_meta
from data.validation import SampleError, check_question, decode_image

FORMATS: tuple[str, ...] = ("auto", "disk", "parquet", "jsonl", "imagefolder", "llava")

# Names tried when a column argument is left at its default and that column is absent.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "question_id", "qid", "sample_id"),
    "image": ("image", "image_path", "img", "file_name", "filename", "image_file"),
    "question": ("question", "text", "prompt", "query"),
    "answers": ("answers", "answer", "gold", "gold_answers", "label"),
}
_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _empty_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [] for k in SAMPLE_FEATURES}, features=SAMPLE_FEATURES)


# ---------------------------------------------------------------- per-sample checks


def _image_ref(value: Any, base_dir: Path | None) -> tuple[dict[str, Any] | None, str]:
    """An Image()-feature value ({"bytes", "path"}) for a raw image cell, or (None, reason)."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return {"bytes": bytes(value["bytes"]), "path": value.get("path")}, ""
        value = value.get("path")
    if isinstance(value, PIL.Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}, ""
    if isinstance(value, bytes | bytearray):
        return ({"bytes": bytes(value), "path": None}, "") if value else (None, "missing_image")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "missing_image"
    if not isinstance(value, str):
        return None, f"unreadable_image: unsupported value of type {type(value).__name__}"
    if value.startswith("data:"):
        try:
            return {"bytes": base64.b64decode(value.split(",", 1)[1]), "path": None}, ""
        except (IndexError, binascii.Error) as err:
            return None, f"unreadable_image: bad data URI ({err})"
    if value.startswith(("http://", "https://")):
        return None, f"missing_image: {value} (remote images are not fetched)"
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        return None, f"missing_image: {path}"
    return {"bytes": None, "path": str(path.resolve())}, ""


def _open_check(ref: Mapping[str, Any]) -> str:
    """Empty if the image decodes fully, else an "unreadable_image: ..." reason."""
    try:
        decode_image(ref)
    except SampleError as error:
        return error.reason
    return ""


def _answers_list(value: Any) -> list[str]:
    """Gold answers as a list of non-empty strings; a single string becomes a list of one.
    VQA-style lists of {"answer": ...} dicts are accepted."""
    if value is None:
        return []
    if isinstance(value, str | int | float):
        value = [value]
    elif isinstance(value, Mapping):
        value = [value.get("answer")]
    out = []
    for item in value:
        if isinstance(item, Mapping):
            item = item.get("answer")
        if item is None:
            continue
        text = str(item).strip()
        if text:
            out.append(text)
    return out


@dataclass
class _Checked:
    question: str
    answers: list[str]
    image: dict[str, Any] | None
    reason: str  # empty when the sample is usable


def _check(
    question: Any,
    answers: Any,
    image: Any,
    base_dir: Path | None,
    open_check: Callable[[Mapping[str, Any]], str] = _open_check,
) -> _Checked:
    """The checks every loader applies; the image is opened last, as the costly one."""
    gold = _answers_list(answers)
    try:
        text = check_question(question)
    except SampleError as error:
        return _Checked("", gold, None, error.reason)
    if not gold:
        return _Checked(text, gold, None, "no_answers")
    ref, reason = _image_ref(image, base_dir)
    if ref is not None:
        reason = open_check(ref)
    return _Checked(text, gold, ref, reason)


def validate_sample(row: Mapping[str, Any], *, image_root: str | Path | None = None) -> str | None:
    """Why a uniform-schema row is unusable ("empty_question: ...", "bad_question: ...",
    "no_answers", "missing_image: ...", "unreadable_image: ..."), or None when it is fine.
    Images may be PIL images, bytes, paths (relative to `image_root`) or {"bytes", "path"}
    dicts."""
    root = Path(image_root) if image_root else None
    checked = _check(row.get("question"), row.get("answers"), row.get("image"), root)
    return checked.reason or None


@dataclass
class _Columns:
    id: str | None
    image: str
    question: str
    answers: str


def _resolve_columns(
    available: Sequence[str], requested: Mapping[str, str | None]
) -> tuple[_Columns | None, str]:
    """Map the uniform names to this source's columns; aliases are tried for default names.
    Only the id may be absent (ids then come from row numbers)."""
    found: dict[str, str | None] = {}
    for name, column in requested.items():
        if column is None or column in available:
            found[name] = column
        elif column == name and (
            (alias := next((a for a in COLUMN_ALIASES[name] if a in available), None))
            or name == "id"
        ):
            found[name] = alias
        else:
            return None, f"missing_column: {column!r} not in {sorted(available)}"
    return _Columns(**found), ""


@dataclass
class _Source:
    """Rows from one file (or one in-memory dataset) and where relative images live."""

    rows: Iterable[Mapping[str, Any]]
    columns: Sequence[str]
    name: str
    base_dir: Path | None


class _Collector:
    """Builds the uniform samples and the skipped records across sources."""

    def __init__(self, requested: Mapping[str, str | None], image_root: Path | None):
        self.requested = requested
        self.image_root = image_root
        self.samples: list[dict[str, Any]] = []
        self.skipped: list[SkippedSample] = []
        self.seen: set[str] = set()
        self.n_rows = 0  # rows seen over all sources, for ids of sources without an id column
        self._last_open: tuple[tuple[Any, Any], str] | None = None

    def skip(self, sample_id: str, reason: str, source: str) -> None:
        self.skipped.append(SkippedSample(id=sample_id, reason=reason, source=source))

    def open_check(self, ref: Mapping[str, Any]) -> str:
        """`_open_check`, decoding once for a run of rows with the same image: VQA files put
        an image's questions side by side (the synthetic splits: four per image)."""
        key = (ref.get("bytes"), ref.get("path"))
        if self._last_open is None or self._last_open[0] != key:
            self._last_open = (key, _open_check(ref))
        return self._last_open[1]

    def add_source(self, source: _Source) -> None:
        cols, reason = _resolve_columns(source.columns, self.requested)
        if cols is None:
            self.skip(source.name, reason, source.name)
            return
        base_dir = self.image_root or source.base_dir
        for index, row in enumerate(source.rows):
            sample = self.check_row(row, index, cols, base_dir, source.name)
            if sample is not None:
                self.samples.append(sample)

    def check_row(
        self, row: Mapping[str, Any], index: int, cols: _Columns, base_dir: Path | None, name: str
    ) -> dict[str, Any] | None:
        """The uniform sample for a raw row, or None after recording why it was skipped."""
        self.n_rows += 1
        raw_id = row.get(cols.id) if cols.id else f"row-{self.n_rows - 1}"
        sample_id = "" if raw_id is None else str(raw_id).strip()
        if not sample_id:
            self.skip(f"#{index}", "missing_id", name)
            return None
        if sample_id in self.seen:
            self.skip(sample_id, "duplicate_id", name)
            return None
        checked = _check(
            row.get(cols.question),
            row.get(cols.answers),
            row.get(cols.image),
            base_dir,
            self.open_check,
        )
        if checked.reason:
            self.skip(sample_id, checked.reason, name)
            return None
        self.seen.add(sample_id)
        used = {cols.id, cols.image, cols.question, cols.answers, "meta"}
        meta = _meta_of(row)
        meta.update({k: v for k, v in row.items() if k not in used and _jsonable(v)})
        return {
            "id": sample_id,
            "image": checked.image,
            "question": checked.question,
            "answers": checked.answers,
            "meta": encode_meta(meta),
        }

    def result(self, source: str) -> LoadResult:
        dataset = (
            datasets.Dataset.from_list(self.samples, features=SAMPLE_FEATURES)
            if self.samples
            else _empty_dataset()
        )
        return LoadResult(dataset=dataset, skipped=self.skipped, source=source)


def _meta_of(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return sample_meta(row)
    except (json.JSONDecodeError, TypeError):
        return {"meta": row.get("meta")}


def _jsonable(value: Any) -> bool:
    return not isinstance(value, bytes | bytearray | PIL.Image.Image)


# ---------------------------------------------------------------- readers per format


def _undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """The same dataset with Image columns as {"bytes", "path"} dicts, so that a corrupt
    image is reported by our check instead of raising while iterating."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _from_dataset(dataset: datasets.Dataset, name: str, base_dir: Path | None) -> _Source:
    dataset = _undecoded(dataset)
    return _Source(rows=dataset, columns=dataset.column_names, name=name, base_dir=base_dir)


def _load_builder(builder: str, **kwargs: Any) -> datasets.DatasetDict:
    """`load_dataset` with a throw-away cache, kept in memory: loading local files must not
    write to or read stale results from the user's cache."""
    with tempfile.TemporaryDirectory(prefix="adaptive-m3-load-") as cache_dir:
        return datasets.load_dataset(builder, cache_dir=cache_dir, keep_in_memory=True, **kwargs)


def _pick_split(
    loaded: datasets.Dataset | datasets.DatasetDict, split: str | None, where: Path
) -> datasets.Dataset:
    """The requested split, or the only one; several splits and no choice is an error."""
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split is None:
        if len(loaded) != 1:
            raise ValueError(f"{where} holds splits {sorted(loaded)}; pass split=")
        return next(iter(loaded.values()))
    if split not in loaded:
        raise ValueError(f"split {split!r} not in {sorted(loaded)} at {where}")
    return loaded[split]


def _json_rows(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Rows of a JSON-lines (or JSON array) file parsed line by line, and the bad lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        data = json.loads(text)
        return [r for r in data if isinstance(r, dict)], []
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((number, str(err)))
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append((number, "not a JSON object"))
    return rows, bad


def _read_json_file(path: Path, collector: _Collector, base_dir: Path | None) -> list[_Source]:
    """Via `load_dataset("json")`; files it cannot type (e.g. answers that are a string in
    one row and a list in another) or parse are read line by line instead."""
    try:
        dataset = _pick_split(_load_builder("json", data_files=str(path)), None, path)
        return [_from_dataset(dataset, str(path), base_dir)]
    except Exception:  # pyarrow/datasets raise several types for untypable JSON
        pass
    try:
        rows, bad = _json_rows(path)
    except (OSError, json.JSONDecodeError, UnicodeError) as err:
        collector.skip(str(path), f"unreadable_file: {type(err).__name__}: {err}", str(path))
        return []
    for number, err in bad:
        collector.skip(f"{path.name}:{number}", f"unreadable_row: {err}", str(path))
    columns = sorted({k for r in rows for k in r})
    return [_Source(rows=rows, columns=columns, name=str(path), base_dir=base_dir)]


def _files(path: Path, suffixes: tuple[str, ...], split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if split is not None:
        files = [p for p in files if split in p.relative_to(path).as_posix()]
    return files


def _disk_sources(path: Path, split: str | None) -> list[_Source]:
    if split is not None and (path / split).is_dir() and _is_disk(path / split):
        path = path / split
    dataset = _pick_split(datasets.load_from_disk(str(path)), split, path)
    return [_from_dataset(dataset, str(path), path)]


def _parquet_sources(path: Path, split: str | None, collector: _Collector) -> list[_Source]:
    sources = []
    for file in _files(path, (".parquet",), split):
        try:
            dataset = _pick_split(_load_builder("parquet", data_files=str(file)), None, file)
        except Exception as err:  # a corrupt file must not stop the others
            collector.skip(str(file), f"unreadable_file: {type(err).__name__}: {err}", str(file))
            continue
        sources.append(_from_dataset(dataset, str(file), file.parent))
    return sources


def _jsonl_sources(path: Path, split: str | None, collector: _Collector) -> list[_Source]:
    sources = []
    for file in _files(path, (".jsonl", ".json"), split):
        sources.extend(_read_json_file(file, collector, file.parent))
    return sources


def _imagefolder_sources(path: Path, split: str | None, collector: _Collector) -> list[_Source]:
    """`load_dataset("imagefolder")` over every file under the folder (or its `split`
    sub-folder): all files are named one split explicitly, as the library's inference from
    file names would put "test-1.png" and "metadata.jsonl" into different splits. If that
    fails, the metadata file is read as JSON lines with `file_name` as the image path."""
    if split is not None and (path / split).is_dir():
        path = path / split
    try:
        loaded = _load_builder("imagefolder", data_files={"train": str(path / "**")})
        return [_from_dataset(loaded["train"], str(path), path)]
    except Exception:  # fall back to reading the metadata ourselves
        pass
    metadata = path / "metadata.jsonl"
    if not metadata.is_file():
        collector.skip(str(path), "unreadable_file: imagefolder could not be loaded", str(path))
        return []
    sources = _read_json_file(metadata, collector, path)
    for source in sources:
        source.rows = [
            {("image" if k == "file_name" else k): v for k, v in row.items()} for row in source.rows
        ]
        source.columns = ["image" if c == "file_name" else c for c in source.columns]
    return sources


def _llava_files(path: Path) -> tuple[Path, Path]:
    jsonl = sorted(p for p in path.glob("*.jsonl"))
    questions = [p for p in jsonl if "question" in p.name]
    answers = [p for p in jsonl if "answer" in p.name]
    if len(questions) != 1 or len(answers) != 1:
        raise ValueError(f"{path}: expected one *question*.jsonl and one *answer*.jsonl")
    return questions[0], answers[0]


def _llava_sources(path: Path, collector: _Collector) -> list[_Source]:
    """Join the questions and gold answers files on `question_id`."""
    q_file, a_file = _llava_files(path)
    gold: dict[str, dict[str, Any]] = {}
    for source in _read_json_file(a_file, collector, None):
        for row in source.rows:
            qid = row.get("question_id")
            if qid is not None:
                gold[str(qid)] = dict(row)
    image_dir = path / "images" if (path / "images").is_dir() else path
    joined, asked = [], set()
    for source in _read_json_file(q_file, collector, image_dir):
        for row in source.rows:
            qid = str(row.get("question_id"))
            asked.add(qid)
            answer_row = gold.get(qid, {})
            answers = next(
                (answer_row[k] for k in ("answers", "answer", "text") if k in answer_row), None
            )
            extra = {
                k: v
                for k, v in answer_row.items()
                if k not in ("question_id", "answers", "answer", "text")
            }
            joined.append({**extra, **dict(row), "answers": answers})
    for qid in sorted(set(gold) - asked):
        collector.skip(qid, "no_question: answer without a question row", str(a_file))
    columns = sorted({k for r in joined for k in r})
    return [_Source(rows=joined, columns=columns, name=str(q_file), base_dir=image_dir)]


def _preset_source(preset: Preset, source: _Source, collector: _Collector) -> _Source:
    """The source's rows in the uniform columns; a row the preset cannot read is recorded
    (it still counts for the row numbers of releases without an id column)."""

    def rows():
        for index, row in enumerate(source.rows):
            try:
                yield preset.convert(row)
            except PresetError as error:
                raw_id = row.get(preset.id) if preset.id else f"row-{collector.n_rows}"
                where = f"#{index}" if raw_id is None else str(raw_id)
                collector.skip(where, str(error), source.name)
                collector.n_rows += 1

    columns = ["image", "question", "answers", "meta"] + (["id"] if preset.id else [])
    return _Source(rows=rows(), columns=columns, name=source.name, base_dir=source.base_dir)


def _is_disk(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _DISK_MARKERS)


def detect_format(path: str | Path, split: str | None = None) -> str:
    """Guess the format of a local benchmark file or folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if path.suffix in (".jsonl", ".json"):
            return "jsonl"
        raise ValueError(f"cannot tell the format of {path}")
    if not path.is_dir():
        raise FileNotFoundError(path)
    if _is_disk(path) or (split is not None and _is_disk(path / split)):
        return "disk"
    if any((path / m).is_file() for m in _IMAGEFOLDER_METADATA):
        return "imagefolder"
    names = [p.name for p in path.glob("*.jsonl")]
    if any("question" in n for n in names) and any("answer" in n for n in names):
        return "llava"
    if next(path.rglob("*.parquet"), None) is not None:
        return "parquet"
    if next(path.rglob("*.jsonl"), None) is not None or next(path.rglob("*.json"), None):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {path}")


def load_samples(
    path: str | Path,
    format: str = "auto",
    *,
    split: str | None = None,
    id_column: str | None = "id",
    image_column: str = "image",
    question_column: str = "question",
    answers_column: str = "answers",
    image_root: str | Path | None = None,
    preset: str | None = None,
) -> LoadResult:
    """Load local benchmark samples into the uniform schema.

    format: "auto" (detected), "disk" (save_to_disk folder; `split` picks a split of a
    DatasetDict or a `split` sub-folder), "parquet" / "jsonl" (a file, or every such file
    under a folder, those whose path contains `split` if given), "imagefolder" (folder with
    metadata.jsonl), "llava" (questions + answers JSONL and images/).
    Column arguments name this source's columns; left at their defaults, common aliases
    (question_id, text, answer, file_name, ...) are tried. Without an id column, ids are
    "row-<n>", counting rows over all files. Unmapped columns go into `meta`. The answers
    column may hold a string, a list of strings or VQA-style {"answer": ...} dicts.
    Relative image paths resolve against `image_root`, else the data file's folder.
    `preset` (textvqa, docvqa, chartqa, gqa, vqav2, pope, mmbench, scienceqa, seed) reads a
    benchmark release's layout instead of the column arguments: its columns, its prompt (the
    question becomes the prompt, options included) and its gold answers (`data.presets`).
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    chosen = get_preset(preset) if preset is not None else None
    if format == "auto":
        format = detect_format(path, split)
    requested = {
        "id": id_column,
        "image": image_column,
        "question": question_column,
        "answers": answers_column,
    }
    collector = _Collector(requested, Path(image_root) if image_root else None)
    if format == "disk":
        sources = _disk_sources(path, split)
    elif format == "parquet":
        sources = _parquet_sources(path, split, collector)
    elif format == "jsonl":
        sources = _jsonl_sources(path, split, collector)
    elif format == "imagefolder":
        sources = _imagefolder_sources(path, split, collector)
    else:
        sources = _llava_sources(path, collector)
    if chosen is not None:
        sources = [_preset_source(chosen, source, collector) for source in sources]
    for source in sources:
        collector.add_source(source)
    return collector.result(str(path))


def check_samples(dataset: datasets.Dataset, *, source: str = "") -> LoadResult:
    """Apply the loaders' checks to an in-memory dataset of the uniform schema: the rows that
    pass (same features, same order) plus a SkippedSample for each that does not."""
    missing = {"id", "image", "question", "answers"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"dataset lacks columns {sorted(missing)}")
    collector = _Collector({k: k for k in ("id", "image", "question", "answers")}, None)
    cols = _Columns("id", "image", "question", "answers")
    good = [
        index
        for index, row in enumerate(_undecoded(dataset))
        if collector.check_row(row, index, cols, None, source) is not None
    ]
    return LoadResult(dataset=dataset.select(good), skipped=collector.skipped, source=source)
