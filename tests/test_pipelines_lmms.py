"""The `adaptive_m3` lmms-eval model, run by lmms-eval itself on a local task over the
synthetic benchmark in TextVQA's layout; labels from its runs against `adaptive-m3 label`;
the likelihood path against transformers' own loss; ANLS and the multiple-choice extraction
against lmms-eval's functions. Skipped where lmms-eval is not installed."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed: pip install -e '.[cpu,test,eval]' and "
    "pip install --no-deps lmms-eval==0.7.3 (docs/evaluation.md)",
)
if not any(ep.name == "adaptive_m3" for ep in entry_points(group="lmms_eval.models")):
    pytest.skip(
        "adaptive_m3 is not registered with lmms-eval: reinstall the project (pip install -e .)",
        allow_module_level=True,
    )

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402

from data import anls, extract_choice, score  # noqa: E402
from data.synthetic import make_split, vocabulary  # noqa: E402
from m3core import MICRO, NestedLMM, tiny_lmm  # noqa: E402
from m3core.features import feature_names, router_features  # noqa: E402
from m3core.modeling import encoder_outputs  # noqa: E402
from m3core.shipped import resolve_model  # noqa: E402
from pipelines.adaptive import AdaptiveLMM  # noqa: E402
from pipelines.cli import main  # noqa: E402
from pipelines.labels import read_labels  # noqa: E402
from pipelines.lmms_labels import LmmsLabelJob, label_from_lmms_eval  # noqa: E402
from pipelines.lmms_plugin import AdaptiveM3  # noqa: E402
from pipelines.lmms_tasks import write_task  # noqa: E402
from predictor import ScaleRouter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "adaptive_m3_textvqa"
SCALES = (1, 36)
MODEL = str(resolve_model("tiny-m3"))


def lmms_eval_run(root: Path, scale: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", "adaptive_m3",
        "--model_args", f"pretrained={MODEL},scale={scale}",
        "--tasks", TASK,
        "--include_path", str(root / "tasks"),
        "--batch_size", "64",
        "--log_samples",
        "--output_path", str(root / f"run-{scale}"),
        "--verbosity", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two lmms-eval runs (scales 1 and 36, side by side) on a local TextVQA-layout file."""
    root = tmp_path_factory.mktemp("lmms")
    split = make_split("test", 5, seed=0, image_size=96)
    split.rename_column("id", "question_id").to_parquet(str(root / "textvqa.parquet"))
    write_task(root / "textvqa.parquet", root / "tasks", preset="textvqa", max_new_tokens=4)
    processes = [lmms_eval_run(root, scale) for scale in SCALES]
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    return root


def results_of(run: Path) -> tuple[dict, list[dict]]:
    (results,) = run.rglob("*_results.json")
    (samples,) = run.rglob(f"*_samples_{TASK}.jsonl")
    return json.loads(results.read_text()), [
        json.loads(x) for x in samples.read_text().split("\n") if x
    ]


def test_lmms_eval_runs_the_plugin_at_each_scale(runs):
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    processor = EvalAIAnswerProcessor()
    model = AdaptiveLMM.from_pretrained(MODEL, device="cpu")
    for scale in SCALES:
        results, samples = results_of(runs / f"run-{scale}")
        assert len(samples) == 20
        assert results["throughput"]["avg_visual_tokens"] == scale
        assert results["throughput"][f"avg_visual_tokens_{TASK}"] == scale
        for row in samples:
            counts = row["token_counts"][0]
            assert (counts["scale"], counts["visual_tokens"], counts["routed_by"]) == (
                scale,
                scale,
                "fixed",
            )
        # the task's score (ours) equals lmms-eval's own answer normalisation + match
        for row in samples:
            (gold,) = ast.literal_eval(row["target"])
            assert row["score"] == float(processor(row["filtered_resps"]) == processor(gold))
        mean = np.mean([row["score"] for row in samples])
        assert results["results"][TASK]["score,none"] == pytest.approx(mean)
        # the answers are the model's own at that scale
        split = make_split("test", 5, seed=0, image_size=96)
        expected = model.generate(
            split["image"],
            [row["input"] for row in samples],
            scale=scale,
            max_new_tokens=4,
            batch_size=64,
        )
        assert [row["filtered_resps"] for row in samples] == [r.text for r in expected]


def test_labels_from_lmms_eval_runs_equal_adaptive_m3_label(runs, tmp_path):
    runs_args = [str(runs / f"run-{s}") for s in SCALES]
    assert main(["label", "--model", MODEL, "--from-lmms-eval", *runs_args,
                 "--out", str(tmp_path / "from-lmms")]) == 0  # fmt: skip
    assert main(["label", "--model", MODEL, "--data", str(runs / "textvqa.parquet"),
                 "--preset", "textvqa", "--scales", ",".join(map(str, SCALES)),
                 "--max-new-tokens", "4", "--workers", "0",
                 "--out", str(tmp_path / "label")]) == 0  # fmt: skip
    ours, theirs = read_labels(tmp_path / "from-lmms"), read_labels(tmp_path / "label")
    assert ours.correct.any() and not ours.correct.all()  # the comparison means something
    assert ours.ids == theirs.ids and ours.scales == theirs.scales == SCALES
    assert ours.groups == theirs.groups and ours.families == theirs.families
    assert ours.answers == theirs.answers
    assert np.array_equal(ours.correct, theirs.correct)
    assert np.array_equal(ours.score, theirs.score)
    np.testing.assert_allclose(ours.features, theirs.features, atol=1e-6)
    np.testing.assert_allclose(ours.flops, theirs.flops)
    np.testing.assert_allclose(ours.confidence, theirs.confidence, atol=1e-4)
    spec = json.loads((tmp_path / "from-lmms" / "spec.json").read_text())
    assert spec["correct_threshold"] == 0.5 and spec["task_metrics"] == {TASK: "score"}
    assert spec["graded"] == {TASK: False}  # one gold answer: VQA accuracy is 0 or 1


def test_runs_that_differ_are_refused(runs, tmp_path):
    def job(*folders, model=MODEL):
        return LmmsLabelJob(runs=tuple(map(str, folders)), model=model, out=str(tmp_path / "x"))

    one, other = runs / f"run-{SCALES[0]}", runs / f"run-{SCALES[1]}"
    with pytest.raises(ValueError, match="same scale"):
        label_from_lmms_eval(job(one, one))
    with pytest.raises(ValueError, match="was run with model"):
        label_from_lmms_eval(job(one, other, model="tiny-mqt"))
    changed = tmp_path / "changed"
    shutil.copytree(other, changed)
    (log,) = changed.rglob("*_samples_*.jsonl")
    rows = log.read_text().splitlines()
    first = json.loads(rows[0])
    first["input"] = "what colour is the sky?"
    log.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match="did not ask the same samples"):
        label_from_lmms_eval(job(one, changed))


# ---------------------------------------------------------------- the model, in process


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("micro") / "model"
    tiny_lmm(vocabulary(), MICRO, seed=0).save_pretrained(folder)
    return folder


def _picture(colour) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


DOCS = [
    {"images": [_picture((200, 20, 20))], "question": "what colour is the shape?"},
    {"images": [_picture((20, 20, 200))], "question": "what shape is in the top left?"},
    {"images": [_picture((20, 200, 20)), _picture((9, 9, 9))], "question": "which one?"},
]


def _plugin(micro_dir, **args) -> AdaptiveM3:
    plugin = AdaptiveM3(pretrained=str(micro_dir), device="cpu", batch_size=8, **args)
    plugin.task_dict = {"t": {"test": DOCS}}
    return plugin


def _request(kind: str, context: str, second, doc_id: int) -> Instance:
    arguments = (context, second, lambda doc: doc["images"], doc_id, "t", "test")
    meta = {"task": "t", "doc_id": doc_id, "repeats": 1}
    return Instance(request_type=kind, arguments=arguments, idx=0, metadata=meta)


def test_generate_until_answers_like_adaptive_lmm_and_records_a_bad_request(micro_dir):
    plugin = _plugin(micro_dir)  # scale=auto without a router: the confidence cascade
    requests = [
        _request("generate_until", d["question"], {"max_new_tokens": 3}, i)
        for i, d in enumerate(DOCS)
    ]
    out = plugin.generate_until(requests)
    expected = AdaptiveLMM.from_pretrained(micro_dir, device="cpu").generate(
        [DOCS[0]["images"][0], DOCS[1]["images"][0]],
        [DOCS[0]["question"], DOCS[1]["question"]],
        max_new_tokens=3,
    )
    for result, record in zip(out[:2], expected, strict=True):
        counts = result.token_counts.to_dict()
        assert result.text == record.text
        assert counts["tried_scales"] == record.tried_scales
        assert counts["visual_tokens"] == sum(record.tried_scales)
        assert counts["routed_by"] == "cascade"
    assert out[2].text == ""
    assert "t doc 2" in out[2].token_counts.skipped
    assert "exactly one image" in out[2].token_counts.skipped


def reference_nll(lmm: NestedLMM, image, question: str, continuation: str, scale: int) -> float:
    """Transformers' own loss of the continuation tokens, the context masked out."""
    prompt = lmm.nesting.prompt_template.format(question=question)
    context = lmm.tokenizer(prompt)["input_ids"]
    whole = lmm.tokenizer(prompt + continuation)["input_ids"]
    at = context.index(lmm.image_token_id)
    ids = whole[:at] + [lmm.image_token_id] * scale + whole[at + 1 :]
    labels = [-100] * (len(context) - 1 + scale) + whole[len(context) :]
    tokens = lmm.visual_tokens(lmm.encode([image]), [scale])
    with torch.no_grad():
        out = lmm.model(
            input_ids=torch.tensor([ids]),
            labels=torch.tensor([labels]),
            mm_encoder_outputs=encoder_outputs(tokens),
        )
    return float(out.loss)


def test_loglikelihood_runs_at_the_requested_scale(micro_dir):
    lmm = NestedLMM.from_pretrained(micro_dir, device="cpu")
    requests = [
        _request("loglikelihood", DOCS[0]["question"], " red", 0),
        _request("loglikelihood", DOCS[0]["question"], " blue square", 0),
        _request("loglikelihood", DOCS[1]["question"], " triangle", 1),
    ]
    values = {}
    for scale in (lmm.scales[0], lmm.scales[-1]):
        out = _plugin(micro_dir, scale=scale).loglikelihood(requests)
        for result, request in zip(out, requests, strict=True):
            context, continuation, _, doc_id, _, _ = request.args
            image = DOCS[doc_id]["images"][0]
            expected = reference_nll(lmm, image, context, continuation, scale)
            assert result.text[0] == pytest.approx(expected, abs=1e-5)
            assert result.token_counts.to_dict()["scale"] == scale
            # lmms-eval's evaluator hands the task the (value, greedy) pair itself
            assert unwrap_generation_output(result)[0] == result.text
        values[scale] = [r.text[0] for r in out]
    assert not np.allclose(values[lmm.scales[0]], values[lmm.scales[-1]])
    with pytest.raises(ValueError, match="needs a router"):
        _plugin(micro_dir).loglikelihood(requests[:1])


def test_vqa_anls_and_choice_extraction_agree_with_lmms_eval():
    from lmms_eval.api.metrics import anls as lmms_anls
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    for prediction, answers in [
        ("Nike", ["nike"]),
        ("nikes", ["nike"]),
        ("$1.0", ["$1.00", "1.00"]),
        ("kitten", ["sitting"]),
        ("abc", ["xyz"]),
        ("abcdef", ["abcxyz"]),
        ("25 March 1998", ["March 25, 1998", "25/03/1998"]),
    ]:
        theirs = lmms_anls(answers, [prediction])["anls"]
        assert anls(prediction, answers) == pytest.approx(theirs), prediction
    ten = ["two"] * 2 + ["2"] + ["three"] * 4 + ["a dog", "Dogs", "dog."]
    for prediction in ["2", "two", "3", "dog", "the dog", "cat"]:
        theirs = textvqa_process_results({"answers": list(ten), "question_id": 0}, [prediction])
        assert score(prediction, ten, "vqa") == pytest.approx(theirs["exact_match"]), prediction
    evaluator = MMBench_Evaluator()
    for text in ["B", "B.", "(C)", "D)", "A: cat", "The answer is C", "I think B, a dog"]:
        assert extract_choice(text) == evaluator.can_infer_option(text), text
    doc = {"choices": ["frog", "whale", "cat"], "answer": 1}
    for text in ["B", "b", "B. whale", "C. cat", "A"]:
        theirs = sqa_process_results(doc, [text])["exact_match"]
        assert score(text, ["B"], "mc") == theirs, text


def test_loglikelihood_runs_at_the_routed_scale(micro_dir, tmp_path):
    """A router trained on the model's own features (a rule on one feature) picks several
    scales; each likelihood is computed at the scale the router picked for its sample."""
    lmm = NestedLMM.from_pretrained(micro_dir, device="cpu")
    rng = random.Random(0)
    images = []
    for _ in range(48):
        image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (16, 0, 32, 32))
        images.append(image)
    question = DOCS[0]["question"]
    X = router_features(lmm, lmm.encode(images), [question] * len(images))
    names = feature_names(lmm)
    rank = np.argsort(np.argsort(X[:, names.index("v1_0")])) / len(X)
    correct = rank[:, None] < ((np.arange(len(lmm.scales)) + 1) / len(lmm.scales))[None, :]
    router = ScaleRouter("logreg", scales=lmm.scales, policy="threshold", knob=0.5, C=10.0)
    router.fit(X, correct, feature_names=names).save(tmp_path / "router")
    plugin = AdaptiveM3(
        pretrained=str(micro_dir), router=str(tmp_path / "router"), device="cpu", batch_size=4
    )
    plugin.task_dict = {"t": {"test": [{"images": [image]} for image in images[:12]]}}
    out = plugin.loglikelihood([_request("loglikelihood", question, " red", i) for i in range(12)])
    chosen = router.route(X[:12]).tolist()
    assert len(set(chosen)) > 1
    assert [r.token_counts.scale for r in out] == chosen
    assert all(r.token_counts.routed_by == "router" for r in out)
    for result, image, scale in zip(out, images, chosen, strict=False):
        assert result.text[0] == pytest.approx(
            reference_nll(lmm, image, question, " red", scale), abs=1e-5
        )
