"""Files shipped inside the package: the default model (``default/``) and its indexer adapter (``default/indexer/``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL = ASSETS / "default"
DEFAULT_INDEXER = DEFAULT_MODEL / "indexer"


def default_model_dir() -> Path:
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ConfigError(f"no --model given and the default model is missing from {DEFAULT_MODEL}; "
                          f"pass --model DIR (a Hugging Face model directory)")
    return DEFAULT_MODEL


def apply_defaults(args) -> None:
    """``--model`` omitted: use the shipped model, and its shipped indexer adapter unless ``--indexer`` is given."""
    if getattr(args, "model", "") is not None:
        return
    if getattr(args, "preset", None):  # `parca cost --preset NAME` needs no model
        return
    args.model = str(default_model_dir())
    if hasattr(args, "indexer") and args.indexer is None and (DEFAULT_INDEXER / "indexer_config.json").is_file():
        args.indexer = str(DEFAULT_INDEXER)
