"""Several projections of one input as one matmul (decode-time fusion shared by the indexer and the models)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FusedLinear", "disabled"]

_off = 0


@contextmanager
def disabled() -> Iterator[None]:
    """Run every ``FusedLinear`` member by member inside this block (the reference path, for tests)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


class FusedLinear:
    """Several ``nn.Linear`` over the same input run as ONE matmul: ``fused(x)`` returns each member's output.

    Why: a decode step multiplies a single token by many small matrices, and on a CPU every torch matmul is a
    parallel region that wakes the worker threads (and on a GPU, one kernel launch): the q/k/v/indexer-key and the
    gate/up projections as two calls instead of six cost the same bytes and far fewer wake-ups.

    Nothing is duplicated: the fused weight owns the storage and every member's ``weight`` (and ``bias``) becomes a
    view into it, so in-place updates (``load_state_dict``, an optimizer step) stay visible. If a member's tensor
    was replaced since (``model.to(...)``, ``load_state_dict(assign=True)``), the next call fuses again.
    Members that would need a gradient are run separately (the fused tensor is not their parameter), as are
    members of different dtype or device (then ``usable`` is False). The unfused members are the reference.
    After a move (``model.to(device)``) the old fused storage lives until the next call re-fuses.
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.linears = list(linears)
        self.sizes = [lin.out_features for lin in self.linears]
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self._key: tuple | None = None
        self._fused = False

    def usable(self) -> bool:
        w0 = self.linears[0].weight
        return all(lin.weight.dtype == w0.dtype and lin.weight.device == w0.device
                   and lin.in_features == self.linears[0].in_features for lin in self.linears)

    def _layout(self) -> tuple:
        """What the fused storage was built from: each member's current weight / bias tensors and addresses (a
        dtype or device change, ``.data`` reassignment or a replaced Parameter all change it)."""
        out = []
        for lin in self.linears:
            for name in ("weight", "bias"):
                t = lin._parameters.get(name)
                out.append(t)
                out.append(None if t is None else t.data_ptr())
        return tuple(out)

    def _current(self) -> bool:
        key = self._key
        if key is None:
            return False
        i = 0
        for lin in self.linears:  # the same test as ``_layout() == key`` without building the tuple
            for name in ("weight", "bias"):
                t = lin._parameters.get(name)
                if t is not key[i] or (t is not None and t.data_ptr() != key[i + 1]):
                    return False
                i += 2
        return True

    @staticmethod
    def _adjacent(ts: list[Tensor]) -> Tensor | None:
        """One (sum of rows, in) view over ``ts`` when they already lie back to back, row-major, in ONE storage (a
        fusion that contains them, e.g. the model's q/k/v/indexer matmul holding the indexer's query and weight
        rows); else None. Fusing such members again needs no copy, and must not move them: two fusions that
        share members would otherwise take the storage from each other on every call."""
        t0 = ts[0]
        if t0.dim() != 2:
            return None
        cols, off, rows = t0.shape[1], t0.storage_offset(), 0
        ptr = t0.untyped_storage().data_ptr()
        for t in ts:
            if (t.dim() != 2 or t.shape[1] != cols or t.stride() != (cols, 1) or t.dtype != t0.dtype
                    or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != off + rows * cols):
                return None
            rows += t.shape[0]
        return t0.as_strided((rows, cols), (cols, 1), off)

    def _fuse(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            ws = [lin.weight.detach() for lin in self.linears]
            bs = [lin.bias for lin in self.linears]
            if all(b is None for b in bs) and (w := self._adjacent(ws)) is not None:
                self.weight, self.bias = w, None  # already fused elsewhere: share that storage, move nothing
                return
            w = torch.cat(ws)
            for lin, part in zip(self.linears, w.split(self.sizes)):
                lin.weight.data = part
            b = None
            if any(lin.bias is not None for lin in self.linears):
                b = torch.cat([lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features)
                               for lin in self.linears])
                for lin, part in zip(self.linears, b.split(self.sizes)):
                    if lin.bias is not None:
                        lin.bias.data = part
        self.weight, self.bias = w, b

    def _separate(self) -> bool:
        """True when the members must run one by one: a gradient is wanted, or they cannot share one matrix."""
        if _off or (torch.is_grad_enabled() and any(p.requires_grad for lin in self.linears for p in lin.parameters())):
            return True
        if not self._current():
            self._fused = self.usable()
            if self._fused:
                self._fuse()
            else:
                self.weight = self.bias = None
            self._key = self._layout()
        return not self._fused

    def __call__(self, x: Tensor) -> list[Tensor]:
        """Each member's output (views into one (..., sum of out_features) result when fused)."""
        if self._separate():
            return [lin(x) for lin in self.linears]
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))

    def full(self, x: Tensor) -> Tensor:
        """The members' outputs concatenated on the last dim (what ``torch.cat([lin(x) ...], -1)`` gives)."""
        if self._separate():
            return torch.cat([lin(x) for lin in self.linears], dim=-1)
        return F.linear(x, self.weight, self.bias)
