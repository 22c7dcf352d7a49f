"""Strict checkpoint reading: every weight a model needs comes from the folder, or it fails.

transformers initialises missing weights at random and only warns; for a checkpoint that is to
answer questions that is a silent wrong answer, so here any missing, unexpected or mis-shaped
weight is an error that lists them. Key layouts that Llava checkpoints come in (transformers
4's `language_model.model.*`, what transformers 5 saves, the first shipped nested checkpoints)
are renamed to the model's own names by one table, `KEY_RENAMES`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

KEY_RENAMES = {
    r"^language_model\.model\.": "model.language_model.",
    r"^model\.language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^(model\.)?vision_tower\.vision_model\.": "model.vision_tower.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
    r"^image_newline$": "model.image_newline",
    r"^nesting\.": "model.nesting.",
    r"^grid_position$": "model.grid_position",
}
"""Checkpoint key pattern -> the model's own name (applied in order; none feeds another)."""

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")
ORIGINAL_LLAVA_TYPES = ("llava_llama", "llava_mistral", "llava_mpt", "llava_qwen")


def canonical_key(key: str) -> str:
    for pattern, replacement in KEY_RENAMES.items():
        key = re.sub(pattern, replacement, key)
    return key


def read_model_type(path: Path) -> str:
    """The folder's `model_type`, refused with the way forward unless it is a Llava we load."""
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    if model_type in ORIGINAL_LLAVA_TYPES or "mm_vision_tower" in config:
        raise ValueError(
            f"{path} is in the original LLaVA format (model_type {model_type!r}); convert it "
            "first: adaptive-m3 convert --format llava|llava-next|mqt-llava --src "
            f"{path} --out DIR"
        )
    raise ValueError(
        f"{path}: model_type {model_type!r} is not a Llava checkpoint; expected one of "
        f"{list(SUPPORTED_MODEL_TYPES)}"
    )


def weight_files(path: Path) -> list[Path]:
    """The folder's weight files: safetensors if there are any, else PyTorch `.bin` files."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / name for name in names]
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    found = [f for f in found if not f.name.startswith("training_args")]
    if not found:
        raise FileNotFoundError(f"{path} holds no weights (*.safetensors or *.bin)")
    return found


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every weight, one at a time: safetensors directly, `.bin` through
    `torch.load(weights_only=True)` memory-mapped, so no pickle code runs and 14 GB need not
    fit in memory at once."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    yield key, handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every weight, reading safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            shapes |= {key: tuple(value.shape) for key, value in state.items()}
    return shapes


def key_problems(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    optional: set[str] = frozenset(),
) -> list[str]:
    """Human-readable lines for missing, unexpected and mis-shaped keys (empty: all fine)."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{key}: checkpoint {list(found[key])}, model {list(expected[key])}"
        for key in set(found) & set(expected)
        if tuple(found[key]) != tuple(expected[key])
    )
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
            lines.append(f"{title}: {shown}")
    return lines


def check_weights(path: Path, model_class, config) -> None:
    """Compare the folder's weights with what `model_class(config)` holds, before loading."""
    with torch.device("meta"):
        skeleton = model_class(config)
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    optional = set()
    if config.get_text_config().tie_word_embeddings:
        optional = set(getattr(skeleton, "_tied_weights_keys", None) or {})
    found: dict[str, tuple[int, ...]] = {}
    for key, shape in tensor_shapes(weight_files(path)).items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints store the rotary frequencies the model recomputes
        found[canonical_key(key)] = shape
    problems = key_problems(found, expected, optional)
    if problems:
        raise ValueError(f"{path} does not match its config:\n  " + "\n  ".join(problems))


def load_model(path: Path, model_class, config, dtype: torch.dtype):
    """`model_class.from_pretrained` on a folder whose weights were checked to match exactly."""
    check_weights(path, model_class, config)
    model, info = model_class.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        local_files_only=True,
        key_mapping=KEY_RENAMES,
        output_loading_info=True,
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ValueError(f"{path}: weights did not load cleanly: {problems or info['error_msgs']}")
    return model
