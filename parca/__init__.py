"""parca: frugal long-context inference with DeepSeek Sparse Attention.

Public API (imported lazily so `parca --help` does not pay for torch):

    from parca import load_model, Tokenizer, Engine, SamplingParams
    model = load_model("path/to/hf-model", indexer="path/to/adapter")
    engine = Engine(model, Tokenizer("path/to/hf-model"))
    engine.generate(["Hello"], SamplingParams(max_new_tokens=32, attention="sparse"))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "parca.checkpoint",
    "save_model": "parca.checkpoint",
    "save_adapter": "parca.checkpoint",
    "attach_adapter": "parca.checkpoint",
    "load_config": "parca.config",
    "ModelConfig": "parca.config",
    "SparseConfig": "parca.config",
    "Tokenizer": "parca.tokenizer",
    "Engine": "parca.engine",
    "SamplingParams": "parca.engine",
    "GenerationResult": "parca.engine",
    "ParcaError": "parca.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'parca' has no attribute {name!r}")
