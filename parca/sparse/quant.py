"""Low-precision indexer keys and queries: Hadamard rotation, fp8 e4m3 block quantisation, int8 rows.

DeepSeek-V3.2 scores its lightning indexer in FP8 (dsa.md section 2): q and k are first rotated by a
normalised 128-point Hadamard matrix H (orthogonal, so ``(Hq).(Hk) = q.k``: the rotation changes no score in
exact arithmetic; it evens out per-channel magnitudes inside a block, so that channels far below the block's
largest value do not fall into fp8's coarse subnormal range), then quantised to float8_e4m3fn with one
float32 scale per 128 values, the scale rounded UP to a power of two (an exact exponent shift:
dequantisation adds no rounding of its own). Whether the rotation helps the selection on a given input is
measured, not assumed: benchmarks/indexer_precision.py reports fp8 with and without it.

``fake_quant_indexer`` is that whole round trip in one call, for measuring what fp8 scoring does to the
selected sets (benchmarks/indexer_precision.py) and for running a model's indexer "as if" in fp8 on a CPU.
On CPUs the storage format of choice is int8 with one scale per row (``quantize_int8_rows``).

Imports nothing from parca outside ``parca.sparse``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FP8_MAX",
    "HAS_FP8",
    "hadamard",
    "fp8_round",
    "quantize_fp8_blocks",
    "dequantize_fp8_blocks",
    "fake_quant_indexer",
    "quantize_int8_rows",
    "dequantize_int8_rows",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_MIN_NORMAL_EXP = -6  # smallest normal 2**-6; subnormal spacing 2**-9
_FP8_MANTISSA_BITS = 3
_SCALE_FLOOR = 1e-4  # DeepSeek's act_quant floor on a block's amax: an all-zero block still gets a finite scale
HAS_FP8 = hasattr(torch, "float8_e4m3fn")


def _block_size(d: int, block: int) -> int:
    """Blocks of ``block`` values over a last dim of ``d``; a last dim smaller than ``block`` is one block."""
    b = min(block, d)
    if d % b:
        raise ValueError(f"last dim {d} must be a multiple of the block size {b}")
    return b


def hadamard(x: Tensor, block: int = 128) -> Tensor:
    """Normalised fast Walsh-Hadamard transform of the last dim, independently per block of ``block`` values.

    ``H / sqrt(n)`` is symmetric and orthogonal, so applying it twice gives ``x`` back and it preserves dot
    products between any two vectors rotated the same way. O(n log n) per block, computed in float32 (float64
    inputs stay float64).

    Args:
        x: (..., D) with D a multiple of the block size (a power of two; D < block means one block of D).
        block: block length, a power of two (DeepSeek: 128).

    Returns:
        (..., D) in x's dtype.
    """
    d = x.shape[-1]
    n = _block_size(d, block)
    if n & (n - 1):
        raise ValueError(f"hadamard: block size {n} must be a power of two")
    lead = x.shape[:-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, n)  # (N, n): every block a row
    h = 1
    while h < n:
        # butterflies of width h: pairs (a, b) -> (a + b, a - b)
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, d) * n**-0.5).to(x.dtype)


def fp8_round(x: Tensor) -> Tensor:
    """Round float values to the nearest float8_e4m3fn value (saturating at +-448), returned in float32.

    Uses torch's float8 conversion when the build has it; otherwise simulates it: 3 mantissa bits, round to
    nearest even, subnormals below 2**-6 on a 2**-9 grid.
    """
    xf = x.float().clamp(-FP8_MAX, FP8_MAX)
    if HAS_FP8:
        return xf.to(torch.float8_e4m3fn).float()
    return _fp8_round_simulated(xf)


def _fp8_round_simulated(xf: Tensor) -> Tensor:
    mag = xf.abs()
    exp = torch.floor(torch.log2(mag.clamp_min(2.0**_FP8_MIN_NORMAL_EXP)))  # subnormals share the smallest exponent
    step = torch.exp2(exp - _FP8_MANTISSA_BITS)
    return (torch.round(xf / step) * step).clamp(-FP8_MAX, FP8_MAX)


def quantize_fp8_blocks(x: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """Per-block fp8 e4m3 quantisation of the last dim with power-of-two scales.

    For each block: ``scale = 2**ceil(log2(max(amax, 1e-4) / 448))`` and ``q = fp8(x / scale)``, so
    ``q * scale`` approximates x with a relative error of at most 2**-4 per element (plus the subnormal floor).

    Args:
        x: (..., D), D a multiple of ``block`` (or smaller than it: one block).
        block: values per scale (DeepSeek: 128).

    Returns:
        q: (..., D) float8_e4m3fn (float32 holding fp8 values when torch has no float8 dtype).
        scale: (..., D / block) float32, every entry a power of two.
    """
    d = x.shape[-1]
    n = _block_size(d, block)
    xb = x.float().reshape(*x.shape[:-1], d // n, n)  # (..., nblocks, n)
    amax = xb.abs().amax(-1).clamp_min(_SCALE_FLOOR)  # (..., nblocks)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (xb / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).reshape(x.shape)
    q = q.to(torch.float8_e4m3fn) if HAS_FP8 else _fp8_round_simulated(q)
    return q, scale


def dequantize_fp8_blocks(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of ``quantize_fp8_blocks``.

    Args:
        q: (..., D) fp8 (or float32 holding fp8 values).
        scale: (..., D / block) float32.
        dtype: output dtype.

    Returns:
        (..., D) ``q * scale`` with each scale repeated over its block.
    """
    d, nblocks = q.shape[-1], scale.shape[-1]
    qb = q.float().reshape(*q.shape[:-1], nblocks, d // nblocks)
    return (qb * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


def fake_quant_indexer(x: Tensor, block: int = 128) -> Tensor:
    """What DeepSeek's fp8 indexer sees: Hadamard-rotate, quantise to fp8 blocks, dequantise.

    Apply it to BOTH indexer queries and keys (the rotation only preserves scores when both sides get it).

    Args:
        x: (..., D_I) indexer queries (B, T, H_I, D_I) or keys (B, S, D_I).
        block: Hadamard and quantisation block (DeepSeek: 128 = D_I).

    Returns:
        (..., D_I) in x's dtype: the rotated vectors as the fp8 kernel would read them.
    """
    q, scale = quantize_fp8_blocks(hadamard(x.float(), block), block)
    return dequantize_fp8_blocks(q, scale, x.dtype)


def quantize_int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (per-token) int8: ``scale = amax / 127`` over the last dim, ``q = round(x / scale)``.

    Args:
        x: (..., D).

    Returns:
        q: (..., D) int8 in [-127, 127].
        scale: (..., 1) float32 (a row of zeros gets the smallest positive float32 normal, and q = 0).
    """
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of ``quantize_int8_rows``: q (..., D) int8, scale (..., 1) -> (..., D)."""
    return (q.float() * scale.float()).to(dtype)
