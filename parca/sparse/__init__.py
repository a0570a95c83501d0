"""DeepSeek Sparse Attention (DSA), model-agnostic tensor code.

Pipeline per layer: ``LightningIndexer`` projections -> ``select_topk`` (chunked indexer scores ->
top-k key indices, ``-1`` padded) -> ``sparse`` attention over only those rows. ``dense`` is the
plain causal path, ``reference`` the masked-dense oracle. Imports nothing else from parca.
"""

from .attention import dense, head_summed_probs, reference, sparse
from .indexer import LightningIndexer, apply_rope_half
from .loss import attention_recall, indexer_kl
from .select import gather_rows, index_scores, select_topk, visibility_mask

__all__ = [
    "LightningIndexer",
    "apply_rope_half",
    "index_scores",
    "select_topk",
    "gather_rows",
    "visibility_mask",
    "dense",
    "sparse",
    "reference",
    "head_summed_probs",
    "indexer_kl",
    "attention_recall",
]
