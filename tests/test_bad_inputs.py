"""Malformed input, table by table, through the API and through `run` / `label`.

For every bad sample: a ValueError whose message names the sample and the problem, the same
message from `AdaptiveLMM` and `NestedLMM`, and every good sample beside it answered. For every
bad argument or router folder: a clear error before anything is written to `--out`.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.validation import SampleError
from m3core import MICRO, NestedLMM, tiny_lmm
from m3core.features import feature_names, router_features
from pipelines.adaptive import AdaptiveLMM
from pipelines.cli import main
from pipelines.skipping import isolate
from predictor import ScaleRouter, calibration_table, save_calibration
from predictor.drift import drift_reference, save_drift_reference
from tests.conftest import COLOURS, MICRO_WORDS

QUESTION = "what colour is the left side ?"
LONG = " ".join(["colour"] * 3000)  # 3,000 words against the micro model's 144 positions


def picture(size=(32, 32), mode="RGB", colour="red") -> Image.Image:
    image = Image.new("RGB", size, COLOURS[colour])
    image.paste(COLOURS["blue"], (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode) if mode != "RGB" else image


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def truncated() -> Image.Image:
    return Image.open(io.BytesIO(encoded(picture())[:60]))


@dataclass
class Bad:
    name: str
    image: object
    question: object
    kind: str
    says: str


BAD_SAMPLES = [
    Bad("zero-size", lambda: Image.new("RGB", (0, 0)), QUESTION, "empty_image", "zero size"),
    Bad("zero-width", lambda: Image.new("RGB", (0, 9)), QUESTION, "empty_image", "(0, 9)"),
    Bad("truncated", truncated, QUESTION, "unreadable_image", "truncated or corrupt"),
    Bad("path-string", lambda: "cat.png", QUESTION, "unreadable_image", "got str"),
    Bad("none-image", lambda: None, QUESTION, "unreadable_image", "got NoneType"),
    Bad("number-image", lambda: 42, QUESTION, "unreadable_image", "got int"),
    Bad("array-image", lambda: np.zeros((4, 4, 3)), QUESTION, "unreadable_image", "got ndarray"),
    Bad("junk-bytes", lambda: b"junk", QUESTION, "unreadable_image", "image bytes"),
    Bad("empty-bytes", lambda: b"", QUESTION, "missing_image", "bytes are empty"),
    Bad("empty-cell", lambda: {"bytes": None, "path": None}, QUESTION, "missing_image", "cell"),
    Bad(
        "gone-cell",
        lambda: {"bytes": None, "path": "/nowhere/x.png"},
        QUESTION,
        "missing_image",
        "/nowhere/x.png",
    ),
    Bad("mode-La", lambda: picture(mode="RGBA").convert("La"), QUESTION, "unreadable_image", "La"),
    Bad("empty-question", picture, "", "empty_question", "question is empty"),
    Bad("blank-question", picture, " \n\t ", "empty_question", "question is empty"),
    Bad("none-question", picture, None, "empty_question", "question is missing"),
    Bad("int-question", picture, 42, "bad_question", "must be a string, got int"),
    Bad("bytes-question", picture, QUESTION.encode(), "bad_question", "got bytes"),
    Bad("list-question", picture, [QUESTION], "bad_question", "got list"),
    Bad("slot-question", picture, "<image> " + QUESTION, "bad_question", "'<image>'"),
    Bad("slot-at-end", picture, QUESTION + " <image>", "bad_question", "remove it"),
    Bad("long-question", picture, LONG, "prompt_too_long", "over the model's 144"),
]

GOOD_SAMPLES = [
    ("rgba", lambda: picture(mode="RGBA"), QUESTION),
    ("grey", lambda: picture(mode="L"), QUESTION),
    ("palette", lambda: picture(mode="P"), QUESTION),
    ("cmyk", lambda: picture(mode="CMYK"), QUESTION),
    ("bilevel", lambda: picture(mode="1"), QUESTION),
    ("16-bit", lambda: picture(mode="L").convert("I;16"), QUESTION),
    ("float", lambda: picture(mode="F"), QUESTION),
    ("one-pixel", lambda: picture(size=(1, 1)), QUESTION),
    ("sliver", lambda: picture(size=(300, 7)), QUESTION),
    ("png-bytes", lambda: encoded(picture()), QUESTION),
    ("jpeg-cell", lambda: {"bytes": encoded(picture(), "JPEG"), "path": None}, QUESTION),
    ("gif", lambda: Image.open(io.BytesIO(encoded(picture(), "GIF"))), QUESTION),
    ("unknown-words", picture, "what colour is the 🟥 thing , señor ?"),
    ("special-words", picture, "what </s> colour <pad> is <s> the left side ?"),
    ("spaces", picture, "\n  what colour is the left side ?  \t"),
    ("long-but-fits", picture, " ".join(["colour"] * 100)),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A micro model and router folders: calibrated with a drift reference, and bare."""
    root = tmp_path_factory.mktemp("bad-inputs")
    lmm = tiny_lmm(MICRO_WORDS, MICRO, seed=0)
    lmm.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    colours = list(COLOURS)
    images = [picture(colour=colours[i % 3]) for i in range(30)]
    shifts = rng.integers(-60, 60, len(images))
    images = [im.point(lambda v, k=int(k): v + k) for im, k in zip(images, shifts, strict=True)]
    questions = [QUESTION.replace("left", ("left", "right")[i % 2]) for i in range(30)]
    X = router_features(lmm, lmm.encode(images), questions)
    correct = np.ones((30, 3), dtype=bool)
    correct[:20, 0] = correct[:10, 1] = False
    names = feature_names(lmm)
    router = ScaleRouter("logreg", scales=lmm.scales, policy="threshold", knob=0.5).fit(
        X, correct, feature_names=names
    )
    router.save(root / "bare")
    router.save(root / "router")
    P = router.predict_proba(X)
    save_calibration(calibration_table(P, correct, lmm.scales, None, "threshold"), root / "router")
    reference = drift_reference(X, names, lmm.scales, P, "threshold", 0.5)
    save_drift_reference(reference, root / "router")
    return root


@pytest.fixture(scope="module")
def adaptive(folders):
    return AdaptiveLMM.from_pretrained(folders / "model", folders / "router", device="cpu")


@pytest.mark.parametrize("bad", BAD_SAMPLES, ids=lambda b: b.name)
def test_a_bad_sample_is_named_the_same_by_every_api(adaptive, bad):
    images, questions = [picture(), bad.image(), picture()], [QUESTION, bad.question, QUESTION]
    with pytest.raises(SampleError) as caught:
        adaptive.generate(images, questions, ids=["ok-1", bad.name, "ok-2"], max_new_tokens=1)
    message = str(caught.value)
    assert message.startswith(f"sample {bad.name}: {bad.kind}: ") and bad.says in message
    assert caught.value.reason == message.split(": ", 1)[1]
    with pytest.raises(SampleError) as direct:  # named by position without ids
        adaptive.lmm.generate(
            [picture(), bad.image(), picture()], questions, scale=None, max_new_tokens=1
        )
    assert str(direct.value) == message.replace(f"sample {bad.name}:", "sample 1:")


def test_every_good_sample_beside_every_bad_one_is_answered(adaptive):
    images, questions, ids = [], [], []
    for (name, image, question), bad in zip(GOOD_SAMPLES, BAD_SAMPLES, strict=False):
        images += [image(), bad.image()]
        questions += [question, bad.question]
        ids += [name, bad.name]
    for bad in BAD_SAMPLES[len(GOOD_SAMPLES) :]:
        images.append(bad.image())
        questions.append(bad.question)
        ids.append(bad.name)
    checked = adaptive.check(images, questions, ids, max_new_tokens=1)
    assert checked.names == [name for name, _, _ in GOOD_SAMPLES]
    found = {e.sample: e.kind for e in checked.errors}
    assert found == {b.name: b.kind for b in BAD_SAMPLES}
    assert [e.sample for e in checked.errors] == [i for i in ids if i in found]  # input order
    records = adaptive.generate_checked(checked, max_new_tokens=1)
    assert len(records) == len(GOOD_SAMPLES) and all(r.text is not None for r in records)
    alone = adaptive.generate(
        [image() for _, image, _ in GOOD_SAMPLES], [q for _, _, q in GOOD_SAMPLES], max_new_tokens=1
    )
    assert [r.token_ids for r in alone] == [r.token_ids for r in records]


CALL_ERRORS = [
    ({"scale": 5}, "scale must be 'auto' or one of this model's scales [1, 4, 16], got 5"),
    ({"scale": 4.5}, "got 4.5"),
    ({"scale": True}, "got True"),
    ({"scale": "4"}, "got '4'"),
    ({"scale": "144"}, "got '144'"),
    ({"scale": float("nan")}, "got nan"),
    ({"scale": [1, 4]}, "got [1, 4]"),
    ({"budget": "tokens<=abc"}, "cannot parse target 'tokens<=abc'"),
    ({"budget": {"metric": "tokens"}}, "needs a metric and a number under 'value'"),
    ({"budget": {"metric": "tokens", "value": "x"}}, "under 'value'"),
    ({"budget": {"metric": "accuracy_loss"}}, "under 'epsilon'"),
    ({"budget": 5}, "budget must be a target such as 'tokens<=20'"),
    ({"budget": "loss<=2"}, "epsilon and delta must lie in (0, 1)"),
    ({"budget": "tokens<=0.5"}, "no threshold knob reaches mean tokens <= 0.5"),
    ({"budget": "tokens<=4", "scale": 4}, "a budget needs scale='auto'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
    ({"max_new_tokens": True}, "got True"),
    ({"max_new_tokens": 2.5}, "got 2.5"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"cascade_threshold": float("nan")}, "cascade_threshold must be a number, got nan"),
    ({"cascade_threshold": "high"}, "got 'high'"),
    ({"ids": ["a", "b"]}, "got 2 ids for 3 samples"),
]


@pytest.mark.parametrize("kwargs, says", CALL_ERRORS, ids=[str(k)[:40] for k, _ in CALL_ERRORS])
def test_bad_call_arguments(adaptive, kwargs, says):
    images, questions = [picture()] * 3, [QUESTION] * 3
    with pytest.raises(ValueError) as caught:
        adaptive.generate(images, questions, **kwargs)
    assert says in str(caught.value)


def test_scales_nested_lmm_takes_and_refuses(adaptive):
    lmm: NestedLMM = adaptive.lmm
    images, questions = [picture()] * 3, [QUESTION] * 3
    assert {r.scale for r in lmm.generate(images, questions, scale=4.0, max_new_tokens=1)} == {4}
    assert (
        type(lmm.generate(images, questions, scale=np.int64(4), max_new_tokens=1)[0].scale) is int
    )
    refused = [
        (True, "scale True is not one of this model's scales [1, 4, 16]"),
        ("4", "scale '4' is not one of"),
        ("144", "scale '144' is not one of"),
        (9.5, "scale 9.5 is not one of"),
        ([1, 4], "got 2 scales for 3 samples"),
        ([1, "4", 16], "sample 1: scale '4' is not one of"),
        ([1, 4, False], "sample 2: scale False"),
    ]
    for scale, says in refused:
        with pytest.raises(ValueError) as caught:
            lmm.generate(images, questions, scale=scale, max_new_tokens=1)
        assert says in str(caught.value)
    with pytest.raises(ValueError, match="2 images for 3 questions"):
        lmm.generate(images[:2], questions)
    router = adaptive.router
    X = np.zeros((2, router.feature_spec_.width), dtype=np.float32)
    for knob in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="knob must be a finite number"):
            router.route(X, knob=knob)


def test_isolate_finds_the_samples_that_fail_alone():
    names = list("abcdefgh")
    calls = []

    def process(part):
        calls.append(len(part))
        if any(names[i] in "cf" for i in part):
            raise RuntimeError("boom")
        return [names[i].upper() for i in part]

    kept, results, skipped = isolate(process, names, "run")
    assert results == list("ABDEGH") and kept == [0, 1, 3, 4, 6, 7]
    assert [(s.id, s.reason) for s in skipped] == [
        (x, "model_error: RuntimeError: boom") for x in "cf"
    ]
    assert len(calls) <= 2 * len(names)
    with pytest.raises(ZeroDivisionError):  # every sample failing is the job's problem
        isolate(lambda part: [1 / 0 for _ in part], names[:3], "run")
    with pytest.raises(OSError):
        isolate(lambda part: (_ for _ in ()).throw(OSError(28, "No space left")), names, "run")


# -- router folders ------------------------------------------------------------------------


def edit(folder: Path, name: str, change) -> None:
    path = folder / name
    path.write_text(change(path.read_text()))


ROUTER_FOLDERS = [
    ("missing", lambda f: shutil.rmtree(f), FileNotFoundError, "router folder does not exist"),
    ("no-router-json", lambda f: (f / "router.json").unlink(), FileNotFoundError, "is missing"),
    ("not-json", lambda f: edit(f, "router.json", lambda t: t[:40]), ValueError, "not valid JSON"),
    (
        "missing-key",
        lambda f: edit(f, "router.json", lambda t: t.replace('"scales"', '"scalez"')),
        ValueError,
        "malformed router file: missing key 'scales'",
    ),
    (
        "other-onnx",
        lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes() + b"x"),
        ValueError,
        "do not match the sha256",
    ),
    (
        "other-scales",
        lambda f: edit(f, "router.json", lambda t: t.replace("16\n", "64\n", 1)),
        ValueError,
        "trained for scales",
    ),
    (
        "bad-calibration",
        lambda f: (f / "calibration.json").write_text("[1, 2]"),
        ValueError,
        "calibration.json",
    ),
    (
        "bad-drift",
        lambda f: edit(f, "drift.json", lambda t: t.replace('"groups"', '"gruops"')),
        ValueError,
        "malformed drift reference",
    ),
    (
        "drift-for-other-scales",
        lambda f: edit(
            f, "drift.json", lambda t: t.replace('"scales": [1, 4, 16]', '"scales": [1, 4, 64]')
        ),
        ValueError,
        "drift",
    ),
]


@pytest.mark.parametrize(
    "name, damage, error, says", ROUTER_FOLDERS, ids=[r[0] for r in ROUTER_FOLDERS]
)
def test_bad_router_folders_fail_at_load_and_before_run_writes(
    folders, tmp_path, capsys, name, damage, error, says
):
    router = tmp_path / "router"
    shutil.copytree(folders / "router", router)
    damage(router)
    with pytest.raises(error) as caught:
        AdaptiveLMM.from_pretrained(folders / "model", router, device="cpu")
    assert says in str(caught.value)
    out = tmp_path / "out"
    args = ["run", "--model", str(folders / "model"), "--data", str(tmp_path / "nodata")]
    code = main([*args, "--out", str(out), "--router", str(router), "--workers", "0"])
    assert code == 2 and says in capsys.readouterr().err
    assert not out.exists()


# -- run and label over a folder mixing good samples with every kind of bad one ------------


def write_mixed_folder(folder: Path) -> tuple[set[str], dict[str, str]]:
    """A JSON-lines folder: the good ids, and each bad id with the reason kind it must get."""
    folder.mkdir()
    files = {
        "rgb.png": encoded(picture()),
        "rgba.png": encoded(picture(mode="RGBA")),
        "grey.png": encoded(picture(mode="L")),
        "palette.png": encoded(picture(mode="P")),
        "cmyk.jpg": encoded(picture(mode="CMYK"), "JPEG"),
        "sixteen.png": encoded(picture(mode="L").convert("I;16")),
        "pixel.png": encoded(picture(size=(1, 1))),
        "sliver.png": encoded(picture(size=(300, 7))),
        "anim.gif": encoded(picture(), "GIF", save_all=True, append_images=[picture(mode="P")]),
        "poison.png": encoded(picture(size=(13, 13))),
        "corrupt.png": b"\x89PNG\r\n\x1a\n not an image at all",
        "truncated.png": encoded(picture())[:70],
        "empty.png": b"",
        "text.png": b"hello",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    good = {
        f"g-{n.split('.')[0]}": n
        for n in ("rgb.png", "rgba.png", "grey.png", "palette.png", "cmyk.jpg")
        + ("sixteen.png", "pixel.png", "sliver.png", "anim.gif")
    }
    rows = [
        {"id": i, "image": f, "question": QUESTION, "answers": ["red"]} for i, f in good.items()
    ]
    rows += [
        {
            "id": "g-unicode",
            "image": "rgb.png",
            "question": "what colour is 🟥 ?",
            "answers": "red",
        },
        {"id": "g-spaces", "image": "rgb.png", "question": f"\t{QUESTION}\n", "answers": ["red"]},
    ]
    bad = {
        "b-gone": ("nowhere.png", QUESTION, ["red"], "missing_image"),
        "b-corrupt": ("corrupt.png", QUESTION, ["red"], "unreadable_image"),
        "b-truncated": ("truncated.png", QUESTION, ["red"], "unreadable_image"),
        "b-empty-file": ("empty.png", QUESTION, ["red"], "unreadable_image"),
        "b-text-file": ("text.png", QUESTION, ["red"], "unreadable_image"),
        "b-no-image": (None, QUESTION, ["red"], "missing_image"),
        "b-number-image": (42, QUESTION, ["red"], "unreadable_image"),
        "b-url": ("https://example.com/x.png", QUESTION, ["red"], "missing_image"),
        "b-empty-question": ("rgb.png", "", ["red"], "empty_question"),
        "b-none-question": ("rgb.png", None, ["red"], "empty_question"),
        "b-int-question": ("rgb.png", 42, ["red"], "bad_question"),
        "b-list-question": ("rgb.png", ["what"], ["red"], "bad_question"),
        "b-slot-question": ("rgb.png", "<image> " + QUESTION, ["red"], "bad_question"),
        "b-no-answers": ("rgb.png", QUESTION, [], "no_answers"),
        "b-long-question": ("rgb.png", LONG, ["red"], "prompt_too_long"),
        "b-poison": ("poison.png", QUESTION, ["red"], "model_error"),
    }
    for sample_id, (image, question, answers, _) in bad.items():
        rows.append({"id": sample_id, "image": image, "question": question, "answers": answers})
    rows.insert(3, {"id": "g-rgb", "image": "rgb.png", "question": "again ?", "answers": ["x"]})
    rows.insert(5, {"image": "rgb.png", "question": QUESTION, "answers": ["red"]})
    lines = [json.dumps(r) for r in rows]
    lines.insert(7, "{this line is not JSON")
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    kinds = {sample_id: kind for sample_id, (*_, kind) in bad.items()}
    return set(good) | {"g-unicode", "g-spaces"}, kinds


@pytest.fixture
def poisoned(monkeypatch):
    """The vision tower fails on 13x13 images: a failure inside the model, after the checks."""
    original = NestedLMM.preprocess

    def preprocess(self, images):
        if any(image.size == (13, 13) for image in images):
            raise RuntimeError("the tower cannot take 13x13 images")
        return original(self, images)

    monkeypatch.setattr(NestedLMM, "preprocess", preprocess)


def test_run_and_label_answer_every_good_sample_and_record_every_bad_one(
    folders, tmp_path, poisoned, capsys
):
    good, bad = write_mixed_folder(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--model", str(folders / "model"), "--data", str(tmp_path / "data"), "--workers", "0"]
    sizes = ["--shard-size", "5", "--batch-size", "3", "--max-new-tokens", "2"]
    code = main(["run", *common, *sizes, "--out", str(out), "--router", str(folders / "router")])
    assert code == 0, capsys.readouterr().err
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["id"] for r in results} == good and len(results) == len(good)
    assert all(r["routed_by"] in ("router", "drift") for r in results)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    for shard in sorted((out / "shards").glob("shard-*")):
        skipped += [json.loads(x) for x in (shard / "skipped.jsonl").read_text().splitlines()]
    kinds = {s["id"]: s["reason"].split(":")[0] for s in skipped}
    assert {i: kinds.get(i) for i in bad} == bad
    assert kinds["g-rgb"] == "duplicate_id" and "unreadable_row" in kinds.values()
    assert "the tower cannot take 13x13" in next(
        s["reason"] for s in skipped if s["id"] == "b-poison"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == len(good) and summary["skipped"] == len(skipped)
    assert summary["skip_counts"]["prompt_too_long"] == 1
    assert summary["drift"]["n"] == len(good)

    labels = tmp_path / "labels"
    assert main(["label", *common, *sizes, "--out", str(labels)]) == 0
    from pipelines.labels import read_labels

    labelled = read_labels(labels)
    assert set(labelled.ids) == good and labelled.observed.all()
    assert {s["id"]: s["reason"].split(":")[0] for s in labelled.skipped if s["id"] in bad} == bad


# -- arguments: checked before anything is written ------------------------------------------

RUN_ARGUMENTS = [
    (["--scale", "7"], "scale 7 is not one of the model's scales [1, 4, 16]"),
    (["--scale", "abc"], "scale must be 'auto' or an integer scale of the model, got 'abc'"),
    (["--scale", "4.0"], "got '4.0'"),
    (["--scale", "4", "--budget", "tokens<=4"], "a budget needs scale 'auto'"),
    (["--budget", "tokens<=4"], "a budget needs a router folder"),
    (["--budget", "tokens<=abc", "--router", "{router}"], "cannot parse target"),
    (["--budget", "tokens<=4", "--router", "{bare}"], "a budget needs"),
    (["--budget", "tokens<=0.1", "--router", "{router}"], "no threshold knob reaches"),
    (["--router", "{model}"], "router.json is missing"),
    (["--batch-size", "0"], "expected an integer >= 1, got '0'"),
    (["--shard-size", "-3"], "expected an integer >= 1"),
    (["--limit", "ten"], "expected an integer >= 1, got 'ten'"),
    (["--max-new-tokens", "0"], "expected an integer >= 1"),
    (["--on-drift", "panic"], "invalid choice: 'panic'"),
    (["--model", "{nowhere}"], "config.json is missing"),
    (["--data", "{nowhere}"], "nowhere"),
]


@pytest.mark.parametrize("extra, says", RUN_ARGUMENTS, ids=[" ".join(a) for a, _ in RUN_ARGUMENTS])
def test_run_arguments_fail_before_anything_is_written(folders, tmp_path, capsys, extra, says):
    names = {
        "router": folders / "router",
        "bare": folders / "bare",
        "model": folders / "model",
        "nowhere": tmp_path / "nowhere",
    }
    extra = [a.format(**names) for a in extra]
    out = tmp_path / "out"
    data = tmp_path / "data"
    data.mkdir()
    (data / "samples.jsonl").write_text(json.dumps({"id": "a", "image": None}) + "\n")
    args = ["run", "--model", str(folders / "model"), "--data", str(data), "--out", str(out)]
    try:
        code = main([*args, "--workers", "0", *extra])
    except SystemExit as usage:  # argparse: a usage error, exit status 2
        code = usage.code
    assert code == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


LABEL_SOURCE_MIXES = [
    (["--from-lmms-eval", "{runs}", "--probe-scales", "1"], "--probe-scales cannot be used"),
    (["--from-lmms-eval", "{runs}", "--mode", "cascade"], "--mode cannot be used"),
    (["--from-lmms-eval", "{runs}", "--preset", "docvqa"], "--preset cannot be used"),
    (["--data", "{data}", "--threshold", "0.7"], "--threshold cannot be used with --data"),
    (["--data", "{data}", "--from-lmms-eval", "{runs}"], "give either --data"),
]


@pytest.mark.parametrize(
    "extra, says", LABEL_SOURCE_MIXES, ids=[" ".join(a[2:]) for a, _ in LABEL_SOURCE_MIXES]
)
def test_label_refuses_options_its_source_does_not_read(folders, tmp_path, capsys, extra, says):
    """`label --from-lmms-eval` takes scales, samples and prompts from the runs: an option
    that only `--data` reads (or the other way round) is an error, not silently dropped."""
    names = {"runs": tmp_path / "runs", "data": tmp_path / "data"}
    out = tmp_path / "out"
    args = ["label", "--model", str(folders / "model"), "--out", str(out), "--workers", "0"]
    assert main([*args, *(a.format(**names) for a in extra)]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_start_leaves_nothing_that_refuses_the_corrected_rerun(folders, tmp_path):
    data = tmp_path / "data"
    write_mixed_folder(data)
    out = tmp_path / "out"
    common = ["--model", str(folders / "model"), "--data", str(data), "--out", str(out)]
    assert main(["run", *common, "--workers", "0", "--scale", "7"]) == 2
    assert main(["label", *common, "--workers", "0", "--scales", "1,7"]) == 2
    assert not out.exists()
    out.mkdir()
    (out / "spec.json").write_text('{"job": {"scale": "16"}, "inputs": {}}')  # killed early
    code = main([*["run", *common], "--workers", "0", "--scale", "1", "--limit", "3"])
    assert code == 0 and json.loads((out / "summary.json").read_text())["samples"] >= 1
    out_file = tmp_path / "file"
    out_file.write_text("x")
    assert main(["run", *common[:4], "--out", str(out_file), "--workers", "0"]) == 2


def test_each_image_is_checked_once_per_call(adaptive, monkeypatch):
    import m3core.lmm

    seen = []
    original = m3core.lmm.check_image
    monkeypatch.setattr(m3core.lmm, "check_image", lambda im: seen.append(im) or original(im))
    images = [picture(mode="P"), picture(mode="L"), picture()]
    records = adaptive.generate(images, [QUESTION] * 3, max_new_tokens=1)
    assert len(records) == 3 and len(seen) == 3
