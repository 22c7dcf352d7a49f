"""Tiny random-weight replicas of real checkpoint folders, written in their real layouts.

- llava-hf folders (transformers' Llava / LlavaNext): in the layout transformers saves and in
  the model's own key names;
- the original LLaVA format (LLaVA-1.5 / M3, LLaVA-NeXT, MQT-LLaVA): `model_type`
  `llava_llama`, `model.layers.*`, `model.mm_projector.0/.2`, `lm_head`, a SentencePiece
  `tokenizer.model` without an `<image>` token, the CLIP tower in a
  separate local folder (CLIPModel keys `vision_model.*` beside `text_model.*`) or, fine-tuned,
  under `model.vision_tower.vision_tower.vision_model.*`; MQT-LLaVA's `model.query_abstractor.*`.

Each original-format replica is written from a transformers model (or, for MQT-LLaVA, from
the Resampler's parts) with the same weights, so a test has an independent reference to
compare the converted model with. The key renames here are the formats' facts, written out
independently of `m3core.convert`.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
)

WORDS = ["what", "colour", "is", "the", "left", "right", "side", "?", "red", "green", "blue"]
WORDS += ["USER", ":", "ASSISTANT", "a", "chat", "."]
CROP = 16
PATCH = 2
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
CLIP_NAME = "openai/clip-vit-large-patch14-336"


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CROP,
        patch_size=PATCH,
        projection_dim=16,
    )


def text_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def write_original_tokenizer(path: Path) -> None:
    """The LLM's tokenizer as the LLaVA releases ship it: a SentencePiece `tokenizer.model`
    and a `LlamaTokenizer` config, with no `<image>` token (LLaVA splices the image in by
    position) and no pad token."""
    import sentencepiece

    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=64,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    config |= {"unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"legacy": False}))


def original_tokenizer():
    with tempfile.TemporaryDirectory() as folder:
        write_original_tokenizer(Path(folder))
        return AutoTokenizer.from_pretrained(folder)


def tokenizer():
    """The llava-hf tokenizer: the original's ids, then `<image>` as the last id."""
    tok = original_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.pad_token = "<unk>"
    tok.padding_side = "left"
    return tok


def images(n: int, sizes=((40, 24), (24, 40), (32, 32), (60, 20))) -> list[Image.Image]:
    """Images of mixed aspect ratios (so anyres layouts differ), with varied content."""
    out = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        image = Image.new("RGB", (width, height), (40 * i % 255, 90, 200 - 30 * i % 200))
        image.paste((250, 20 * i % 255, 10), (0, 0, width // 3, height // 2))
        out.append(image)
    return out


# -- llava-hf folders -------------------------------------------------------------------------
def llava_hf(seed: int = 0) -> tuple[LlavaForConditionalGeneration, object, object]:
    tok = tokenizer()
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(CROP // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}
    )
    return LlavaForConditionalGeneration(config).eval(), tok, processor


def llava_next_hf(seed: int = 0):
    tok = tokenizer()
    config = LlavaNextConfig(
        vision_config=vision_config(),
        text_config=text_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
    )
    torch.manual_seed(seed)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=PINPOINTS,
    )
    return LlavaNextForConditionalGeneration(config).eval(), tok, processor


def save_hf(model, tok, processor, path: Path, own_names: bool = False) -> Path:
    """A llava-hf folder: as transformers saves it, or with the model's own key names."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    if own_names:
        for file in path.glob("*.safetensors"):
            file.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def set_weight(path: Path, key: str, value: torch.Tensor | None) -> None:
    """Replace (None: delete) one tensor of a single-file safetensors folder."""
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    if value is None:
        del state[key]
    else:
        state[key] = value
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


# -- the original LLaVA format ----------------------------------------------------------------
def clip_folder(path: Path, vision: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    """A CLIP checkpoint as openai/clip-vit-large-patch14-336 ships: the whole CLIPModel
    (text and vision, `vision_model.*` keys), its config and CLIP's image processor."""
    config = CLIPConfig(
        vision_config=vision_config().to_dict(),
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 50,
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    if vision is not None:
        state |= {f"vision_model.{k}": v.contiguous() for k, v in vision.items()}
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    CLIPImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}
    ).save_pretrained(path)
    return path


def original_llm_state(model, vocab: int) -> dict[str, torch.Tensor]:
    """A transformers Llava's LLM and projector under the original names, first `vocab` rows."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key.removeprefix("model.language_model.")] = value
        elif key == "lm_head.weight":
            state[key] = value
        elif key.startswith("model.multi_modal_projector.linear_1."):
            state["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.multi_modal_projector.linear_2."):
            state["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif key == "model.image_newline":
            state["model.image_newline"] = value
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:vocab]
    return {k: v.contiguous() for k, v in state.items()}


def vision_state(model) -> dict[str, torch.Tensor]:
    """The transformers model's CLIP tower under CLIPVisionModel's own keys (no prefix)."""
    prefix = "model.vision_tower."
    return {
        k.removeprefix(prefix): v for k, v in model.state_dict().items() if k.startswith(prefix)
    }


def original_config(vocab: int, tower: str, **extra) -> dict:
    text = text_config(vocab).to_dict()
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "tie_word_embeddings",
    )
    config = {k: text[k] for k in keep}
    config |= {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "mm_vision_tower": tower,
        "mm_hidden_size": vision_config().hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    return config | extra


def write_original(path: Path, config: dict, state: dict, bin_weights: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_original_tokenizer(path)
    if bin_weights:
        torch.save(state, path / "pytorch_model.bin")
    else:
        keys = sorted(state)
        half = len(keys) // 2  # two shards and an index, as the releases come
        shards = {
            "model-00001-of-00002.safetensors": keys[:half],
            "model-00002-of-00002.safetensors": keys[half:],
        }
        weight_map = {}
        for name, shard in shards.items():
            save_file({k: state[k] for k in shard}, str(path / name), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, name)
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def original_llava(root: Path, seed: int = 0, bin_weights: bool = False):
    """(LLaVA-1.5 / M3 folder, CLIP folder, the transformers Llava with the same weights).

    The reference model's vocabulary has one more row for its `<image>` token, which the
    original does not have; the original's ids are the reference's first rows."""
    model, tok, _ = llava_hf(seed)
    vocab = len(tok) - 1
    tower = clip_folder(root / "clip", vision_state(model))
    state = original_llm_state(model, vocab)
    folder = write_original(root / "llava", original_config(vocab, str(tower)), state, bin_weights)
    return folder, tower, model


def original_llava_next(root: Path, seed: int = 0):
    """(LLaVA-NeXT folder with its fine-tuned tower inside, CLIP folder, transformers
    LlavaNext with the same weights)."""
    model, tok, _ = llava_next_hf(seed)
    vocab = len(tok) - 1
    tower = clip_folder(root / "clip", seed=seed + 1)  # the pretrained tower, not the tuned one
    state = original_llm_state(model, vocab)
    prefix = "model.vision_tower.vision_tower.vision_model."
    state |= {prefix + k: v.contiguous() for k, v in vision_state(model).items()}
    config = original_config(
        vocab,
        CLIP_NAME,
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=PINPOINTS,
        unfreeze_mm_vision_tower=True,
    )
    return write_original(root / "llava-next", config, state), tower, model


def mqt_resampler_state(seed: int, kv_dim: int, dim: int, queries: int) -> dict:
    """Random MQT-LLaVA `query_abstractor.*` weights with the real names and shapes; the
    position embedding as MQT-LLaVA makes it (2-D sin-cos of the query grid, stored in half)."""
    generator = torch.Generator().manual_seed(seed)
    side = math.isqrt(queries)

    def randn(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    grid_h = torch.arange(side, dtype=torch.float64)
    w, h = torch.meshgrid(grid_h, grid_h, indexing="xy")  # MAE: the first half encodes w
    omega = 1.0 / 10000 ** (torch.arange(kv_dim // 4, dtype=torch.float64) / (kv_dim / 4))
    halves = []
    for pos in (w.reshape(-1), h.reshape(-1)):
        out = pos[:, None] * omega[None]
        halves.append(torch.cat([out.sin(), out.cos()], 1))
    pos_embed = torch.cat(halves, 1).half()
    return {
        "model.query_abstractor.pos_embed": pos_embed,
        "model.query_abstractor.query": randn(queries, kv_dim),
        "model.query_abstractor.attn.in_proj_weight": randn(3 * kv_dim, kv_dim),
        "model.query_abstractor.attn.in_proj_bias": randn(3 * kv_dim),
        "model.query_abstractor.attn.out_proj.weight": randn(kv_dim, kv_dim),
        "model.query_abstractor.attn.out_proj.bias": randn(kv_dim),
        "model.query_abstractor.ln_q.weight": 1 + randn(kv_dim),
        "model.query_abstractor.ln_q.bias": randn(kv_dim),
        "model.query_abstractor.ln_k.weight": 1 + randn(kv_dim),
        "model.query_abstractor.ln_k.bias": randn(kv_dim),
        "model.query_abstractor.ln_v.weight": 1 + randn(kv_dim),
        "model.query_abstractor.ln_v.bias": randn(kv_dim),
        "model.query_abstractor.proj": randn(kv_dim, dim, std=kv_dim**-0.5),
    }


def original_mqt(root: Path, seed: int = 0, queries: int = 16):
    """(MQT-LLaVA folder, CLIP folder, the transformers Llava whose LLM and tower it shares,
    its `query_abstractor.*` weights). MQT-LLaVA's Resampler has 16 heads: the replica's
    tower width (32) keeps that divisible."""
    model, tok, _ = llava_hf(seed)
    vocab = len(tok) - 1
    tower = clip_folder(root / "clip", vision_state(model))
    state = {k: v for k, v in original_llm_state(model, vocab).items() if "mm_projector" not in k}
    resampler = mqt_resampler_state(seed, vision_config().hidden_size, 32, queries)
    state |= resampler
    config = original_config(
        vocab,
        str(tower),
        mm_query_abstractor_type="matry_query",
        query_abstractor_type="matry_query",
        num_visual_tokens=256,
    )
    return write_original(root / "mqt", config, state), tower, model, resampler
