"""End to end on converted replicas: convert, label, granularity, train-router, tune, run."""

import json

import pytest
import torch
from datasets import Dataset

from data.schema import SAMPLE_FEATURES
from m3core import NestedLMM
from pipelines.cli import main
from pipelines.labels import read_labels
from tests import replicas

QUESTIONS = ("what colour is the left side ?", "what is the right side ?")


def samples(lmm: NestedLMM, n_images: int = 6) -> list[dict]:
    """Samples whose gold answer is what the (random) model says at the smallest scale for
    half of them and at the largest for the others, so the labels are not all one class."""
    pics = replicas.images(n_images)
    rows = []
    for i, pic in enumerate(pics):
        for j, question in enumerate(QUESTIONS):
            scale = lmm.scales[0] if (i + j) % 2 else lmm.scales[-1]
            answer = lmm.generate([pic], [question], scale, max_new_tokens=6)[0].text
            rows.append(
                {
                    "id": f"img{i}-q{j}",
                    "image": pic,
                    "question": question,
                    "answers": [answer or "red"],
                    "meta": json.dumps({"image_id": f"img{i}"}),
                }
            )
    return rows


@pytest.mark.parametrize("fmt", ["llava", "llava-next", "mqt-llava"])
def test_convert_then_label_granularity_train_router_tune_run(fmt, tmp_path, capsys):
    if fmt == "llava":
        src, tower, _ = replicas.original_llava(tmp_path / "src", seed=11)
    elif fmt == "llava-next":
        src, tower, _ = replicas.original_llava_next(tmp_path / "src", seed=11)
    else:
        src, tower, _, _ = replicas.original_mqt(tmp_path / "src", seed=11)
    model = tmp_path / "model"
    args = ["--format", fmt, "--src", str(src), "--vision-tower", str(tower)]
    assert main(["convert", *args, "--out", str(model), "--dtype", "float32"]) == 0
    lmm = NestedLMM.from_pretrained(model, device="cpu")
    data = tmp_path / "data"
    Dataset.from_list(samples(lmm), features=SAMPLE_FEATURES).save_to_disk(str(data))

    labels = tmp_path / "labels"
    common = ["--model", str(model), "--data", str(data), "--workers", "0", "--metric", "exact"]
    assert main(["label", *common, "--out", str(labels)]) == 0
    labelled = read_labels(labels)
    assert len(labelled) == 12 and labelled.correct.any() and not labelled.correct.all()
    pics = replicas.images(6)
    expected = [
        [lmm.token_count(s, pics[i // 2].size[::-1]) for s in lmm.scales] for i in range(12)
    ]
    assert labelled.visual_tokens.tolist() == expected  # what each image's layout gives
    if fmt == "llava-next":
        assert (labelled.tokens > torch.tensor(lmm.scales).numpy()).all()
    else:
        assert labelled.tokens.tolist() == list(lmm.scales)

    assert main(["granularity", "--labels", str(labels), "--out", str(tmp_path / "gran")]) == 0
    router = tmp_path / "router"
    assert main(["train-router", "--labels", str(labels), "--out", str(router), "--cv", "2"]) == 0
    budget = f"tokens<={labelled.tokens.mean():.1f}"
    assert main(["tune", "--labels", str(labels), "--router", str(router), "--target", budget]) == 0
    run = tmp_path / "run"
    assert main([*["run", *common, "--out", str(run), "--router", str(router)]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == 12, summary
    capsys.readouterr()
