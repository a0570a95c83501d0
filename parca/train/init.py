"""Starting points for an indexer (random, or derived from the model's own attention) and adapter merging.

``derived`` initialisation, exactly (GQA family: Llama / Qwen2 / Qwen3 / Mistral), per layer:

* requires ``index_head_dim == head_dim`` and ``index_rope_dim == head_dim``: the indexer then rotates all of
  its dims with the model's own RoPE frequencies and rotate-half layout, so a copied query row meets a copied
  key row exactly as in the main attention;
* indexer head j copies main query head ``h_j = floor(j * H / H_I)`` (evenly spread over the heads and so over
  the kv groups): ``wq_b`` rows ``[j*D, (j+1)*D)`` = ``q_proj`` rows of head ``h_j``;
* the one shared indexer key is the mean key: ``wk`` = mean over the kv heads of the ``k_proj`` row blocks;
* Qwen3's per-head q/k RMSNorm weights are folded into those rows (the 1/rms factor cannot be: a positive
  per-token factor, it changes the head mix, not a head's key ranking); q/k biases (Qwen2) are dropped;
* ``k_norm`` (LayerNorm) starts as weight 1, bias 0 — it still centres and rescales each key, the one place
  the indexer differs from a plain copy;
* ``weights_proj``: every head gets the same row ``u``, the ridge least-squares solution of
  ``weights_proj(x) * H_I**-0.5 * D_I**-0.5 = 1`` over calibration inputs x, so each head starts with weight
  about 1 (ReLU scores then add up like the heads' attention logits). x = the layer's real indexer inputs on
  ``calibration`` token ids when given (retrofit passes training windows), else a data-free proxy: the layer's
  ``input_layernorm`` applied to the token embedding rows;
* with ``calibration``, ``weights_proj`` is then multiplied by the power of two c in [2^-10, 2^6] that
  minimises the dense KL on the first calibration sequence: a pure temperature (the key ranking, hence the
  initial recall, does not move), so the warm-up does not spend its first steps finding the scale.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import sparse as dsa
from ..config import ModelConfig, SparseConfig
from ..errors import ConfigError, ParcaError
from ..models.base import ForwardContext

__all__ = ["INIT_METHODS", "DEFAULT_INIT", "default_sparse_config", "init_indexers", "synthetic_calibration",
           "merge_adapter"]

INIT_METHODS = ("random", "derived")
# Measured (tiny Llama, 2 layers, attention logits x9 so attention is peaked; seq 128, k 16, batch 4):
# recall@16 at steps 0/10/50/100: random 0.278/0.386/0.509/0.581, derived 0.544/0.588/0.647/0.681
# (oracle top-16: 0.88). Derived starts where random is after ~80 steps and stays ahead.
DEFAULT_INIT = "derived"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")


def derived_supported(cfg: ModelConfig) -> bool:
    """Whether ``derived`` init applies to this architecture (the GQA family, not MLA)."""
    return cfg.family in ("llama", "qwen2", "qwen3", "mistral")


def default_sparse_config(cfg: ModelConfig, method: str, *, n_heads: int | None = None, head_dim: int | None = None,
                          rope_dim: int | None = None, topk: int = 2048) -> SparseConfig:
    """Resolve the indexer shape for ``method``; a shape ``derived`` cannot use is a ConfigError.

    Defaults: 4 heads; ``derived``: head dim and rope dim = the model's head_dim; ``random``: head dim 64,
    rope dim min(32, head dim).
    """
    if method not in INIT_METHODS:
        raise ConfigError(f"--init {method!r}: expected one of {', '.join(INIT_METHODS)} or an adapter directory")
    n_heads = n_heads or 4
    if method == "derived":
        if not derived_supported(cfg):
            raise ConfigError(f"--init derived: supported for Llama/Qwen2/Qwen3/Mistral models, not "
                              f"{cfg.architecture}; use --init random")
        for name, value in (("--index-head-dim", head_dim), ("--index-rope-dim", rope_dim)):
            if value is not None and value != cfg.head_dim:
                raise ConfigError(f"--init derived copies the model's attention heads, so {name} must equal the "
                                  f"model's head_dim {cfg.head_dim} (got {value}); drop {name} or use --init random")
        head_dim = rope_dim = cfg.head_dim
    else:
        head_dim = head_dim or 64
        rope_dim = min(32, head_dim) if rope_dim is None else rope_dim
    return SparseConfig(index_n_heads=n_heads, index_head_dim=head_dim, index_topk=topk, index_rope_dim=rope_dim)


@torch.no_grad()
def _calibration_views(model: nn.Module, calibration: Tensor | None, max_rows: int = 4096):
    """Per layer: (N, hidden) float32 examples of the indexer input x, and the Layerview of the first
    calibration sequence (for the temperature fit; None when data-free)."""
    layers = model.model.layers
    if calibration is None:
        emb = model.model.embed_tokens.weight
        return [layer.input_layernorm(emb).float() for layer in layers], [None] * len(layers)
    xs: list[list[Tensor]] = [[] for _ in layers]
    first: list = [None] * len(layers)

    def grab(view) -> None:
        xs[view.layer].append(view.x[0].float())
        if view.row == 0:
            first[view.layer] = view

    ids = calibration.to(model.model.embed_tokens.weight.device)
    n = ids.shape[0]
    model(ids, None, ForwardContext(slots=list(range(n)), starts=[0] * n, observer=grab), last_only=True,
          return_hidden=True)
    out = []
    for rows in xs:
        x = torch.cat(rows, 0)
        step = max(1, x.shape[0] // max_rows)
        out.append(x[::step])
    return out, first


@torch.no_grad()
def _fit_temperature(view, chunk_bytes: int = 16 * 2**20) -> float:
    """The factor c (a power of 2 in [2^-10, 2^6]) minimising KL(target || softmax(c * I)) on one sequence.

    Scores are linear in the head weights, so c only sets the softmax temperature: it leaves the key ranking
    alone and spares the warm-up the steps it would spend finding the scale.
    """
    from .objective import _chunks, _target, indexer_projections

    qi, w, ki = indexer_projections(view)
    grid = [2.0**e for e in range(-10, 7)]
    kl = [0.0] * len(grid)
    for t0, t1, s1 in _chunks(view, chunk_bytes):
        target = _target(view, t0, t1, s1)
        scores = dsa.index_scores(qi[:, t0:t1], w[:, t0:t1], ki[:, :s1], view.q_pos[:, t0:t1], window=view.window)
        for i, c in enumerate(grid):
            kl[i] += float(dsa.indexer_kl(scores * c, target)) * (t1 - t0)
    return grid[min(range(len(grid)), key=kl.__getitem__)]


@torch.no_grad()
def _derive_layer(attn: nn.Module, ind: nn.Module, x: Tensor) -> None:
    H, Hkv, D = attn.H, attn.Hkv, attn.D
    h_i = ind.n_heads
    heads = [(j * H) // h_i for j in range(h_i)]
    wq = attn.q_proj.weight.float().view(H, D, -1)  # (H, D, hidden)
    wk = attn.k_proj.weight.float().view(Hkv, D, -1)  # (Hkv, D, hidden)
    if attn.q_norm is not None:  # Qwen3: fold the per-head RMSNorm weights into the rows
        wq = wq * attn.q_norm.weight.float().view(1, D, 1)
        wk = wk * attn.k_norm.weight.float().view(1, D, 1)
    ind.wq_b.weight.copy_(wq[heads].reshape(h_i * D, -1))
    ind.wk.weight.copy_(wk.mean(0))
    ind.k_norm.weight.fill_(1.0)
    ind.k_norm.bias.zero_()
    # ridge least squares: x u = 1 / weight_scale, so head_weights(x) = x u * weight_scale ~ 1
    xf = x.float()
    gram = xf.T @ xf
    lam = 1e-3 * gram.diagonal().mean().clamp_min(1e-12)
    rhs = xf.T @ torch.full((xf.shape[0],), 1.0 / ind.weight_scale, dtype=torch.float32, device=xf.device)
    u = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], device=xf.device), rhs)  # (hidden,)
    ind.weights_proj.weight.copy_(u.expand(h_i, -1))


def init_indexers(model: nn.Module, sparse_cfg: SparseConfig, method: str = DEFAULT_INIT, seed: int = 0, *,
                  calibration: Tensor | None = None) -> SparseConfig:
    """Give every layer of ``model`` a fresh indexer: ``random`` (the modules' default init, seeded) or
    ``derived`` from the model's own attention projections (module docstring).

    Args:
        model: a loaded parca model; its existing indexers (if any) are replaced.
        sparse_cfg: indexer shape; for ``derived`` head dim and rope dim must equal the model's head_dim.
        method: ``random`` or ``derived``.
        seed: seeds the random parts (all of ``random``; nothing of ``derived`` beyond module construction).
        calibration: optional (N, T) token ids whose indexer inputs calibrate ``weights_proj`` (``derived``).

    Returns:
        The model's SparseConfig. Indexer parameters are left with ``requires_grad=False`` like the rest of a
        loaded model; the trainer switches on what it trains.
    """
    if method not in INIT_METHODS:
        raise ConfigError(f"init method {method!r}: expected one of {', '.join(INIT_METHODS)}")
    cfg: ModelConfig = model.config
    if method == "derived":
        if not derived_supported(cfg):
            raise ConfigError(f"derived init needs a Llama/Qwen2/Qwen3/Mistral model, not {cfg.architecture}")
        if sparse_cfg.index_head_dim != cfg.head_dim or sparse_cfg.index_rope_dim != cfg.head_dim:
            raise ConfigError(
                f"derived init copies attention heads: index_head_dim and index_rope_dim must equal head_dim "
                f"{cfg.head_dim} (got {sparse_cfg.index_head_dim} / {sparse_cfg.index_rope_dim})"
            )
    model.add_indexers(sparse_cfg, device=model.model.embed_tokens.weight.device, seed=seed)
    if method == "derived":
        xs, views = _calibration_views(model, calibration)
        for layer, x, view in zip(model.model.layers, xs, views):
            _derive_layer(layer.self_attn, layer.self_attn.indexer, x)
            if view is not None:
                view.indexer = layer.self_attn.indexer
                with torch.no_grad():
                    layer.self_attn.indexer.weights_proj.weight.mul_(_fit_temperature(view))
    model.requires_grad_(False)
    return model.sparse_config


def synthetic_calibration(model_dir: str | Path, seq_len: int = 512, n: int = 2, seed: int = 0) -> Tensor:
    """(n, seq_len) token ids of generated retrieval text (``parca.data`` synthetic) for ``init_indexers``'s
    ``calibration`` when no training data is at hand (e.g. ``parca indexer init --init derived``)."""
    from ..config import load_config
    from ..data import load_packed
    from ..tokenizer import Tokenizer

    seq_len = min(seq_len, load_config(model_dir).max_position_embeddings)
    data = load_packed(["synthetic"], Tokenizer(model_dir), seq_len, n_heldout=1, seed=seed, synthetic_docs=4 * n)
    return data.train[:n]


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a full checkpoint of ``model_dir`` with the adapter's indexers built in (DeepSeek tensor names,
    ``index_*`` fields in config.json) plus the tokenizer files, to ``out_dir`` (must be new or empty).

    ``parca generate --model OUT --attention sparse`` then needs no ``--indexer``.
    """
    from ..checkpoint import load_model, save_model

    src, out = Path(model_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ParcaError(f"{out}: exists and is not an empty directory; choose a new output directory")
    if out.resolve() == src.resolve():
        raise ParcaError(f"{out}: the merged checkpoint cannot overwrite its base model directory")
    model = load_model(src, indexer=adapter_dir)
    save_model(model, out)
    copy_tokenizer_files(src, out)
    return out


def copy_tokenizer_files(src: Path, out: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(out) / name)
