"""What every parca model shares: the per-call context that says which cache slots a batch row uses,
where it starts, and whether it attends densely or sparsely; plus the observer hook for training/evals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

ATTENTION_MODES = ("dense", "sparse")


@dataclass
class Layerview:
    """What a layer shows an observer (retrofit targets, recall, selection dumps). Shapes are per batch row.

    q: (1,T,H,D) main queries after RoPE; k: (1,S,H_kv,D) cached keys incl. this step; q_pos: (1,T);
    x: (1,T,hidden) indexer input (normed hidden state); idx: (1,T,k) selection or None when dense.
    """

    layer: int
    row: int
    q: Any
    k: Any
    q_pos: Any
    scale: float
    x: Any = None
    q_in: Any = None
    indexer: Any = None
    index_cos: Any = None
    index_sin: Any = None
    index_keys: Any = None
    idx: Any = None
    window: int | None = None


@dataclass
class ForwardContext:
    """Per-row routing of one forward call. Row b of the batch writes cache slot ``slots[b]`` from position
    ``starts[b]`` and attends with ``modes[b]`` (sparse uses ``topks[b]`` selected keys)."""

    slots: list[int]
    starts: list[int]
    modes: list[str] = field(default_factory=list)
    topks: list[int | None] = field(default_factory=list)
    observer: Callable[[Layerview], None] | None = None
    max_chunk_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        n = len(self.slots)
        if len(self.starts) != n:
            raise ValueError("ForwardContext: slots and starts must have one entry per batch row")
        if not self.modes:
            self.modes = ["dense"] * n
        if not self.topks:
            self.topks = [None] * n
        for m in self.modes:
            if m not in ATTENTION_MODES:
                raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {m!r}")
