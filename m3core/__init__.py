"""The nested-token LMM: M3 pooling and MQT queries on transformers' Llava classes."""

from m3core.config import NestingConfig
from m3core.lmm import EncodedImages, GenerationRecord, NestedLMM, Prompts
from m3core.tiny import MICRO, TinySpec, tiny_lmm

__all__ = [
    "MICRO",
    "EncodedImages",
    "GenerationRecord",
    "NestedLMM",
    "Prompts",
    "NestingConfig",
    "TinySpec",
    "tiny_lmm",
]
