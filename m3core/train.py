"""Matryoshka instruction tuning of a `NestedLMM` on any dataset of image / question / answers.

Pooled (M3): every batch runs the LLM at every scale and the loss is the plain mean over scales.
Query (MQT): every step draws one m from the scales ("tail-token dropping"). All QA pairs of one
image go into one sequence, so the image is encoded once per step for all of its questions.
Checkpoints hold weights (safetensors), optimizer and RNG state (safetensors) and a JSON state:
a run started again with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from m3core.evaluate import scale_accuracy
from m3core.lmm import NestedLMM
from m3core.modeling import NestedLlavaForConditionalGeneration, encoder_outputs

PARTS = ("vision", "projector", "nesting", "llm")


@dataclass
class TrainConfig:
    """One training stage. `trainable` names the parts that learn; the rest stay frozen.

    `scales_per_step`: None follows each paper (pool: all scales every batch, M3; query: one
    m per step, MQT); k draws k distinct scales per step (seeded), which on a 2-layer LLM
    learns several times faster per CPU second than the all-scale mean. `images` trains on the
    split's first N images only (`image_groups`).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    scales: tuple[int, ...] | None = None
    trainable: tuple[str, ...] = PARTS
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200
    eval_samples: int = 128
    max_qa_per_image: int = 8
    scales_per_step: int | None = None
    images: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.trainable) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {PARTS}")
        if self.scales is not None:
            self.scales = tuple(int(s) for s in self.scales)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    loss_per_scale: dict[int, float]
    eval_accuracy: dict[int, float]
    output_dir: str


def group_by_image(dataset) -> list[list[int]]:
    """Row indices grouped by `meta.image_id` when the rows carry it, else one row a group."""
    if "meta" not in dataset.column_names:
        return [[i] for i in range(len(dataset))]
    groups: dict[str, list[int]] = defaultdict(list)
    for index, meta in enumerate(dataset["meta"]):
        values = json.loads(meta) if isinstance(meta, str) else (meta or {})
        groups[str(values.get("image_id", f"row-{index}"))].append(index)
    return list(groups.values())


def image_groups(dataset, images: int | None = None) -> list[list[int]]:
    """`group_by_image`, cut to the first `images` images (None: all of them).

    The synthetic splits seed each image by its index, so a larger train split starts with the
    same images: a recipe can grow its data for a late stage while earlier stages, capped at
    the old size, still reproduce.
    """
    groups = group_by_image(dataset)
    check_image_count(images, len(groups))
    return groups[:images]


def check_image_count(images: int | None, available: int, stage: str = "the stage") -> None:
    """A stage's `images` must name between 1 and all of the split's images."""
    if images is not None and not 1 <= images <= available:
        raise ValueError(
            f"{stage} reads the first {images} images but the train split has {available}; "
            "make a larger split (make-benchmark --sizes train=N)"
        )


def answer_of(row: dict) -> str:
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        return answers
    if not answers:
        raise ValueError(f"sample {row.get('id', '?')}: no gold answer to train on")
    return answers[0]


def part_modules(lmm: NestedLMM) -> dict[str, list[torch.nn.Module]]:
    model = lmm.model
    return {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "nesting": [model.nesting] if model.nesting is not None else [],
        "llm": [model.model.language_model, model.lm_head],
    }


def part_parameters(lmm: NestedLMM) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters per part; the grid position embedding belongs to the projector."""
    params = {
        part: [p for module in modules for p in module.parameters()]
        for part, modules in part_modules(lmm).items()
    }
    if lmm.model.grid_position is not None:
        params["projector"].append(lmm.model.grid_position)
    return params


class SequenceBuilder:
    """Token ids and labels of one image's QA turns at a given scale (answers + EOS supervised).

    When the template puts the image first (LLaVA's), all turns share one sequence and so one
    copy of the image tokens. When the question comes first, the image tokens can attend to
    their question, which only holds for the first turn of a sequence: each turn then gets its
    own sequence, as it will at inference.
    """

    def __init__(self, lmm: NestedLMM) -> None:
        self.lmm = lmm
        template = lmm.nesting.prompt_template
        self.question_first = template.index("{question}") < template.index("<image>")
        self.later_turn = template.replace("<image>\n", "").replace("<image>", "").strip()
        self.eos = lmm.tokenizer.eos_token_id

    def words(self, text: str) -> list[int]:
        return self.lmm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(self, turns: list[tuple[str, str]], scale: int) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) of each sequence the turns make: one, or one per turn."""
        if self.question_first:
            return [self._sequence([turn], scale) for turn in turns]
        return [self._sequence(turns, scale)]

    def _sequence(self, turns: list[tuple[str, str]], scale: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for index, (question, answer) in enumerate(turns):
            if index == 0:
                prompt = self.lmm.prompt_ids([question], [scale])[0]
            else:
                prompt = self.words(self.later_turn.format(question=question))
            target = self.words(answer) + [self.eos]
            ids += prompt + target
            labels += [-100] * len(prompt) + target
        return ids, labels


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def make_scheduler(optimizer, config: TrainConfig, last_step: int = 0):
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if last_step:
        scheduler.last_epoch = last_step
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor(last_step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def save_checkpoint(
    path: Path, lmm: NestedLMM, optimizer, step: int, config, extra: torch.nn.Module | None = None
) -> None:
    """Weights, optimizer and RNG state, and `extra` (e.g. training heads), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lmm.save_pretrained(tmp)
    tensors = {"rng.torch": torch.get_rng_state()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
    for name, value in (extra.state_dict() if extra is not None else {}).items():
        tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, tmp / "trainer_state.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps(
            {"step": step, "config": asdict(config), "param_groups": state["param_groups"]},
            indent=1,
        )
    )
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (`.tmp` ones are half-written)."""
    return sorted(out_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(
    path: Path, lmm: NestedLMM, optimizer, extra: torch.nn.Module | None = None
) -> int:
    saved = NestedLlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    lmm.model.load_state_dict(saved.state_dict())
    tensors = load_file(path / "trainer_state.safetensors")
    meta = json.loads((path / "trainer_state.json").read_text())
    state: dict = {"state": defaultdict(dict), "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state["state"][int(index)][name] = value
    state["state"] = dict(state["state"])
    if extra is not None:
        extra.load_state_dict(
            {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        )
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def train(
    lmm: NestedLMM,
    dataset,
    config: TrainConfig,
    out_dir: str | Path,
    eval_dataset=None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `lmm` in place for `config.steps` steps; resumes from the newest checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = lmm.model
    scales = config.scales or lmm.scales
    lmm.check_scales(scales)

    params = []
    for part, part_params in part_parameters(lmm).items():
        for param in part_params:
            param.requires_grad_(part in config.trainable)
        params += part_params if part in config.trainable else []
    if not params:
        raise ValueError(f"nothing to train: {config.trainable} has no parameters in this model")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config)

    torch.manual_seed(config.seed)
    start = 0
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, lmm, optimizer)
        scheduler = make_scheduler(optimizer, config, last_step=start)

    groups = image_groups(dataset, config.images)
    builder = SequenceBuilder(lmm)
    use_autocast = lmm.device.type == "cuda"
    losses: dict[int, float] = {}
    loss_value = float("nan")
    eval_accuracy: dict[int, float] = {}
    log = (out_dir / "train_log.jsonl").open("a")
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train", unit="step")
    for step in range(start, config.steps):
        batch_groups = batch_for_step(groups, step, config)
        rows = [[dataset[i] for i in group[: config.max_qa_per_image]] for group in batch_groups]
        images = [group[0]["image"] for group in rows]
        turns = [[(r["question"], answer_of(r)) for r in group] for group in rows]

        train_mode(lmm, config)
        step_scales = scales_for_step(scales, lmm.nesting.kind, config, step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss, losses = matryoshka_loss(lmm, builder, images, turns, step_scales)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        done = step + 1
        record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
        record["loss_per_scale"] = {str(k): round(v, 4) for k, v in losses.items()}
        if eval_dataset is not None and (done % config.eval_every == 0 or done == config.steps):
            model.eval()
            eval_accuracy = scale_accuracy(lmm, eval_dataset, scales, config.eval_samples)
            record["eval_accuracy"] = {str(k): v for k, v in eval_accuracy.items()}
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_value:.3f}",
            **{f"acc@{k}": f"{v:.2f}" for k, v in eval_accuracy.items()},
        )
        if on_step is not None:
            on_step(done, loss_value)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(out_dir / f"checkpoint-{done}", lmm, optimizer, done, config)
            prune_checkpoints(out_dir, config.keep_checkpoints)
    bar.close()
    log.close()
    model.eval()
    lmm.save_pretrained(out_dir / "model")
    return TrainResult(
        steps=config.steps,
        final_loss=loss_value,
        loss_per_scale=losses,
        eval_accuracy=eval_accuracy,
        output_dir=str(out_dir),
    )


def matryoshka_loss(
    lmm: NestedLMM,
    builder: SequenceBuilder,
    images: list,
    turns: list[list[tuple[str, str]]],
    scales: tuple[int, ...],
) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean of the answer loss over `scales`, all from one encoding of the images."""
    model = lmm.model
    nested = model.nest(model.image_grid(lmm.pixel_values(images)))
    total = torch.zeros((), device=lmm.device)
    per_scale = {}
    for scale in scales:
        sequences, owners = [], []
        for image, image_turns in enumerate(turns):
            built = builder.build(image_turns, scale)
            sequences += built
            owners += [image] * len(built)
        tokens = model.visual_tokens(nested, scale)[owners]
        ids = pad_right([s[0] for s in sequences], lmm.tokenizer.pad_token_id)
        labels = pad_right([s[1] for s in sequences], -100)
        mask = pad_right([[1] * len(s[0]) for s in sequences], 0)
        out = model(
            input_ids=ids.to(lmm.device),
            attention_mask=mask.to(lmm.device),
            labels=labels.to(lmm.device),
            mm_encoder_outputs=encoder_outputs(list(tokens)),
        )
        total = total + out.loss
        per_scale[scale] = float(out.loss.detach())
    return total / len(scales), per_scale


def scales_for_step(
    scales: tuple[int, ...], kind: str, config: TrainConfig, step: int
) -> tuple[int, ...]:
    count = config.scales_per_step or (len(scales) if kind == "pool" else 1)
    if count >= len(scales):
        return tuple(scales)
    rng = random.Random(config.seed * 1_000_003 + step)
    return tuple(sorted(rng.sample(list(scales), count)))


def batch_for_step(groups: list[list[int]], step: int, config: TrainConfig) -> list[list[int]]:
    """The step's image groups: epochs are seeded permutations, so a resumed run sees the same."""
    per_epoch = max(1, len(groups) // config.batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(len(groups)))
    random.Random(config.seed * 7919 + epoch).shuffle(order)
    picked = order[offset * config.batch_size : (offset + 1) * config.batch_size]
    if not picked:
        picked = order[: config.batch_size]
    return [groups[i] for i in picked]


def train_mode(lmm: NestedLMM, config: TrainConfig) -> None:
    """Train mode for learning parts only: a frozen tower keeps its BatchNorm statistics."""
    lmm.model.eval()
    for part, modules in part_modules(lmm).items():
        if part in config.trainable:
            for module in modules:
                module.train()


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    found = checkpoints(out_dir)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
