"""Convert released checkpoints in the original LLaVA format into folders `NestedLMM` loads.

The formats (what their code reads; `--format` names which one a folder is):
- `llava`: LLaVA-1.5 and M3's `llava-v1.5-7b-m3`. `config.json` is the LLM's Llama config plus
  `mm_*` fields, `model_type` `llava_llama`; weights `model.embed_tokens`, `model.layers.*`,
  `model.norm`, `lm_head`, and the two-layer projector `model.mm_projector.0/.2`
  (`mm_projector_type` `mlp2x_gelu`). The CLIP tower is not in the checkpoint: it is the
  folder `mm_vision_tower` names (a whole CLIPModel; only `vision_model.*` is used), layer
  `mm_vision_select_layer`, CLS dropped for `mm_vision_select_feature` `patch`. Images are
  padded to a square with the processor's mean colour (`image_aspect_ratio` `pad`).
- `llava-next`: LLaVA-NeXT and M3's `llava-next-vicuna-7b-m3`. As `llava`, plus
  `model.image_newline`, `image_aspect_ratio` `anyres`, `image_grid_pinpoints`,
  `mm_patch_merge_type` `spatial_unpad`; the tower was fine-tuned, so its weights are in the
  checkpoint under `model.vision_tower.vision_tower.vision_model.*` (its config and image
  processor still come from the CLIP folder).
- `mqt-llava`: MQT-LLaVA. As `llava`, but the projector is a Resampler under
  `model.query_abstractor.*` (`query`, `pos_embed`, `ln_q/k/v`, `attn`, `proj`) with 16 heads.

Every other key is refused, as is any expected key that is missing or has another shape, all
listed in one error before anything is written. Rotary `inv_freq` buffers and a CLIP folder's
text half are known and skipped. LLaVA splices the image into the prompt by position; the
converted tokenizer gets an `<image>` token instead, with one new embedding row (the mean row:
it is never read, the image replaces it) and an all-zero `lm_head` row that generation
suppresses, so the logits over the original vocabulary are the original model's.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
)

from m3core.config import RESAMPLER, NestingConfig, grid_side
from m3core.loading import (
    ORIGINAL_LLAVA_TYPES,
    iter_tensors,
    key_problems,
    tensor_shapes,
    weight_files,
)
from m3core.modeling import NESTED_CLASSES
from m3core.nesting import pool_scales

FORMATS = ("llava", "llava-next", "mqt-llava")
VICUNA_V1_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. "
    "USER: <image>\n{question} ASSISTANT:"
)
"""LLaVA-1.5's `vicuna_v1` conversation, which the M3 and MQT-LLaVA evaluations use."""
MQT_HEADS = 16
SHARD_BYTES = 2 * 2**30
LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "mlp_bias",
    "head_dim",
)
CLIP_UNUSED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


@dataclass
class Source:
    """A checkpoint in the original format, read and checked; `shapes` maps each weight
    file (the checkpoint's, then the CLIP folder's where the tower is not inside) to its
    key -> shape table."""

    folder: Path
    fmt: str
    config: dict
    tower: Path
    shapes: dict[Path, dict[str, tuple[int, ...]]]

    @property
    def anyres(self) -> bool:
        return self.fmt == "llava-next"

    def checkpoint_keys(self) -> dict[str, tuple[int, ...]]:
        return {
            k: v
            for file, table in self.shapes.items()
            if file.parent == self.folder
            for k, v in table.items()
        }


def read_source(fmt: str, src: str | Path, vision_tower: str | Path | None = None) -> Source:
    """The original folder and its CLIP folder; a ValueError says what does not fit `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    folder = Path(src)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: config.json is missing")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ORIGINAL_LLAVA_TYPES:
        raise ValueError(
            f"{folder}: model_type {config.get('model_type')!r} is not the original LLaVA "
            f"format ({', '.join(ORIGINAL_LLAVA_TYPES)}); a llava-hf folder loads as it is"
        )
    if config["model_type"] != "llava_llama":
        raise ValueError(
            f"{folder}: only Llama LLMs (llava_llama) convert, not {config['model_type']}"
        )
    anyres = config.get("image_aspect_ratio") == "anyres"
    if anyres != (fmt == "llava-next"):
        raise ValueError(
            f"{folder} has image_aspect_ratio {config.get('image_aspect_ratio')!r}: "
            + ("use --format llava-next" if anyres else "--format llava-next needs 'anyres'")
        )
    if anyres and "unpad" not in config.get("mm_patch_merge_type", ""):
        raise ValueError(f"{folder}: anyres needs mm_patch_merge_type spatial_unpad")
    if fmt != "mqt-llava" and config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(
            f"{folder}: mm_projector_type {config.get('mm_projector_type')!r}; only LLaVA-1.5's "
            "mlp2x_gelu projector converts"
        )
    shapes = {file: tensor_shapes([file]) for file in weight_files(folder)}
    in_checkpoint = any(k.startswith("model.vision_tower.") for t in shapes.values() for k in t)
    named = vision_tower or config.get("mm_vision_tower", "")
    tower = Path(named)
    if not (tower / "config.json").is_file():
        raise FileNotFoundError(
            f"the CLIP tower {str(named)!r} is not a local folder with a config.json; download "
            f"it ({config.get('mm_vision_tower', 'openai/clip-vit-large-patch14-336')}) and "
            "pass --vision-tower DIR"
        )
    if not in_checkpoint:
        if tower.resolve() == folder.resolve():
            raise ValueError(f"{folder}: the CLIP tower must be a folder of its own")
        shapes |= {file: tensor_shapes([file]) for file in weight_files(tower)}
    return Source(folder, fmt, config, tower, shapes)


def tower_config(tower: Path) -> CLIPVisionConfig:
    values = json.loads((tower / "config.json").read_text())
    if values.get("model_type") == "clip":
        values = values["vision_config"]
    elif values.get("model_type") != "clip_vision_model":
        raise ValueError(
            f"{tower} is not a CLIP checkpoint (model_type {values.get('model_type')!r})"
        )
    return CLIPVisionConfig.from_dict(values)


def text_config(config: dict, vocab: int, dtype: torch.dtype) -> LlamaConfig:
    fields = {k: config[k] for k in LLAMA_FIELDS if config.get(k) is not None}
    if config.get("rope_scaling"):
        raise ValueError(f"rope_scaling {config['rope_scaling']} does not convert")
    theta = float(config.get("rope_theta", 10000.0))
    return LlamaConfig(
        **(fields | {"vocab_size": vocab}),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=False,
        dtype=dtype,
    )


def target_config(source: Source, vocab: int, image_id: int, dtype: torch.dtype, text_tokens):
    """The Llava / LlavaNext config of the converted folder, nesting included."""
    config = source.config
    layer = config.get("mm_vision_select_layer", -2)
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {feature!r} does not convert")
    common = {
        "vision_config": tower_config(source.tower).to_dict(),
        "text_config": text_config(config, vocab, dtype).to_dict(),
        "image_token_index": image_id,
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": "default" if feature == "patch" else "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "dtype": dtype,
    }
    if source.anyres:
        pinpoints = config["image_grid_pinpoints"]
        if isinstance(pinpoints, str):
            pinpoints = ast.literal_eval(pinpoints)
        built = LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in pinpoints])
    else:
        built = LlavaConfig(**common)
    side = grid_side(built)
    built.image_seq_length = side * side
    if source.fmt == "mqt-llava":
        shape = source.checkpoint_keys().get("model.query_abstractor.query")
        if shape is None:
            raise ValueError(f"{source.folder} has no model.query_abstractor.query: not MQT-LLaVA")
        queries = shape[0]
        nesting = NestingConfig(RESAMPLER, num_queries=queries, num_heads=MQT_HEADS)
    else:
        nesting = NestingConfig(scales=pool_scales(side))
    nesting.prompt_template = VICUNA_V1_TEMPLATE
    nesting.text_tokens = text_tokens
    built.nesting = nesting.to_dict()
    return built


def target_key(source: Source, key: str) -> str | None:
    """The converted name of an original checkpoint key; None: known and not used."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "model.vision_tower." + key.removeprefix(
            "model.vision_tower.vision_tower.vision_model."
        )
    if key == "model.image_newline":
        return key if source.anyres else None  # a flat merge never reads it
    if key.startswith("model.mm_projector.") and source.fmt != "mqt-llava":
        index, _, rest = key.removeprefix("model.mm_projector.").partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        return f"model.multi_modal_projector.{linear}.{rest}" if linear else key
    if key.startswith("model.query_abstractor.") and source.fmt == "mqt-llava":
        return "model.nesting." + key.removeprefix("model.query_abstractor.")
    if key == "lm_head.weight":
        return key
    if key.startswith("model.") and key.split(".")[1] in ("embed_tokens", "layers", "norm"):
        return "model.language_model." + key.removeprefix("model.")
    return key  # unexpected: reported under its own name


def tower_key(key: str) -> str | None:
    """The converted name of a CLIP folder key; None: the text half, or position ids."""
    if key.startswith(CLIP_UNUSED) or key.endswith("position_ids"):
        return None
    if key.startswith("vision_model."):
        return "model.vision_tower." + key.removeprefix("vision_model.")
    return "clip:" + key  # unexpected


def planned_tensors(source: Source) -> Iterator[tuple[str, str, tuple[int, ...], Path]]:
    """(original key, converted key, shape, file) of every tensor that will be written."""
    for file, table in source.shapes.items():
        in_tower = file.parent != source.folder
        for key, shape in table.items():
            converted = tower_key(key) if in_tower else target_key(source, key)
            if converted is not None:
                yield key, converted, shape, file


def check_plan(source: Source, model_config, vocab: int, rows: int) -> None:
    """Every expected tensor present with its shape, nothing else: else one ValueError."""
    with torch.device("meta"):
        skeleton = NESTED_CLASSES[model_config.model_type](model_config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {}
    for key, converted, shape, _ in planned_tensors(source):
        if converted in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if shape[0] != vocab:
                raise ValueError(f"{key} has {shape[0]} rows, config vocab_size is {vocab}")
            shape = (rows, *shape[1:])
        found[converted] = shape
    optional = set()
    if source.config.get("tie_word_embeddings"):
        optional = {"lm_head.weight"}
    problems = key_problems(found, expected, optional)
    if problems:
        where = ", ".join(sorted({str(file.parent) for file in source.shapes}))
        raise ValueError(f"{where} is not a {source.fmt} checkpoint:\n  " + "\n  ".join(problems))


def converted_tensors(source: Source, rows: int, dtype: torch.dtype):
    """(converted key, tensor) one at a time; the vocabulary grown to `rows`."""
    tied = tied_head(source)
    wanted: dict[Path, dict[str, str]] = {}
    for key, converted, _, file in planned_tensors(source):
        wanted.setdefault(file, {})[key] = converted
    for file, names in wanted.items():
        for key, tensor in iter_tensors([file]):
            if key not in names:
                continue
            converted = names[key]
            tensor = tensor.to(dtype)
            if converted == "model.language_model.embed_tokens.weight":
                extra = tensor.float().mean(0, keepdim=True).to(dtype)
                grown = torch.cat([tensor, extra.expand(rows - len(tensor), -1)])
                yield converted, grown
                if tied:
                    yield "lm_head.weight", head_rows(tensor, rows)
            elif converted == "lm_head.weight":
                yield converted, head_rows(tensor, rows)
            else:
                yield converted, tensor


def tied_head(source: Source) -> bool:
    """A checkpoint that ties its head to the embeddings stores no lm_head: it is copied."""
    tied = source.config.get("tie_word_embeddings", False)
    return bool(tied) and "lm_head.weight" not in source.checkpoint_keys()


def head_rows(head: torch.Tensor, rows: int) -> torch.Tensor:
    """The LM head with all-zero rows for the added tokens (suppressed in generation)."""
    return torch.cat([head, head.new_zeros(rows - len(head), head.shape[1])])


def write_shards(tensors, count: int, out: Path, progress: bool) -> None:
    """Safetensors shards of at most SHARD_BYTES and their index, with a progress bar."""
    shard: dict[str, torch.Tensor] = {}
    size, names, weight_map = 0, [], {}

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))

    bar = tqdm(total=count, desc="convert", unit="tensor", disable=not progress)
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[key] = tensor.contiguous()
        size += nbytes
        bar.update(1)
    if shard:
        flush()
    bar.close()
    final = {}
    for index, name in enumerate(names, start=1):
        renamed = f"model-{index:05d}-of-{len(names):05d}.safetensors"
        (out / name).rename(out / renamed)
        final[name] = renamed
    index = {"metadata": {}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def image_processor(source: Source):
    """The CLIP folder's preprocessing under the released model's rule (pad / anyres)."""
    values = json.loads((source.tower / "preprocessor_config.json").read_text())
    keep = ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor")
    settings = {k: values[k] for k in keep if k in values}
    if source.anyres:
        pinpoints = source.config["image_grid_pinpoints"]
        if isinstance(pinpoints, str):
            pinpoints = ast.literal_eval(pinpoints)
        return LlavaNextImageProcessorPil(**settings, image_grid_pinpoints=pinpoints)
    return LlavaImageProcessorPil(
        **settings, do_pad=source.config.get("image_aspect_ratio") == "pad"
    )


def convert(
    fmt: str,
    src: str | Path,
    out: str | Path,
    vision_tower: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write `out`: safetensors shards, config (with its nesting), generation config,
    tokenizer and image processor. Nothing is written unless every key checks out."""
    source = read_source(fmt, src, vision_tower)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new folder")
    vocab = int(source.config["vocab_size"])
    dtype = dtype or getattr(torch, source.config.get("torch_dtype") or "float16")
    tokenizer = AutoTokenizer.from_pretrained(source.folder, local_files_only=True)
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model {vocab} rows")
    tokenizer.add_tokens(
        [AddedToken("<image>", special=True, normalized=False)], special_tokens=True
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA pads with <unk>
    tokenizer.padding_side = "left"
    rows = max(vocab, image_id + 1)
    prompt = VICUNA_V1_TEMPLATE.format(question="What is in the picture? Answer in a word.")
    text_tokens = len(tokenizer(prompt)["input_ids"]) - 1
    config = target_config(source, rows, image_id, dtype, text_tokens)
    check_plan(source, config, vocab, rows)

    out.mkdir(parents=True, exist_ok=True)
    count = sum(1 for _ in planned_tensors(source)) + tied_head(source)
    write_shards(converted_tensors(source, rows, dtype), count, out, progress)
    config.architectures = [NESTED_CLASSES[config.model_type].__name__]
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[image_id],
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor(source).save_pretrained(out)
    return out
