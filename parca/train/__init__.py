"""Indexer training for ``parca retrofit``: DeepSeek's dense warm-up and sparse stage on an existing model.

    from parca.train import RetrofitConfig, retrofit, init_indexers, merge_adapter, evaluate_indexers
    summary = retrofit(RetrofitConfig(model="hf-dir", data=["corpus/"], out="adapter-dir", steps=200))

``objective`` (per-layer chunked loss and held-out metrics), ``init`` (random / derived indexers, adapter
merge), ``state`` (atomic checkpoints), ``loop`` (the training run, DDP).
"""

from .init import DEFAULT_INIT, INIT_METHODS, default_sparse_config, init_indexers, merge_adapter, synthetic_calibration
from .loop import STAGES, RetrofitConfig, retrofit
from .objective import EvalObserver, TrainObserver, evaluate_indexers

__all__ = [
    "DEFAULT_INIT",
    "INIT_METHODS",
    "STAGES",
    "RetrofitConfig",
    "retrofit",
    "init_indexers",
    "default_sparse_config",
    "merge_adapter",
    "synthetic_calibration",
    "evaluate_indexers",
    "TrainObserver",
    "EvalObserver",
]
