"""The `lmms_eval.models` entry point: lmms-eval finds `adaptive_m3` here without importing
the model code (torch, transformers) until a run asks for it."""

from lmms_eval.models.registry_v2 import ModelManifest

ADAPTIVE_M3 = ModelManifest(
    model_id="adaptive_m3", simple_class_path="pipelines.lmms_plugin.AdaptiveM3"
)
