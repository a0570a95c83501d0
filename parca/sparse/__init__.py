"""DeepSeek Sparse Attention (DSA), model-agnostic tensor code.

Pipeline per layer: ``LightningIndexer`` projections -> ``select_topk`` (chunked indexer scores ->
top-k key indices, ``-1`` padded) -> ``sparse`` attention over only those rows. ``dense`` is the
plain causal path, ``reference`` the masked-dense oracle. Imports nothing else from parca.

``kernels`` holds the optional C fast paths (int8 VNNI indexer scores, exact top-k, in-place row attention);
they build on first use and every caller falls back to torch without them (``PARCA_KERNELS=0`` forces that).
"""

from . import kernels
from .attention import dense, head_summed_probs, reference, sparse
from .decode import sparse_decode
from .fused import FusedLinear
from .indexer import LightningIndexer, apply_rope_half
from .loss import attention_recall, indexer_kl
from .quant import dequantize_int8_rows, quantize_int8_rows
from .select import gather_rows, index_scores, index_scores_int8, select_topk, visibility_mask

__all__ = [
    "LightningIndexer",
    "FusedLinear",
    "apply_rope_half",
    "index_scores",
    "index_scores_int8",
    "select_topk",
    "quantize_int8_rows",
    "dequantize_int8_rows",
    "kernels",
    "gather_rows",
    "visibility_mask",
    "dense",
    "sparse",
    "sparse_decode",
    "reference",
    "head_summed_probs",
    "indexer_kl",
    "attention_recall",
]
