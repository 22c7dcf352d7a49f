"""Stage 1 of the tiny default: pretrain the vision tower on dense per-patch targets.

This plays CLIP's role for LLaVA. Joint from-scratch training of the tiny model learns global
attributes in minutes, but after ~900 steps (21 min on 2 CPU cores) quadrant, counting, small
shapes and digits were still at chance. Linear heads on the tokens the projector sees, trained
on what each patch holds (object colour, shape, digit, size class, object centre, background),
make those features exist before the LLM has to read them."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data.schema import sample_meta
from data.synthetic import BACKGROUNDS, COLOURS, GLYPHS, SHAPES, SIZE_CLASSES, patch_targets
from m3core.config import grid_side
from m3core.lmm import NestedLMM
from m3core.train import image_groups, latest_checkpoint, load_checkpoint, save_checkpoint

PATCH_CLASSES = {
    "colour": len(COLOURS),
    "shape": len(SHAPES),
    "glyph": len(GLYPHS),
    "size": len(SIZE_CLASSES),
    "centre": 2,
}


@dataclass
class DenseConfig:
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 100
    eval_images: int = 256
    oversample_fine: float = 2.0
    images: int | None = None


class DenseHeads(nn.Module):
    """Linear read-outs of every patch token, plus the background from the mean token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.patch = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in PATCH_CLASSES.items()})
        self.background = nn.Linear(dim, len(BACKGROUNDS))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {k: head(features) for k, head in self.patch.items()}
        logits["background"] = self.background(features.mean(1))
        return logits


def stack_targets(metas: list[dict], grid: int, image_size: int) -> dict[str, torch.Tensor]:
    per_image = [patch_targets(m, grid, image_size) for m in metas]
    return {k: torch.from_numpy(np.stack([t[k] for t in per_image])) for k in per_image[0]}


def class_weights(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse square-root frequency: rare classes (digits, small objects) still count."""
    counts = torch.bincount(targets.flatten(), minlength=classes).float().clamp(min=1)
    weights = counts.rsqrt()
    return weights / weights.mean()


def dense_loss(logits, targets, weights) -> torch.Tensor:
    total = F.cross_entropy(logits["background"], targets["background"])
    for key in PATCH_CLASSES:
        flat = logits[key].reshape(-1, logits[key].shape[-1])
        total = total + F.cross_entropy(flat, targets[key].reshape(-1), weight=weights[key])
    return total


@torch.no_grad()
def dense_accuracy(logits, targets) -> dict[str, float]:
    """Accuracy per target; colour/shape/glyph/size only on patches that hold that thing."""
    scores = {
        "background": float(
            (logits["background"].argmax(-1) == targets["background"]).float().mean()
        )
    }
    for key in PATCH_CLASSES:
        gold = targets[key].reshape(logits[key].shape[:-1])
        hit = logits[key].argmax(-1) == gold
        relevant = gold > 0 if key != "centre" else torch.ones_like(gold, dtype=torch.bool)
        scores[key] = float(hit[relevant].float().mean()) if relevant.any() else float("nan")
    return scores


def pretrain_vision(
    lmm: NestedLMM,
    dataset,
    config: DenseConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, float]:
    """Train the vision tower with dense heads; returns held-out accuracy per target."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = lmm.model
    first_rows = [group[0] for group in image_groups(dataset, config.images)]
    rows = dataset.select(first_rows)
    metas = [sample_meta(r) for r in rows]
    grid = grid_side(model.config)
    image_size = model.config.vision_config.image_size
    targets = stack_targets(metas, grid, image_size)
    targets = {k: v.reshape(len(metas), -1) if v.dim() == 3 else v for k, v in targets.items()}
    n_eval = min(config.eval_images, len(metas) // 5)
    train_ids = list(range(n_eval, len(metas)))
    fine = [
        i
        for i in train_ids
        if any(o["size_class"] == "small" or o["glyph"] for o in metas[i]["objects"])
    ]
    weights = {k: class_weights(targets[k][train_ids], n) for k, n in PATCH_CLASSES.items()}

    heads = DenseHeads(model.config.vision_config.hidden_size).to(lmm.device)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    torch.manual_seed(config.seed)
    start = 0
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, lmm, optimizer, extra=heads)

    images = rows["image"]
    pixels = torch.cat(
        [lmm.pixel_values(images[i : i + 256]).cpu() for i in range(0, len(images), 256)]
    )
    use_autocast = lmm.device.type == "cuda"
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="vision", unit="step")
    scores: dict[str, float] = {}
    log = (out_dir / "train_log.jsonl").open("a")
    for step in range(start, config.steps):
        rng = random.Random(config.seed * 1_000_003 + step)
        pool = train_ids + fine * max(0, round(config.oversample_fine) - 1)
        batch = rng.sample(pool, min(config.batch_size, len(pool)))
        model.model.vision_tower.train()
        heads.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            feats = model.vision_features(pixels[batch].to(lmm.device, lmm.dtype))
            gold = {k: v[batch].to(lmm.device) for k, v in targets.items()}
            loss = dense_loss(
                heads(feats.float()), gold, {k: w.to(lmm.device) for k, w in weights.items()}
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        record = {"step": done, "loss": float(loss.detach())}
        if done % config.checkpoint_every == 0 or done == config.steps:
            scores = evaluate_dense(
                lmm, heads, pixels[:n_eval], {k: v[:n_eval] for k, v in targets.items()}
            )
            record["eval"] = scores
            save_checkpoint(
                out_dir / f"checkpoint-{done}", lmm, optimizer, done, config, extra=heads
            )
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            **{k: f"{v:.2f}" for k, v in scores.items() if k in ("shape", "glyph")},
        )
    bar.close()
    log.close()
    model.eval()
    lmm.save_pretrained(out_dir / "model")
    (out_dir / "dense_eval.json").write_text(
        json.dumps({"config": asdict(config), "accuracy": scores}, indent=1)
    )
    return scores


@torch.no_grad()
def evaluate_dense(lmm: NestedLMM, heads: DenseHeads, pixels, targets) -> dict[str, float]:
    if len(pixels) == 0:
        return {}
    lmm.model.eval()
    heads.eval()
    feats = lmm.model.vision_features(pixels.to(lmm.device, lmm.dtype)).float()
    return dense_accuracy(heads(feats), {k: v.to(lmm.device) for k, v in targets.items()})
