"""The KV cache and the indexer-key cache, owned by the engine and created by the model's factory.

Layout: one contiguous row per *slot* (a slot is a request's place in the cache), per layer:

    k[l], v[l]   (n_slots, max_len, H_kv, D)
    ik[l]        (n_slots, max_len, D_I)        indexer keys, only when the model carries indexers
    iks[l]       (n_slots, max_len)             per-token float32 scales, only for int8 indexer keys

Why contiguous rows rather than pages (see docs/DESIGN-notes.md for the numbers):
* dense decode reads ``k[l][slot, :len]`` as a *view*: no gather of the whole context per step, so the
  dense baseline runs at memory speed and the sparse/dense comparison is honest;
* sparse attention gathers selected rows from that same view by absolute position (what FlashMLA's
  absolute slot indices do on GPU), and the indexer scores the view ``ik[l][slot, :len]``;
* prefix reuse copies a prefix's rows into the new slot (one memcpy per layer, far cheaper than
  re-prefilling), and cancelling a request frees its slot at once.
The price is that each slot reserves ``max_len`` rows; the engine sizes ``n_slots`` from a memory budget.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ContextError
from .sparse import kernels
from .sparse.quant import quantize_int8_rows


_MADV_HUGEPAGE = 14
_HUGE_MIN_BYTES = 4 << 20
_libc = None


def _madvise_huge(t: Tensor) -> bool:
    """Ask Linux to back ``t``'s (not yet touched) pages with transparent huge pages. Returns True if it agreed.

    Why: a sparse decode step reads 2,048 rows scattered over the whole cache (128 MB per layer at 128K tokens of
    the reference shape): with 4 KiB pages nearly every row is a TLB miss and a page walk. With 2 MiB pages the
    sparse attention ran 1.03-1.12x faster (``benchmarks/decode_region.py``). On kernels whose THP mode is
    ``madvise`` (the common default) nothing is huge without this call; with ``always`` it is a no-op; elsewhere
    it does nothing.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        page = os.sysconf("SC_PAGE_SIZE")
        a, n = t.data_ptr(), t.numel() * t.element_size()
        start, end = -(-a // page) * page, (a + n) // page * page
        return end > start and _libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError, ValueError):
        return False


def huge_pages_default() -> bool:
    """Whether caches ask for huge pages (``PARCA_HUGEPAGES=0`` turns it off)."""
    return os.environ.get("PARCA_HUGEPAGES", "1").lower() not in ("0", "off", "false", "no")


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device, huge: bool) -> Tensor:
    """``torch.zeros``; a large CPU tensor is madvised for huge pages before its first touch (the zero fill)."""
    if not huge or device.type != "cpu":
        return torch.zeros(*shape, dtype=dtype, device=device)
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.numel() * t.element_size() >= _HUGE_MIN_BYTES:
        _madvise_huge(t)
    return t.zero_()


@dataclass
class CacheSpec:
    """What a model needs cached per token per layer (from the model factory)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    index_dim: int | None  # None: no indexer-key cache
    dtype: torch.dtype
    index_dtype: torch.dtype = torch.float32

    def bytes_per_token(self) -> int:
        elt = torch.empty((), dtype=self.dtype).element_size()
        kv = self.n_kv_heads * (self.head_dim + self.v_head_dim) * elt
        ik = 0 if self.index_dim is None else self.index_dim * torch.empty((), dtype=self.index_dtype).element_size()
        if self.index_dim is not None and self.index_dtype == torch.int8:
            ik += 4  # the per-token float32 scale
        return self.n_layers * (kv + ik)


class KVCache:
    """Preallocated per-slot KV rows (+ indexer keys) for every layer, with a length per slot."""

    def __init__(self, spec: CacheSpec, n_slots: int, max_len: int, device: torch.device | str = "cpu",
                 huge_pages: bool | None = None) -> None:
        """``huge_pages``: back the CPU tensors with transparent huge pages where Linux allows (default: on unless
        ``PARCA_HUGEPAGES=0``); a sparse step's scattered row reads then miss the TLB far less."""
        if n_slots <= 0 or max_len <= 0:
            raise ValueError(f"cache needs n_slots > 0 and max_len > 0, got {n_slots}, {max_len}")
        self.spec, self.n_slots, self.max_len = spec, n_slots, max_len
        self.device = torch.device(device)
        huge = huge_pages_default() if huge_pages is None else huge_pages
        shape = (n_slots, max_len, spec.n_kv_heads)
        dev = self.device
        self.k = [_zeros((*shape, spec.head_dim), spec.dtype, dev, huge) for _ in range(spec.n_layers)]
        self.v = [_zeros((*shape, spec.v_head_dim), spec.dtype, dev, huge) for _ in range(spec.n_layers)]
        self.ik: list[Tensor] | None = None
        self.iks: list[Tensor] | None = None  # scales of int8 indexer keys
        if spec.index_dim is not None:
            self.ik = [_zeros((n_slots, max_len, spec.index_dim), spec.index_dtype, dev, huge)
                       for _ in range(spec.n_layers)]
            if spec.index_dtype == torch.int8:
                self.iks = [_zeros((n_slots, max_len), torch.float32, dev, huge) for _ in range(spec.n_layers)]
        self.lengths = [0] * n_slots
        self._free = list(range(n_slots - 1, -1, -1))

    # ---- slot management ------------------------------------------------------------------------
    def allocate(self, slot: int | None = None) -> int:
        """Take a free slot (``slot`` if given); its rows keep their contents for prefix reuse."""
        if not self._free:
            raise ContextError(f"all {self.n_slots} cache slots are in use")
        if slot is None:
            slot = self._free[-1]
        self._free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def free_list(self) -> list[int]:
        return list(self._free)

    def free(self, slot: int) -> None:
        if slot in self._free:
            return
        self.lengths[slot] = 0
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Reuse the first n cached tokens of slot ``src`` in slot ``dst`` (prefix reuse by copying rows)."""
        for layer in range(self.spec.n_layers):
            self.k[layer][dst, :n].copy_(self.k[layer][src, :n])
            self.v[layer][dst, :n].copy_(self.v[layer][src, :n])
            if self.ik is not None:
                self.ik[layer][dst, :n].copy_(self.ik[layer][src, :n])
            if self.iks is not None:
                self.iks[layer][dst, :n].copy_(self.iks[layer][src, :n])
        self.lengths[dst] = n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + self.index_nbytes()

    def index_nbytes(self) -> int:
        if self.ik is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.ik + (self.iks or []))

    # ---- per-layer access used by the models ---------------------------------------------------
    def check_room(self, slot: int, start: int, n: int) -> None:
        if start + n > self.max_len:
            raise ContextError(
                f"cache slot {slot} holds {self.max_len} tokens; writing {n} at position {start} needs {start + n}"
            )

    def write(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor, ik: Tensor | None = None) -> None:
        """k, v (T,H_kv,D) and ik (T,D_I) of one sequence, written at positions start..start+T-1."""
        t = k.shape[0]
        self.k[layer][slot, start : start + t] = k
        self.v[layer][slot, start : start + t] = v
        if ik is not None:
            if self.ik is None:
                raise ValueError("this cache was created without an indexer-key store")
            if self.iks is not None:
                # int8 keys, one scale per token (~4x smaller than float32; scored exactly by VNNI dots)
                dst_q, dst_s = self.ik[layer][slot, start : start + t], self.iks[layer][slot, start : start + t]
                if not kernels.quantize_rows_into(ik, dst_q, dst_s):  # the C twin writes in place, bit-identical
                    q, scale = quantize_int8_rows(ik)
                    dst_q.copy_(q)
                    dst_s.copy_(scale.squeeze(-1))
            else:
                self.ik[layer][slot, start : start + t] = ik.to(self.ik[layer].dtype)

    def view(self, layer: int, slot: int, end: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(1,end,H_kv,D) views of keys/values and (1,end,D_I) indexer keys: no copy."""
        k = self.k[layer][slot : slot + 1, :end]
        v = self.v[layer][slot : slot + 1, :end]
        ik = None if self.ik is None else self.ik[layer][slot : slot + 1, :end]
        return k, v, ik

    def index_scale(self, layer: int, slot: int, end: int) -> Tensor | None:
        """(1,end) float32 per-token scales of int8 indexer keys (None for float keys): ``view``'s companion."""
        return None if self.iks is None else self.iks[layer][slot : slot + 1, :end]
