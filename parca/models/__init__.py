"""Model families. Each file is thin: projections and norms, with attention from ``parca.sparse``."""

from __future__ import annotations

import importlib

from ..config import ModelConfig

# family -> "module:Class"; imported lazily so `parca info` never builds torch modules it does not need.
MODEL_CLASSES: dict[str, str] = {
    "llama": "parca.models.llama:LlamaForCausalLM",
    "qwen2": "parca.models.llama:LlamaForCausalLM",
    "qwen3": "parca.models.llama:LlamaForCausalLM",
    "mistral": "parca.models.llama:LlamaForCausalLM",
    "deepseek_v32": "parca.models.deepseek:DeepseekV32ForCausalLM",
}


def model_class(cfg: ModelConfig):
    mod, _, cls = MODEL_CLASSES[cfg.family].partition(":")
    return getattr(importlib.import_module(mod), cls)
