"""Optional C kernels for the DSA core on CPU, each with a torch twin it is tested against.

* ``index_scores_i8`` / ``select_i8``: lightning-indexer scores from int8 queries and keys with AVX-512 VNNI
  (``vpdpbusd`` on 16 keys transposed in registers), fused with the query quantisation and the exact top-k;
* ``topk_rows``: exact top-k by (score, position) with the recency tie-break (sample-then-filter, radix fallback);
* ``attend``: attention that reads the selected (or all) cache rows in place, no gather copy: per query for
  decode (split over threads, merged by log-sum-exp), and for prefill by blocks of 32 neighbouring queries that
  scan the union of their selections once (``dsa_attend_blocks``). A dense decode step runs the same kernel over
  all rows (SDPA's CPU kernel is built for query blocks and decoded 128K keys ~4x slower).

Why C and not more torch ops: on a 2-core machine every torch op is a parallel region, and a decode step of
the sparse path is ~15 small ops per layer; under CPU contention each region waits for a preempted thread
(measured: a 2048-row ``index_select`` took 8 ms with 2 threads on a loaded machine and 0.1 ms with 1).
Fused kernels run one region per step and read each byte once. The source is plain C++ with a C ABI (no torch
headers), so it builds in a few seconds with the system compiler on first use (``g++ -O3 -march=native
-fopenmp``, cached under ``$PARCA_KERNEL_DIR`` or ``~/.cache/parca/kernels``, keyed by source, flags and CPU
flags) and loads through ctypes; its OpenMP runtime resolves to the ``libgomp.so.1`` torch already loaded, so
the kernels share torch's threads. torch.compile was tried on the scoring instead: 12.4 -> 8.1 ms at 128K keys
after a 37 s compile, against 1.0 ms here.

The callers fall back to the torch path when the build is impossible (no compiler) or disabled
(``PARCA_KERNELS=0``, read once; ``disabled()`` switches at run time). The int8 scores are reproduced BIT FOR BIT
by the torch twin (exact integer dots, the same float epilogue, no FMA contraction), so a model gives the same
selection whichever path runs.

Imports nothing from parca outside ``parca.sparse``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "available",
    "enabled",
    "disabled",
    "simd",
    "build_error",
    "index_scores_i8",
    "index_scores_i8_torch",
    "topk_rows",
    "topk_rows_torch",
    "attend",
    "attend_supported",
    "select_i8",
    "select_i8_batch",
]

_SOURCE = r"""
// parca DSA CPU kernels: int8 lightning-indexer scores, exact tie-broken top-k, attention over selected rows.
// Plain C ABI (no torch headers: builds in ~2 s), called through ctypes with tensor data pointers.
// OpenMP resolves to the libgomp torch already loaded (same soname), so these kernels share torch's threads.
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <algorithm>
#include <vector>
#include <omp.h>
#include <atomic>
#include <sched.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define DSA_VNNI 1
#include <immintrin.h>
#endif

#define DSA_API extern "C"

DSA_API int dsa_abi_version(void) { return 5; }
DSA_API int dsa_simd(void) {
#ifdef DSA_VNNI
    return 1;
#else
    return 0;
#endif
}

// ------------------------------------------------------------------------------------------------------------
// Indexer scores from int8 queries and keys.
//   out[t, s] = ks[s] * ( sum_{h ascending} (float)max(0, dot(q8[t,h,:], k8[s,:])) * qw[t,h] )
// The integer dot is exact; the float epilogue is a fixed sequence of IEEE mul / add (no FMA: built with
// -ffp-contract=off), so the torch fallback reproduces it bit for bit, whatever the chunking.
// Only keys s < s_end[t] (s_end NULL: all S) are guaranteed written for row t.
// q8: (T, H, D) contiguous; qw: (T, H); k8: rows of D bytes, k_stride bytes apart; ks: (S,); out row stride.
// ------------------------------------------------------------------------------------------------------------
static void scores_scalar_block(const int8_t* q8, const float* qw, const int8_t* k8, int64_t k_stride,
                                const float* ks, float* out, int64_t out_stride, int64_t T, int64_t H, int64_t D,
                                int64_t s0, int64_t s1, const int64_t* s_end) {
    for (int64_t t = 0; t < T; ++t) {
        int64_t hi = s_end ? std::min(s1, s_end[t]) : s1;
        for (int64_t s = s0; s < hi; ++s) {
            const int8_t* kr = k8 + s * k_stride;
            float acc = 0.0f;
            for (int64_t h = 0; h < H; ++h) {
                const int8_t* qr = q8 + (t * H + h) * D;
                int32_t dot = 0;
                for (int64_t d = 0; d < D; ++d) dot += (int32_t)qr[d] * (int32_t)kr[d];
                float r = (float)(dot > 0 ? dot : 0);
                float p = r * qw[t * H + h];
                acc = acc + p;
            }
            out[t * out_stride + s] = acc * ks[s];
        }
    }
}

#ifdef DSA_VNNI
// 16x16 transpose of 32-bit lanes: r[i] (16 rows) -> r[i] = column i.
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // now within each 128-bit lane of r[4a+b] sits dword column (b-order) for rows of lane groups
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}
#endif

#ifdef DSA_VNNI
// One query x 16 keys for H = 4 heads, D = 64: 16 independent accumulator chains (4 heads x 4 partial sums).
// The dpbusd latency (5 cycles) left the 2-chain loop at ~0.4 instructions per cycle.
static inline void i8_block_h4d64(const __m512i* tile, const int32_t* qv, const int32_t* qs, const float* qw,
                                  __m512 ks, float* dst, __mmask16 m) {
    __m512i a[4][4];
    for (int h = 0; h < 4; ++h)
        for (int p = 0; p < 4; ++p) a[h][p] = _mm512_setzero_si512();
    for (int i = 0; i < 16; i += 4)
        for (int p = 0; p < 4; ++p)
            for (int h = 0; h < 4; ++h)
                a[h][p] = _mm512_dpbusd_epi32(a[h][p], tile[i + p], _mm512_set1_epi32(qv[h * 16 + i + p]));
    __m512 acc = _mm512_setzero_ps();
    for (int h = 0; h < 4; ++h) {
        __m512i dot = _mm512_add_epi32(_mm512_add_epi32(a[h][0], a[h][1]), _mm512_add_epi32(a[h][2], a[h][3]));
        dot = _mm512_max_epi32(_mm512_sub_epi32(dot, _mm512_set1_epi32(qs[h])), _mm512_setzero_si512());
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(qw[h])));
    }
    _mm512_mask_storeu_ps(dst, m, _mm512_mul_ps(acc, ks));
}
#endif

#define DSA_SB 256  // keys per scoring work item: 16 KiB of int8 keys at D = 64, stays in L1/L2

// Scores of the key blocks [b0, b1) (DSA_SB keys each). VNNI when the shape allows (D % 64 == 0, D <= 512;
// qsum[t * H + h] = 128 * sum(q8[t, h, :]), keys enter VNNI as u8 = k + 128), else the scalar loop.
static void scores_blocks(const int8_t* q8, const float* qw, const int32_t* qsum, const int8_t* k8, int64_t k_stride,
                          const float* ks, float* out, int64_t out_stride, int64_t T, int64_t H, int64_t D, int64_t S,
                          const int64_t* s_end, int64_t b0, int64_t b1) {
#ifdef DSA_VNNI
    if (D % 64 == 0 && D <= 512) {
        const int64_t ND = D / 4;  // dwords per key
        const int32_t* qd = (const int32_t*)q8;
        for (int64_t b = b0; b < b1; ++b) {
            int64_t s0 = b * DSA_SB, s1 = std::min(S, s0 + DSA_SB);
            alignas(64) __m512i tile[128];  // one 16-key block, transposed: ND dwords x 16 keys
            alignas(64) int8_t pad[16 * 512];
            const __m512i flip = _mm512_set1_epi8((char)0x80);
            for (int64_t sa = s0; sa < s1; sa += 16) {
                int64_t n = std::min<int64_t>(16, s1 - sa);
                const int8_t* base = k8 + sa * k_stride;
                int64_t stride = k_stride;
                if (n < 16) {  // tail: copy into a zero-padded block
                    memset(pad, 0, sizeof(pad));
                    for (int64_t r = 0; r < n; ++r) memcpy(pad + r * D, k8 + (sa + r) * k_stride, D);
                    base = pad;
                    stride = D;
                } else {  // stream ahead: the hardware prefetcher alone lags (measured 2.2 -> 1.5 ms at 128K)
                    const int8_t* pf = base + 8 * 16 * stride;
                    if (pf + 15 * stride + D <= k8 + S * k_stride)
                        for (int i = 0; i < 16; ++i)
                            for (int64_t c = 0; c < D; c += 64)
                                _mm_prefetch((const char*)(pf + i * stride + c), _MM_HINT_T0);
                }
                for (int64_t c = 0; c < D / 64; ++c) {
                    __m512i r[16];
                    for (int i = 0; i < 16; ++i)
                        r[i] = _mm512_xor_si512(_mm512_loadu_si512((const void*)(base + i * stride + c * 64)), flip);
                    transpose16(r);
                    for (int i = 0; i < 16; ++i) tile[c * 16 + i] = r[i];
                }
                __mmask16 m = (__mmask16)((1u << n) - 1u);
                __m512 sc = _mm512_maskz_loadu_ps(m, ks + sa);
                for (int64_t t = 0; t < T; ++t) {
                    if (s_end && s_end[t] <= sa) continue;
                    if (H == 4 && ND == 16) {  // the reference shape: 4 heads x 4 chains in flight
                        i8_block_h4d64(tile, qd + t * 4 * 16, qsum + t * 4, qw + t * 4, sc,
                                       out + t * out_stride + sa, m);
                        continue;
                    }
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t h = 0; h < H; ++h) {
                        const int32_t* qv = qd + (t * H + h) * ND;
                        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
                        for (int64_t i = 0; i < ND; i += 2) {
                            a0 = _mm512_dpbusd_epi32(a0, tile[i], _mm512_set1_epi32(qv[i]));
                            a1 = _mm512_dpbusd_epi32(a1, tile[i + 1], _mm512_set1_epi32(qv[i + 1]));
                        }
                        __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), _mm512_set1_epi32(qsum[t * H + h]));
                        dot = _mm512_max_epi32(dot, _mm512_setzero_si512());
                        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(qw[t * H + h])));
                    }
                    _mm512_mask_storeu_ps(out + t * out_stride + sa, m, _mm512_mul_ps(acc, sc));
                }
            }
        }
        return;
    }
#endif
    for (int64_t b = b0; b < b1; ++b)
        scores_scalar_block(q8, qw, k8, k_stride, ks, out, out_stride, T, H, D, b * DSA_SB,
                            std::min(S, (b + 1) * DSA_SB), s_end);
}

static std::vector<int32_t> query_sums(const int8_t* q8, int64_t n, int64_t D) {
    std::vector<int32_t> qsum(n);
    for (int64_t i = 0; i < n; ++i) {
        int32_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += q8[i * D + d];
        qsum[i] = 128 * acc;
    }
    return qsum;
}

DSA_API void dsa_index_scores_i8(const int8_t* q8, const float* qw, const int8_t* k8, int64_t k_stride, const float* ks,
                         float* out, int64_t out_stride, int64_t T, int64_t H, int64_t D, int64_t S,
                         const int64_t* s_end, int nthreads) {
    int64_t nsb = (S + DSA_SB - 1) / DSA_SB;
    // small jobs (a decode step over a few thousand keys: ~20 us) run on the calling thread: waking a second
    // thread costs more than it saves, most of all on a loaded machine
    nthreads = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nsb * T * H / 128));
    std::vector<int32_t> qsum = query_sums(q8, T * H, D);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < nsb; ++b)
        scores_blocks(q8, qw, qsum.data(), k8, k_stride, ks, out, out_stride, T, H, D, S, s_end, b, b + 1);
}

// ------------------------------------------------------------------------------------------------------------
// Exact top-k per row with the deterministic tie-break of select_topk: rank by (score, position), both
// descending; score compared through its order-preserving uint32 image after +0.0 (so -0.0 == +0.0).
// Row t considers scores[t, s] for s in [vlo[t], vhi[t]) and writes idx[t, 0:k]: the chosen positions
// (s + base), valid entries first, then -1. order 0: descending (score, s); order 1: ascending s.
// Long rows: a threshold from a 1/32 sample of cache lines, one vectorised filter pass keeping the scores
// above it, then exact ranking of those few candidates (nth_element on 64-bit (score bits, position) keys);
// when fewer than k pass, a radix select over a 2048-bin histogram of the top 11 bits does it exactly.
// Measured at 128K keys (1 thread): torch.topk on int64 tie-break keys 5-7 ms, histogram path 0.37-0.5 ms,
// sample-then-filter 0.21 ms.
// ------------------------------------------------------------------------------------------------------------
static inline uint32_t ordered_bits(float f) {
    f = f + 0.0f;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct TopkScratch {
    std::vector<uint64_t> cand;
    std::vector<uint32_t> hist, samp;
    uint64_t* buf = nullptr;  // filter output, grown without zero-filling (a resize() cost more than the filter)
    int64_t cap = 0;
    ~TopkScratch() { free(buf); }
    uint64_t* need(int64_t n) {
        if (n > cap) {
            free(buf);
            buf = (uint64_t*)malloc(sizeof(uint64_t) * n);
            cap = n;
        }
        return buf;
    }
};

// Emit the chosen composites (score bits << 32 | column) of one row in the requested order, -1 padded.
static void emit(std::vector<uint64_t>& chosen, int64_t k, int64_t base, int order, int64_t* out) {
    int64_t w = 0;
    if (order == 1)
        std::sort(chosen.begin(), chosen.end(), [](uint64_t a, uint64_t b) { return (uint32_t)a < (uint32_t)b; });
    else
        std::sort(chosen.begin(), chosen.end(), std::greater<uint64_t>());
    for (uint64_t c : chosen) out[w++] = (int64_t)(uint32_t)c + base;
    for (; w < k; ++w) out[w] = -1;
}

#ifdef DSA_VNNI
static inline __m512i ordered_bits16(__m512 x) {
    __m512i bits = _mm512_castps_si512(_mm512_add_ps(x, _mm512_setzero_ps()));
    __mmask16 neg = _mm512_movepi32_mask(bits);
    return _mm512_mask_xor_epi32(_mm512_or_si512(bits, _mm512_set1_epi32((int)0x80000000u)), neg, bits,
                                 _mm512_set1_epi32(-1));
}
#endif

// Exact selection through a 2048-bin histogram of the top 11 bits (two full passes): the fallback.
static void topk_row_hist(const float* sc, int64_t lo, int64_t hi, int64_t k, int64_t base, int order, int64_t* out,
                          TopkScratch& ws) {
    const int SHIFT = 21, NB = 1 << (32 - SHIFT);
    ws.hist.assign(NB, 0u);
    for (int64_t s = lo; s < hi; ++s) ws.hist[ordered_bits(sc[s]) >> SHIFT]++;
    int64_t above = 0;
    int bin = NB - 1;
    for (; bin >= 0; --bin) {
        if (above + ws.hist[bin] >= (uint64_t)k) break;
        above += ws.hist[bin];
    }
    ws.cand.clear();
    uint32_t ub = (uint32_t)bin;
    for (int64_t s = lo; s < hi; ++s) {
        uint32_t u = ordered_bits(sc[s]);
        if ((u >> SHIFT) >= ub) ws.cand.push_back(((uint64_t)u << 32) | (uint64_t)s);
    }
    if ((int64_t)ws.cand.size() > k) {
        std::nth_element(ws.cand.begin(), ws.cand.begin() + (ws.cand.size() - k), ws.cand.end());
        ws.cand.erase(ws.cand.begin(), ws.cand.begin() + (ws.cand.size() - k));
    }
    emit(ws.cand, k, base, order, out);
}

// Sample-then-filter selection: a threshold from a sample of cache lines, ONE vectorised filter pass that
// keeps every score >= threshold (compress-store), then an exact ranking of those few candidates. Exact
// whenever at least k scores pass the threshold (checked; otherwise the histogram path runs).
static void topk_row(const float* sc, int64_t lo, int64_t hi, int64_t k, int64_t base, int order, int64_t* out,
                     TopkScratch& ws) {
    int64_t n = hi - lo;
    if (n <= 0) {
        for (int64_t i = 0; i < k; ++i) out[i] = -1;
        return;
    }
    if (n <= k) {
        ws.cand.clear();
        for (int64_t s = lo; s < hi; ++s) ws.cand.push_back(((uint64_t)ordered_bits(sc[s]) << 32) | (uint64_t)s);
        emit(ws.cand, k, base, order, out);
        return;
    }
    if (n <= 4 * k && order == 1) {
        // short rows (a context just past k): rank every composite, then one scan in column order
        uint64_t* cd = ws.need(n);
        for (int64_t s = lo; s < hi; ++s) cd[s - lo] = ((uint64_t)ordered_bits(sc[s]) << 32) | (uint64_t)s;
        ws.cand.assign(cd, cd + n);
        std::nth_element(ws.cand.begin(), ws.cand.begin() + (n - k), ws.cand.end());
        uint64_t kth = ws.cand[n - k];
        int64_t w = 0;
        for (int64_t i = 0; i < n; ++i)
            if (cd[i] >= kth) out[w++] = (int64_t)(uint32_t)cd[i] + base;
        return;
    }
#ifdef DSA_VNNI
    // sample one line (16 scores) in every `stride` lines; aim for >= 2k samples, at most 1/32 of the row
    int64_t lines = n / 16;
    int64_t stride = std::max<int64_t>(1, std::min<int64_t>(32, n / (2 * k)));
    if (lines >= 4 && stride > 1) {
        ws.samp.clear();
        for (int64_t ln = 0; ln < lines; ln += stride) {
            const float* p = sc + lo + ln * 16;
            alignas(64) uint32_t u[16];
            _mm512_store_si512((void*)u, ordered_bits16(_mm512_loadu_ps(p)));
            ws.samp.insert(ws.samp.end(), u, u + 16);
        }
        int64_t m = (int64_t)ws.samp.size();
        double want = (double)k * m / (double)n;  // expected sample rank of the true k-th largest
        int64_t r = (int64_t)(want * 1.15 + 3.0 * sqrt(want) + 2.0);
        if (r < m) {
            std::nth_element(ws.samp.begin(), ws.samp.begin() + (m - r), ws.samp.end());
            uint32_t thr = ws.samp[m - r];
            // filter: keep u >= thr
            uint64_t* cd = ws.need(n);
            int64_t c = 0;
            alignas(64) uint32_t pu[16], pp[16];
            const __m512i thv = _mm512_set1_epi32((int)thr);
            const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            int64_t s = lo;
            for (; s + 16 <= hi; s += 16) {
                __m512i u = ordered_bits16(_mm512_loadu_ps(sc + s));
                __mmask16 keep = _mm512_cmp_epu32_mask(u, thv, _MM_CMPINT_NLT);
                if (!keep) continue;
                _mm512_mask_compressstoreu_epi32(pu, keep, u);
                _mm512_mask_compressstoreu_epi32(pp, keep, _mm512_add_epi32(lane, _mm512_set1_epi32((int)s)));
                int cnt = __builtin_popcount(keep);
                for (int i = 0; i < cnt; ++i) cd[c++] = ((uint64_t)pu[i] << 32) | (uint64_t)pp[i];
            }
            for (; s < hi; ++s) {
                uint32_t u = ordered_bits(sc[s]);
                if (u >= thr) cd[c++] = ((uint64_t)u << 32) | (uint64_t)s;
            }
            if (c >= k) {
                if (order == 1) {
                    // cd is in column order already: find the k-th largest composite, then one ordered scan
                    uint64_t kth = 0;
                    if (c > k) {
                        ws.cand.assign(cd, cd + c);
                        std::nth_element(ws.cand.begin(), ws.cand.begin() + (c - k), ws.cand.end());
                        kth = ws.cand[c - k];
                    }
                    int64_t w = 0;
                    for (int64_t i = 0; i < c; ++i)
                        if (cd[i] >= kth) out[w++] = (int64_t)(uint32_t)cd[i] + base;
                    return;  // exactly k written: composites are distinct
                }
                ws.cand.assign(cd, cd + c);
                if (c > k) {
                    std::nth_element(ws.cand.begin(), ws.cand.begin() + (c - k), ws.cand.end());
                    ws.cand.erase(ws.cand.begin(), ws.cand.begin() + (c - k));
                }
                emit(ws.cand, k, base, order, out);
                return;
            }
        }
    }
#endif
    topk_row_hist(sc, lo, hi, k, base, order, out, ws);
}

DSA_API void dsa_topk_rows(const float* scores, int64_t sc_stride, const int64_t* vlo, const int64_t* vhi, int64_t T,
                   int64_t k, int64_t base, int order, int64_t* idx, int64_t idx_stride, int nthreads) {
    int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, T));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        static thread_local TopkScratch ws;  // kept across calls: a fresh 1 MiB filter buffer page-faulted every call
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < T; ++t)
            topk_row(scores + t * sc_stride, vlo[t], vhi[t], k, base, order, idx + t * idx_stride, ws);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Attention of one query row over a list of key rows (sparse: selected positions; dense: a range), per kv head.
//   out[t, j*G + g, :] = sum_r softmax_r(scale * q[t, j*G+g] . k[r, j]) v[r, j]
// q, out: float32 or bf16 with (t, h) strides; k, v: float32 or bf16 with (position, head) strides, last dim
// contiguous. idx (T, n) int64, -1 skipped; idx == NULL: rows [0, range_hi[t]). Work items are (t, j, split);
// splits of a row are merged with their log-sum-exp (flash-decoding), so a long dense decode uses every thread.
// ------------------------------------------------------------------------------------------------------------
enum { DT_F32 = 0, DT_BF16 = 1 };

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float load1(const void* p, int64_t i, int dt) {
    return dt == DT_F32 ? ((const float*)p)[i] : bf16_to_f32(((const uint16_t*)p)[i]);
}

#ifdef DSA_VNNI
static inline __m512 load16(const void* p, int64_t i, int dt) {
    if (dt == DT_F32) return _mm512_loadu_ps((const float*)p + i);
    __m256i x = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
// exp(x) for x <= 0 (softmax after max subtraction): Cody-Waite reduction + degree-6 polynomial, ~2 ulp.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

struct AttnArgs {
    const void* q; int64_t q_st, q_sh;
    const void* k; int64_t k_ss, k_sh;
    const void* v; int64_t v_ss, v_sh;
    int dq, dkv;
    const int64_t* idx; int64_t idx_st, n;
    const int64_t* range_hi;
    int64_t T, H, Hkv, D, Dv;
    float scale;
};

#define DSA_MAXG 16
#define DSA_MAXD 256
#define DSA_BLK 128

// One (t, j) over rows [r0, r1) of its list. Writes the unnormalised accumulator acc[G][Dv], max m[G], sum l[G].
static void attend_part(const AttnArgs& a, int64_t t, int64_t j, int64_t r0, int64_t r1, float* acc, float* m,
                        float* l) {
    const int64_t G = a.H / a.Hkv, D = a.D, Dv = a.Dv;
    alignas(64) float qf[DSA_MAXG * DSA_MAXD];
    alignas(64) float sc[DSA_MAXG * DSA_BLK];
    int64_t rows[DSA_BLK];
    for (int64_t g = 0; g < G; ++g) {
        int64_t h = j * G + g;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load1(a.q, t * a.q_st + h * a.q_sh + d, a.dq) * a.scale;
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int64_t i = 0; i < G * Dv; ++i) acc[i] = 0.0f;
    const int64_t* ir = a.idx ? a.idx + t * a.idx_st : nullptr;
    for (int64_t b0 = r0; b0 < r1; b0 += DSA_BLK) {
        int64_t nb = 0;
        int64_t b1 = std::min(r1, b0 + DSA_BLK);
        for (int64_t r = b0; r < b1; ++r) {
            int64_t s = ir ? ir[r] : r;
            if (s >= 0) rows[nb++] = s;
        }
        if (nb == 0) continue;
        // scores
        for (int64_t i = 0; i < nb; ++i) {
            int64_t kb = rows[i] * a.k_ss + j * a.k_sh;
#ifdef DSA_VNNI
            if (D % 16 == 0) {
                if (i + 2 < nb)
                    _mm_prefetch((const char*)a.k + (rows[i + 2] * a.k_ss + j * a.k_sh) * (a.dkv ? 2 : 4), _MM_HINT_T0);
                __m512 kv[DSA_MAXD / 16];
                for (int64_t c = 0; c < D / 16; ++c) kv[c] = load16(a.k, kb + c * 16, a.dkv);
                for (int64_t g = 0; g < G; ++g) {
                    __m512 s = _mm512_mul_ps(kv[0], _mm512_load_ps(qf + g * D));
                    for (int64_t c = 1; c < D / 16; ++c)
                        s = _mm512_fmadd_ps(kv[c], _mm512_load_ps(qf + g * D + c * 16), s);
                    sc[g * DSA_BLK + i] = _mm512_reduce_add_ps(s);
                }
                continue;
            }
#endif
            for (int64_t g = 0; g < G; ++g) {
                float s = 0.0f;
                for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * load1(a.k, kb + d, a.dkv);
                sc[g * DSA_BLK + i] = s;
            }
        }
        // online softmax update
        for (int64_t g = 0; g < G; ++g) {
            float* sg = sc + g * DSA_BLK;
            float mb = m[g];
            for (int64_t i = 0; i < nb; ++i) mb = std::max(mb, sg[i]);
            float corr = (m[g] == -INFINITY) ? 0.0f : expf(m[g] - mb);
            l[g] *= corr;
            for (int64_t e = 0; e < Dv; ++e) acc[g * Dv + e] *= corr;
            m[g] = mb;
            int64_t i = 0;
            float lsum = 0.0f;
#ifdef DSA_VNNI
            __m512 vs = _mm512_setzero_ps();
            for (; i + 16 <= nb; i += 16) {
                __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + i), _mm512_set1_ps(mb)));
                _mm512_storeu_ps(sg + i, p);
                vs = _mm512_add_ps(vs, p);
            }
            if (i < nb) {
                __mmask16 mk = (__mmask16)((1u << (nb - i)) - 1u);
                __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + i), _mm512_set1_ps(mb)));
                p = _mm512_maskz_mov_ps(mk, p);
                _mm512_mask_storeu_ps(sg + i, mk, p);
                vs = _mm512_add_ps(vs, p);
                i = nb;
            }
            lsum = _mm512_reduce_add_ps(vs);
#endif
            for (; i < nb; ++i) {
                sg[i] = expf(sg[i] - mb);
                lsum += sg[i];
            }
            l[g] += lsum;
        }
        // values
        for (int64_t i = 0; i < nb; ++i) {
            int64_t vb = rows[i] * a.v_ss + j * a.v_sh;
#ifdef DSA_VNNI
            if (Dv % 16 == 0 && Dv <= 128) {
                __m512 vv[8];
                for (int64_t c = 0; c < Dv / 16; ++c) vv[c] = load16(a.v, vb + c * 16, a.dkv);
                for (int64_t g = 0; g < G; ++g) {
                    __m512 p = _mm512_set1_ps(sc[g * DSA_BLK + i]);
                    float* ag = acc + g * Dv;
                    for (int64_t c = 0; c < Dv / 16; ++c)
                        _mm512_storeu_ps(ag + c * 16, _mm512_fmadd_ps(p, vv[c], _mm512_loadu_ps(ag + c * 16)));
                }
                continue;
            }
#endif
            for (int64_t g = 0; g < G; ++g) {
                float p = sc[g * DSA_BLK + i];
                for (int64_t e = 0; e < Dv; ++e) acc[g * Dv + e] += p * load1(a.v, vb + e, a.dkv);
            }
        }
    }
}


#ifdef DSA_VNNI
// Sum of the 16 lanes of each v[r], r = 0..15, returned as lane r of one vector (transpose-add tree).
static inline __m512 reduce16(__m512 v[16]) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; ++i)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
    __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
}

// Register-blocked version of attend_part for G query heads per kv head and Dv = 16 * VC (D any multiple of 16):
// scores of 16 rows at a time with a transpose-add reduction, the G x Dv accumulator kept in registers.
template <int G, int DC, int VC>
static void attend_part_fast(const AttnArgs& a, int64_t t, int64_t j, int64_t r0, int64_t r1, float* acc_out,
                             float* m_out, float* l_out) {
    constexpr int64_t D = DC * 16;
    const int es = a.dkv == DT_F32 ? 4 : 2;
    alignas(64) float qf[G * DSA_MAXD];
    alignas(64) float kf[16 * D];
    alignas(64) float sc[G * DSA_BLK];
    int64_t rows[DSA_BLK];
    for (int g = 0; g < G; ++g) {
        int64_t h = j * G + g;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load1(a.q, t * a.q_st + h * a.q_sh + d, a.dq) * a.scale;
    }
    float m[G], l[G];
    __m512 ac[G][VC];
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int c = 0; c < VC; ++c) ac[g][c] = _mm512_setzero_ps();
    }
    const int64_t* ir = a.idx ? a.idx + t * a.idx_st : nullptr;
    const char* kbase = (const char*)a.k;
    const char* vbase = (const char*)a.v;
    // Row lists are collected one block ahead: the next block's rows are prefetched (to L2) while this block
    // computes, so random rows (a sparse selection) arrive overlapped instead of one memory latency each.
    int64_t rows_next[DSA_BLK];
    int64_t nb_next = 0;
    auto collect = [&](int64_t c0, int64_t* dst) -> int64_t {
        int64_t c1 = std::min(r1, c0 + DSA_BLK), cnt = 0;
        for (int64_t r = c0; r < c1; ++r) {
            int64_t s = ir ? ir[r] : r;
            if (s < 0) continue;
            dst[cnt++] = s;
        }
        return cnt;
    };
    // software prefetch PF rows ahead of the score loop (k and v lines): enough in flight to hide a memory
    // latency, few enough not to overflow the fill buffers (a whole 128-row block at once did not help)
    const int64_t PF = 32;
    auto prefetch_row = [&](int64_t s) {
        const char* kp = kbase + (s * a.k_ss + j * a.k_sh) * es;
        const char* vp = vbase + (s * a.v_ss + j * a.v_sh) * es;
        for (int64_t off = 0; off < D * es; off += 64) _mm_prefetch(kp + off, _MM_HINT_T0);
        for (int64_t off = 0; off < VC * 16 * es; off += 64) _mm_prefetch(vp + off, _MM_HINT_T0);
    };
    if (r0 < r1) {
        nb_next = collect(r0, rows_next);
        for (int64_t i = 0; i < std::min(PF, nb_next); ++i) prefetch_row(rows_next[i]);
    }
    for (int64_t b0 = r0; b0 < r1; b0 += DSA_BLK) {
        int64_t nb = nb_next;
        memcpy(rows, rows_next, sizeof(int64_t) * nb);
        nb_next = b0 + DSA_BLK < r1 ? collect(b0 + DSA_BLK, rows_next) : 0;
        if (nb == 0) continue;
        // scores of 16 rows at a time
        for (int64_t i0 = 0; i0 < nb; i0 += 16) {
            int64_t nr = std::min<int64_t>(16, nb - i0);
            for (int64_t p = i0 + PF; p < i0 + PF + 16; ++p) {
                if (p < nb)
                    prefetch_row(rows[p]);
                else if (p - nb < nb_next)
                    prefetch_row(rows_next[p - nb]);
            }
            for (int64_t r = 0; r < 16; ++r) {
                if (r < nr) {
                    int64_t kb = rows[i0 + r] * a.k_ss + j * a.k_sh;
                    for (int c = 0; c < DC; ++c) _mm512_store_ps(kf + r * D + c * 16, load16(a.k, kb + c * 16, a.dkv));
                } else {
                    for (int c = 0; c < DC; ++c) _mm512_store_ps(kf + r * D + c * 16, _mm512_setzero_ps());
                }
            }
            for (int g = 0; g < G; ++g) {
                __m512 v[16], qv[DC];
                for (int c = 0; c < DC; ++c) qv[c] = _mm512_load_ps(qf + g * D + c * 16);
                for (int r = 0; r < 16; ++r) {
                    __m512 s = _mm512_mul_ps(_mm512_load_ps(kf + r * D), qv[0]);
                    for (int c = 1; c < DC; ++c) s = _mm512_fmadd_ps(_mm512_load_ps(kf + r * D + c * 16), qv[c], s);
                    v[r] = s;
                }
                _mm512_store_ps(sc + g * DSA_BLK + i0, reduce16(v));
            }
        }
        // softmax statistics of the block
        for (int g = 0; g < G; ++g) {
            float* sg = sc + g * DSA_BLK;
            int64_t i = 0;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (; i + 16 <= nb; i += 16) mv = _mm512_max_ps(mv, _mm512_load_ps(sg + i));
            float mb = _mm512_reduce_max_ps(mv);
            for (; i < nb; ++i) mb = std::max(mb, sg[i]);
            if (mb > m[g]) {
                float corr = m[g] == -INFINITY ? 0.0f : expf(m[g] - mb);
                l[g] *= corr;
                __m512 cv = _mm512_set1_ps(corr);
                for (int c = 0; c < VC; ++c) ac[g][c] = _mm512_mul_ps(ac[g][c], cv);
                m[g] = mb;
            }
            __m512 mm = _mm512_set1_ps(m[g]), vs = _mm512_setzero_ps();
            for (i = 0; i < nb; i += 16) {
                __mmask16 mk = nb - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nb - i)) - 1u);
                __m512 p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_load_ps(sg + i), mm)));
                _mm512_store_ps(sg + i, p);
                vs = _mm512_add_ps(vs, p);
            }
            l[g] += _mm512_reduce_add_ps(vs);
        }
        // values
        for (int64_t i = 0; i < nb; ++i) {
            int64_t vb = rows[i] * a.v_ss + j * a.v_sh;
            __m512 vv[VC];
            for (int c = 0; c < VC; ++c) vv[c] = load16(a.v, vb + c * 16, a.dkv);
            for (int g = 0; g < G; ++g) {
                __m512 p = _mm512_set1_ps(sc[g * DSA_BLK + i]);
                for (int c = 0; c < VC; ++c) ac[g][c] = _mm512_fmadd_ps(p, vv[c], ac[g][c]);
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        m_out[g] = m[g];
        l_out[g] = l[g];
        for (int c = 0; c < VC; ++c) _mm512_storeu_ps(acc_out + g * VC * 16 + c * 16, ac[g][c]);
    }
}

typedef void (*attend_fn)(const AttnArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);
static attend_fn pick_fast(int64_t G, int64_t D, int64_t Dv) {
    // register-blocked instantiations for D == Dv in {16, 32, 64, 128}; other shapes take the generic loop
    if (D != Dv || D % 16 != 0) return nullptr;
    int64_t C = D / 16;
#define DSA_CASE(g, c) if (G == g && C == c) return attend_part_fast<g, c, c>;
    DSA_CASE(1, 1) DSA_CASE(1, 2) DSA_CASE(1, 4) DSA_CASE(1, 8)
    DSA_CASE(2, 1) DSA_CASE(2, 2) DSA_CASE(2, 4) DSA_CASE(2, 8)
    DSA_CASE(4, 1) DSA_CASE(4, 2) DSA_CASE(4, 4) DSA_CASE(4, 8)
    DSA_CASE(8, 1) DSA_CASE(8, 2) DSA_CASE(8, 4)
#undef DSA_CASE
    return nullptr;
}
#endif

// Merge the ns splits of each (t, j) by log-sum-exp and write the normalised output.
static void attend_merge(int64_t T, int64_t Hkv, int64_t G, int64_t Dv, int64_t ns, const float* pacc, const float* pm,
                         const float* pl, void* out, int64_t o_st, int64_t o_sh, int dout) {
    for (int64_t tj = 0; tj < T * Hkv; ++tj) {
        int64_t t = tj / Hkv, j = tj % Hkv;
        for (int64_t g = 0; g < G; ++g) {
            float mx = -INFINITY;
            for (int64_t c = 0; c < ns; ++c) mx = std::max(mx, pm[(tj * ns + c) * G + g]);
            float den = 0.0f;
            float o[1024];
            for (int64_t e = 0; e < Dv; ++e) o[e] = 0.0f;
            if (mx != -INFINITY) {
                for (int64_t c = 0; c < ns; ++c) {
                    int64_t it = tj * ns + c;
                    float mc = pm[it * G + g];
                    if (mc == -INFINITY) continue;
                    float w = expf(mc - mx);
                    den += pl[it * G + g] * w;
                    const float* ac = pacc + (it * G + g) * Dv;
                    for (int64_t e = 0; e < Dv; ++e) o[e] += ac[e] * w;
                }
            }
            float inv = den > 0.0f ? 1.0f / den : 0.0f;
            int64_t h = j * G + g;
            int64_t ob = t * o_st + h * o_sh;
            for (int64_t e = 0; e < Dv; ++e) {
                float x = o[e] * inv;
                if (dout == DT_F32)
                    ((float*)out)[ob + e] = x;
                else
                    ((uint16_t*)out)[ob + e] = f32_to_bf16(x);
            }
        }
    }
}

// returns 0 on success, -1 when the shape is beyond the kernel's fixed buffers (caller falls back)
DSA_API int dsa_attend(const void* q, int64_t q_st, int64_t q_sh, const void* k, int64_t k_ss, int64_t k_sh,
               const void* v, int64_t v_ss, int64_t v_sh, int dq, int dkv, const int64_t* idx, int64_t idx_st,
               int64_t n,
               const int64_t* range_hi, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t Dv, float scale,
               void* out, int64_t o_st, int64_t o_sh, int dout, int64_t split, int nthreads) {
    AttnArgs a{q, q_st, q_sh, k, k_ss, k_sh, v, v_ss, v_sh, dq, dkv, idx, idx_st, n, range_hi, T, H, Hkv, D, Dv, scale};
    const int64_t G = H / Hkv;
    if (G > DSA_MAXG || D > DSA_MAXD || Dv > 1024 || G * Hkv != H) return -1;
    int64_t nmax = n;
    if (!idx) {
        nmax = 0;
        for (int64_t t = 0; t < T; ++t) nmax = std::max(nmax, range_hi[t]);
    }
    if (split <= 0) split = nmax > 0 ? nmax : 1;
    int64_t ns = std::max<int64_t>(1, (nmax + split - 1) / split);
    int64_t items = T * Hkv * ns;
    std::vector<float> pacc((size_t)items * G * Dv), pm((size_t)items * G), pl((size_t)items * G);
    int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, items));
    attend_fn fn = attend_part;
#ifdef DSA_VNNI
    if (attend_fn f = pick_fast(G, D, Dv)) fn = f;
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t it = 0; it < items; ++it) {
        int64_t t = it / (Hkv * ns), j = (it / ns) % Hkv, c = it % ns;
        int64_t len = idx ? n : range_hi[t];
        int64_t r0 = std::min(len, c * split), r1 = std::min(len, r0 + split);
        fn(a, t, j, r0, r1, pacc.data() + it * G * Dv, pm.data() + it * G, pl.data() + it * G);
    }
    attend_merge(T, Hkv, G, Dv, ns, pacc.data(), pm.data(), pl.data(), out, o_st, o_sh, dout);
    return 0;
}


// ------------------------------------------------------------------------------------------------------------
// The whole int8 selection of a chunk of queries in one call: quantise the queries per (t, h) exactly like
// parca.sparse.quant.quantize_int8_rows (amax / 127, round half to even, clamp to +-127) and fold the scale
// into the head weight (w * scale), score the key span [lo, lo + S) (dsa_index_scores_i8), and take the exact
// top-k of every row over its visible keys (causal by q_pos, optional window; dsa_topk_rows).
// q: (T, H, D) float32 or bf16 with strides (q_st, q_sh), D contiguous; w: (T, H) float32 with row stride w_st.
// scores: (T, S) float32 scratch. idx: (T, k) int64 with row stride idx_st.
// ------------------------------------------------------------------------------------------------------------
// Symmetric int8 of one row: scale = max(amax / 127, FLT_MIN), q = round-half-even(x / scale) clamped to
// [-127, 127] -- the same float32 ops as parca.sparse.quantize_int8_rows (bit-identical). Returns the scale.
static inline float quantize_row(const float* x, int64_t D, int8_t* q) {
    const float tiny = 1.17549435e-38f;  // torch.finfo(float32).tiny: the clamp of an all-zero row's scale
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, fabsf(x[d]));
    float scale = amax / 127.0f;
    if (scale < tiny) scale = tiny;
    for (int64_t d = 0; d < D; ++d) q[d] = (int8_t)std::min(127.0f, std::max(-127.0f, nearbyintf(x[d] / scale)));
    return scale;
}

// The int8 queries of a selection: optional RoPE, symmetric int8 per (t, h), the scale folded into the head
// weight (qw = w * scale), and each row's visible key span [vlo, vhi) (causal by qpos, optional window).
// rope_dim > 0: the queries arrive BEFORE their RoPE; rotate-half RoPE on their first rope_dim dims with the
// (T, rope_dim) tables rcos / rsin (in the queries' dtype), the same ops as parca.sparse.apply_rope_half:
// float32 mul / mul / add, or for bf16 each result rounded to bf16 as torch's bf16 ops do (bit-identical)
static void prepare_queries(const void* q, int dq, int64_t q_st, int64_t q_sh, const float* w, int64_t w_st, int64_t S,
                            const int64_t* qpos, int64_t lo, int64_t window, int64_t T, int64_t H, int64_t D,
                            const void* rcos, const void* rsin, int64_t rope_dim, int8_t* q8, float* qw,
                            int64_t* vlo, int64_t* vhi) {
    std::vector<float> xf((size_t)D), xr((size_t)D);
    const int64_t half = rope_dim / 2;
    auto rb = [&](float x) { return dq == DT_F32 ? x : bf16_to_f32(f32_to_bf16(x)); };
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t d = 0; d < D; ++d) xf[d] = load1(q, t * q_st + h * q_sh + d, dq);
            if (rope_dim > 0) {
                for (int64_t d = 0; d < half; ++d) {
                    float c1 = load1(rcos, t * rope_dim + d, dq), c2 = load1(rcos, t * rope_dim + d + half, dq);
                    float s1 = load1(rsin, t * rope_dim + d, dq), s2 = load1(rsin, t * rope_dim + d + half, dq);
                    float x1 = xf[d], x2 = xf[d + half];
                    float a = rb(x1 * c1), b = rb(-x2 * s1);
                    xr[d] = rb(a + b);
                    float a2 = rb(x2 * c2), b2 = rb(x1 * s2);
                    xr[d + half] = rb(a2 + b2);
                }
                for (int64_t d = 0; d < rope_dim; ++d) xf[d] = xr[d];
            }
            qw[t * H + h] = w[t * w_st + h] * quantize_row(xf.data(), D, q8 + (t * H + h) * D);
        }
        int64_t hi = std::min<int64_t>(S, std::max<int64_t>(0, qpos[t] + 1 - lo));
        int64_t l0 = window > 0 ? std::min<int64_t>(hi, std::max<int64_t>(0, qpos[t] - window + 1 - lo)) : 0;
        vlo[t] = l0;
        vhi[t] = hi;
    }
}

DSA_API void dsa_select_i8(const void* q, int dq, int64_t q_st, int64_t q_sh, const float* w, int64_t w_st,
                           const int8_t* k8, int64_t k_stride, const float* ks, int64_t S, const int64_t* qpos,
                           int64_t lo, int64_t window, int64_t T, int64_t H, int64_t D, int64_t k, int order,
                           float* scores, int64_t* idx, int64_t idx_st, int nthreads, const void* rcos,
                           const void* rsin, int64_t rope_dim) {
    std::vector<int8_t> q8((size_t)T * H * D);
    std::vector<float> qw((size_t)T * H);
    std::vector<int64_t> vlo(T), vhi(T);
    prepare_queries(q, dq, q_st, q_sh, w, w_st, S, qpos, lo, window, T, H, D, rcos, rsin, rope_dim, q8.data(),
                    qw.data(), vlo.data(), vhi.data());
    dsa_index_scores_i8(q8.data(), qw.data(), k8, k_stride, ks, scores, S, T, H, D, S, vhi.data(), nthreads);
    dsa_topk_rows(scores, S, vlo.data(), vhi.data(), T, k, lo, order, idx, idx_st, nthreads);
}

// ------------------------------------------------------------------------------------------------------------
// One decode query's whole DSA step in ONE parallel region: the indexer queries' RoPE and int8 quantisation,
// the scores of every visible key (key blocks split over the threads), the exact top-k in ascending positions
// (one thread), then attention over the selected rows (kv head x split items over the threads), merged after
// the region. The same results as dsa_select_i8 (T = 1, lo = 0, order 1) followed by dsa_attend on its idx
// with the same split: the same functions on the same data, only the scheduling differs.
// Why one region: with sleeping (passive) OpenMP workers each parallel region wakes them again, ~0.1 ms on a
// 2-core VM, against ~1.5 ms for the whole step at 128K keys. Inside the region the threads meet at a spin
// barrier: the waits are short (the top-k takes ~0.15 ms) and a futex sleep would cost another wake-up. After
// ~2,000 pauses (~0.1 ms) a waiter sleeps on a futex instead: on a loaded machine the thread it waits for may be
// descheduled, and spinning then takes its core (a pure spin measured 3x slower than two calls at load 4).
// ------------------------------------------------------------------------------------------------------------
struct SpinBarrier {
    std::atomic<int> count{0}, gen{0}, sleepers{0};
    void wait(int n) {
        if (n <= 1) return;
        int g = gen.load(std::memory_order_seq_cst);
        if (count.fetch_add(1, std::memory_order_seq_cst) == n - 1) {
            count.store(0, std::memory_order_relaxed);
            gen.fetch_add(1, std::memory_order_seq_cst);
#ifdef __linux__
            if (sleepers.load(std::memory_order_seq_cst) > 0)
                syscall(SYS_futex, (int*)&gen, FUTEX_WAKE_PRIVATE, 1 << 30, nullptr, nullptr, 0);
#endif
            return;
        }
        for (int i = 0; i < 2048 && gen.load(std::memory_order_acquire) == g; ++i) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        if (gen.load(std::memory_order_acquire) != g) return;
        // still waiting (the thread we wait for may be descheduled on a loaded machine): sleep, as libgomp's
        // passive barrier would, instead of taking the core from it
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        while (gen.load(std::memory_order_seq_cst) == g) {
#ifdef __linux__
            syscall(SYS_futex, (int*)&gen, FUTEX_WAIT_PRIVATE, g, nullptr, nullptr, 0);
#else
            sched_yield();
#endif
        }
        sleepers.fetch_sub(1, std::memory_order_seq_cst);
    }
};

DSA_API int dsa_decode_step(const void* qi, int dqi, int64_t qi_sh, const float* w, const int8_t* k8, int64_t k_stride,
                            const float* ks, int64_t S, int64_t pos, int64_t window, int64_t HI, int64_t DI,
                            int64_t topk, float* scores, int64_t* idx, const void* rcos, const void* rsin,
                            int64_t rope_dim, const void* q, int dq, int64_t q_sh, const void* k, int64_t k_ss,
                            int64_t k_sh, const void* v, int64_t v_ss, int64_t v_sh, int dkv, int64_t H, int64_t Hkv,
                            int64_t D, int64_t Dv, float scale, void* out, int64_t o_sh, int64_t split, int nthreads) {
    const int64_t G = H / Hkv;
    if (G > DSA_MAXG || D > DSA_MAXD || Dv > 1024 || G * Hkv != H) return -1;
    std::vector<int8_t> q8((size_t)HI * DI);
    std::vector<float> qw((size_t)HI);
    int64_t vlo = 0, vhi = 0;
    prepare_queries(qi, dqi, 0, qi_sh, w, 0, S, &pos, 0, window, 1, HI, DI, rcos, rsin, rope_dim, q8.data(), qw.data(),
                    &vlo, &vhi);
    std::vector<int32_t> qsum = query_sums(q8.data(), HI, DI);
    const int64_t nsb = (S + DSA_SB - 1) / DSA_SB;
    AttnArgs a{q, 0, q_sh, k, k_ss, k_sh, v, v_ss, v_sh, dq, dkv, idx, topk, topk, nullptr, 1, H, Hkv, D, Dv, scale};
    if (split <= 0) split = topk > 0 ? topk : 1;
    const int64_t ns = std::max<int64_t>(1, (topk + split - 1) / split), items = Hkv * ns;
    std::vector<float> pacc((size_t)items * G * Dv), pm((size_t)items * G), pl((size_t)items * G);
    attend_fn fn = attend_part;
#ifdef DSA_VNNI
    if (attend_fn f = pick_fast(G, D, Dv)) fn = f;
#endif
    int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, items));  // items >= 1
    SpinBarrier bar;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        static thread_local TopkScratch ws;  // (thread 0, the caller, runs the top-k: kept across calls)
        const int tid = omp_get_thread_num(), n = omp_get_num_threads();
        scores_blocks(q8.data(), qw.data(), qsum.data(), k8, k_stride, ks, scores, S, 1, HI, DI, S, &vhi,
                      nsb * tid / n, nsb * (tid + 1) / n);
        bar.wait(n);
        if (tid == 0) topk_row(scores, vlo, vhi, topk, 0, 1, idx, ws);
        bar.wait(n);
        for (int64_t it = tid; it < items; it += n) {
            int64_t j = it / ns, c = it % ns;
            int64_t r0 = std::min(topk, c * split), r1 = std::min(topk, r0 + split);
            fn(a, 0, j, r0, r1, pacc.data() + it * G * Dv, pm.data() + it * G, pl.data() + it * G);
        }
    }
    attend_merge(1, Hkv, G, Dv, ns, pacc.data(), pm.data(), pl.data(), out, 0, o_sh, dq);
    return 0;
}


// ------------------------------------------------------------------------------------------------------------
// Per-row int8 quantisation into a cache (dsa_quantize_rows): quantize_row for each of T rows.
// x: (T, D) float32 / bf16 rows x_st elements apart; q: int8 rows q_st bytes apart; scale: (T,) float32.
// ------------------------------------------------------------------------------------------------------------
DSA_API void dsa_quantize_rows(const void* x, int dx, int64_t x_st, int64_t T, int64_t D, int8_t* q, int64_t q_st,
                               float* scale) {
    std::vector<float> xf((size_t)D);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t d = 0; d < D; ++d) xf[d] = load1(x, t * x_st + d, dx);
        scale[t] = quantize_row(xf.data(), D, q + t * q_st);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Sparse attention of a BLOCK of queries (prefill): neighbouring queries select overlapping rows, so the
// block's selections are merged into one union in position order (a bitmask of the selecting queries per row)
// and every union row is read once per block: a near-sequential scan instead of one random read per (query,
// row). Pass 1 scores each (row, selecting query) pair, pass 2 accumulates the values with the normalised
// weights. Same result as dsa_attend on the same idx (the sum order over rows can differ).
// ------------------------------------------------------------------------------------------------------------
#ifdef DSA_VNNI
#define DSA_QB 32
struct BlockScratch {
    std::vector<uint32_t> mark;    // per cache row: bitmask of the block's queries that selected it
    std::vector<int32_t> urow;     // union rows, ascending
    std::vector<uint32_t> umask;
    std::vector<float> sc;         // [q][g][i] scores, then weights, of query q's i-th row (union order)
    std::vector<float> acc;        // [q][h][Dv]
    std::vector<float> qf, ml;     // scaled queries [q][h][D]; running max and sum [q][h]
};

template <int G, int C>
static void attend_block(const AttnArgs& a, int64_t S, int64_t t0, int64_t t1, void* out, int64_t o_st,
                         int64_t o_sh, int dout, BlockScratch& ws) {
    // every kv head in the same scan: the selection is shared by all heads, so the union, its marks and the
    // row visits (all heads' keys of a position are contiguous) are paid once per block, not once per head
    constexpr int64_t D = C * 16, Dv = C * 16;
    const int64_t n = a.n, nq = t1 - t0, HK = a.Hkv, NG = HK * G;  // NG: query heads
    const int es = a.dkv == DT_F32 ? 4 : 2;
    if ((int64_t)ws.mark.size() < S) ws.mark.assign(S, 0u);
    ws.sc.resize((size_t)DSA_QB * NG * n);
    ws.acc.assign((size_t)DSA_QB * NG * Dv, 0.0f);
    ws.qf.resize((size_t)DSA_QB * NG * D + 16);
    ws.ml.resize((size_t)DSA_QB * NG * 2);
    float* qf = (float*)(((uintptr_t)ws.qf.data() + 63) & ~(uintptr_t)63);
    float* m = ws.ml.data();
    float* l = m + DSA_QB * NG;
    int64_t cnt[DSA_QB];
    int64_t lo = S, hi = -1;
    for (int64_t q = 0; q < nq; ++q) {
        int64_t t = t0 + q;
        for (int64_t h = 0; h < NG; ++h) {
            for (int64_t d = 0; d < D; ++d)
                qf[(q * NG + h) * D + d] = load1(a.q, t * a.q_st + h * a.q_sh + d, a.dq) * a.scale;
            m[q * NG + h] = -INFINITY;
        }
        cnt[q] = 0;
        const int64_t* ir = a.idx + t * a.idx_st;
        for (int64_t i = 0; i < n; ++i) {
            int64_t s = ir[i];
            if (s < 0 || s >= S) continue;
            ws.mark[s] |= 1u << q;
            lo = std::min(lo, s);
            hi = std::max(hi, s);
        }
    }
    ws.urow.clear();
    ws.umask.clear();
    for (int64_t s = lo; s <= hi; ++s) {  // the union in position order (and the marks cleared behind us)
        uint32_t mk = ws.mark[s];
        if (!mk) continue;
        ws.urow.push_back((int32_t)s);
        ws.umask.push_back(mk);
        ws.mark[s] = 0u;
    }
    const int64_t nu = (int64_t)ws.urow.size();
    const char* kbase = (const char*)a.k;
    const char* vbase = (const char*)a.v;
    float* sc = ws.sc.data();  // [q][h][i]
    // pass 1: scores
    for (int64_t u = 0; u < nu; ++u) {
        if (u + 8 < nu) {
            int64_t sp = ws.urow[u + 8];
            for (int64_t j = 0; j < HK; ++j) {
                const char* kp = kbase + (sp * a.k_ss + j * a.k_sh) * es;
                for (int64_t off = 0; off < D * es; off += 64) _mm_prefetch(kp + off, _MM_HINT_T0);
            }
        }
        const int64_t row = ws.urow[u];
        const uint32_t mk0 = ws.umask[u];
        for (int64_t j = 0; j < HK; ++j) {
            int64_t kb = row * a.k_ss + j * a.k_sh;
            __m512 kv[C];
            for (int c = 0; c < C; ++c) kv[c] = load16(a.k, kb + c * 16, a.dkv);
            uint32_t mk = mk0;
            while (mk) {
                int q = __builtin_ctz(mk);
                mk &= mk - 1;
                int64_t i = cnt[q];
                for (int g = 0; g < G; ++g) {
                    int64_t h = j * G + g;
                    const float* qv = qf + (q * NG + h) * D;
                    __m512 sv = _mm512_mul_ps(kv[0], _mm512_load_ps(qv));
                    for (int c = 1; c < C; ++c) sv = _mm512_fmadd_ps(kv[c], _mm512_load_ps(qv + c * 16), sv);
                    float x = _mm512_reduce_add_ps(sv);
                    sc[((int64_t)q * NG + h) * n + i] = x;
                    if (x > m[q * NG + h]) m[q * NG + h] = x;
                }
            }
        }
        uint32_t mk = mk0;
        while (mk) {
            int q = __builtin_ctz(mk);
            mk &= mk - 1;
            cnt[q]++;
        }
    }
    // softmax weights
    for (int64_t q = 0; q < nq; ++q) {
        for (int64_t h = 0; h < NG; ++h) {
            float* sg = sc + (q * NG + h) * n;
            __m512 mm = _mm512_set1_ps(m[q * NG + h]), vs = _mm512_setzero_ps();
            for (int64_t i = 0; i < cnt[q]; i += 16) {
                __mmask16 mk = cnt[q] - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cnt[q] - i)) - 1u);
                __m512 p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + i), mm)));
                _mm512_mask_storeu_ps(sg + i, mk, p);
                vs = _mm512_add_ps(vs, p);
            }
            l[q * NG + h] = _mm512_reduce_add_ps(vs);
        }
        cnt[q] = 0;
    }
    // pass 2: values
    float* acc = ws.acc.data();  // [q][h][Dv]
    for (int64_t u = 0; u < nu; ++u) {
        if (u + 8 < nu) {
            int64_t sp = ws.urow[u + 8];
            for (int64_t j = 0; j < HK; ++j) {
                const char* vp = vbase + (sp * a.v_ss + j * a.v_sh) * es;
                for (int64_t off = 0; off < Dv * es; off += 64) _mm_prefetch(vp + off, _MM_HINT_T0);
            }
        }
        const int64_t row = ws.urow[u];
        const uint32_t mk0 = ws.umask[u];
        for (int64_t j = 0; j < HK; ++j) {
            int64_t vb = row * a.v_ss + j * a.v_sh;
            __m512 vv[C];
            for (int c = 0; c < C; ++c) vv[c] = load16(a.v, vb + c * 16, a.dkv);
            uint32_t mk = mk0;
            while (mk) {
                int q = __builtin_ctz(mk);
                mk &= mk - 1;
                int64_t i = cnt[q];
                for (int g = 0; g < G; ++g) {
                    int64_t h = j * G + g;
                    __m512 p = _mm512_set1_ps(sc[((int64_t)q * NG + h) * n + i]);
                    float* ag = acc + ((int64_t)q * NG + h) * Dv;
                    for (int c = 0; c < C; ++c)
                        _mm512_storeu_ps(ag + c * 16, _mm512_fmadd_ps(p, vv[c], _mm512_loadu_ps(ag + c * 16)));
                }
            }
        }
        uint32_t mk = mk0;
        while (mk) {
            int q = __builtin_ctz(mk);
            mk &= mk - 1;
            cnt[q]++;
        }
    }
    for (int64_t q = 0; q < nq; ++q) {
        int64_t t = t0 + q;
        for (int64_t h = 0; h < NG; ++h) {
            float inv = l[q * NG + h] > 0.0f ? 1.0f / l[q * NG + h] : 0.0f;
            const float* ag = acc + (q * NG + h) * Dv;
            int64_t ob = t * o_st + h * o_sh;
            for (int64_t e = 0; e < Dv; ++e) {
                float x = ag[e] * inv;
                if (dout == DT_F32)
                    ((float*)out)[ob + e] = x;
                else
                    ((uint16_t*)out)[ob + e] = f32_to_bf16(x);
            }
        }
    }
}

typedef void (*block_fn)(const AttnArgs&, int64_t, int64_t, int64_t, void*, int64_t, int64_t, int, BlockScratch&);
static block_fn pick_block(int64_t G, int64_t D, int64_t Dv) {
    if (D != Dv || D % 16 != 0) return nullptr;
    int64_t C = D / 16;
#define DSA_CASE(g, c) if (G == g && C == c) return attend_block<g, c>;
    DSA_CASE(1, 1) DSA_CASE(1, 2) DSA_CASE(1, 4) DSA_CASE(1, 8)
    DSA_CASE(2, 1) DSA_CASE(2, 2) DSA_CASE(2, 4) DSA_CASE(2, 8)
    DSA_CASE(4, 1) DSA_CASE(4, 2) DSA_CASE(4, 4) DSA_CASE(4, 8)
    DSA_CASE(8, 1) DSA_CASE(8, 2) DSA_CASE(8, 4)
#undef DSA_CASE
    return nullptr;
}
#endif

// Block path for a chunk of T queries with index lists over a cache of S rows; returns -1 when the shape has
// no block instantiation (the caller uses dsa_attend).
DSA_API int dsa_attend_blocks(const void* q, int64_t q_st, int64_t q_sh, const void* k, int64_t k_ss, int64_t k_sh,
                              const void* v, int64_t v_ss, int64_t v_sh, int dq, int dkv, const int64_t* idx,
                              int64_t idx_st, int64_t n, int64_t S, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                              int64_t Dv, float scale, void* out, int64_t o_st, int64_t o_sh, int dout, int nthreads) {
#ifdef DSA_VNNI
    const int64_t G = H / Hkv;
    if (G * Hkv != H) return -1;
    block_fn fn = pick_block(G, D, Dv);
    if (!fn) return -1;
    AttnArgs a{q, q_st, q_sh, k, k_ss, k_sh, v, v_ss, v_sh, dq, dkv, idx, idx_st, n, nullptr, T, H, Hkv, D, Dv, scale};
    int64_t nb = (T + DSA_QB - 1) / DSA_QB;
    int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nb));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        BlockScratch ws;
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nb; ++b) fn(a, S, b * DSA_QB, std::min(T, (b + 1) * DSA_QB), out, o_st, o_sh, dout, ws);
    }
    return 0;
#else
    return -1;
#endif
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-std=c++17"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None
_force_off = 0  # > 0 inside ``disabled()``


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    env = os.environ.get("PARCA_KERNEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parca" / "kernels"


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX", "g++")
    tag = hashlib.sha256("\n".join([_SOURCE, " ".join(_FLAGS), cxx, _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"dsa_kernels_{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "dsa_kernels.cpp"
            src.write_text(_SOURCE)
            so = Path(tmp) / "dsa_kernels.so"
            r = subprocess.run([cxx, *_FLAGS, str(src), "-o", str(so)], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-2000:]}")
            os.replace(so, out)  # atomic: concurrent builders each install a complete file
    lib = ctypes.CDLL(str(out))
    i64, vp, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.dsa_abi_version.restype = i32
    lib.dsa_simd.restype = i32
    lib.dsa_index_scores_i8.argtypes = [vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, i64, vp, i32]
    lib.dsa_index_scores_i8.restype = None
    lib.dsa_topk_rows.argtypes = [vp, i64, vp, vp, i64, i64, i64, i32, vp, i64, i32]
    lib.dsa_topk_rows.restype = None
    lib.dsa_attend.argtypes = [vp, i64, i64, vp, i64, i64, vp, i64, i64, i32, i32, vp, i64, i64, vp, i64, i64, i64,
                               i64, i64, f32, vp, i64, i64, i32, i64, i32]
    lib.dsa_attend.restype = i32
    lib.dsa_select_i8.argtypes = [vp, i32, i64, i64, vp, i64, vp, i64, vp, i64, vp, i64, i64, i64, i64, i64, i64,
                                  i32, vp, vp, i64, i32, vp, vp, i64]
    lib.dsa_select_i8.restype = None
    lib.dsa_attend_blocks.argtypes = [vp, i64, i64, vp, i64, i64, vp, i64, i64, i32, i32, vp, i64, i64, i64, i64, i64,
                                      i64, i64, i64, f32, vp, i64, i64, i32, i32]
    lib.dsa_attend_blocks.restype = i32
    lib.dsa_quantize_rows.argtypes = [vp, i32, i64, i64, i64, vp, i64, vp]
    lib.dsa_quantize_rows.restype = None
    lib.dsa_decode_step.argtypes = [vp, i32, i64, vp, vp, i64, vp, i64, i64, i64, i64, i64, i64, vp, vp, vp, vp, i64,
                                    vp, i32, i64, vp, i64, i64, vp, i64, i64, i32, i64, i64, i64, i64, f32, vp, i64,
                                    i64, i32]
    lib.dsa_decode_step.restype = i32
    return lib


def _get() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when disabled or unbuildable (see ``build_error``)."""
    global _lib, _tried, _error
    if _force_off:
        return None
    if not _tried:  # PARCA_KERNELS is read once, at the first call (``disabled()`` switches at run time)
        with _lock:
            if not _tried:
                if os.environ.get("PARCA_KERNELS", "1").lower() in ("0", "off", "false", "no"):
                    _error = "disabled by PARCA_KERNELS"
                else:
                    try:
                        _lib = _build()
                    except Exception as e:  # no compiler, read-only cache dir, ...: the torch paths take over
                        _error = f"{type(e).__name__}: {e}"
                        _lib = None
                _tried = True
    return _lib


def available() -> bool:
    """True when the C kernels are built (or buildable now) and not disabled."""
    return _get() is not None


def enabled() -> bool:
    return available()


def build_error() -> str | None:
    """Why the kernels are unavailable, if a build was tried and failed."""
    return _error


def simd() -> bool:
    """True when the kernels were built with the AVX-512 VNNI paths (else portable scalar loops)."""
    lib = _get()
    return bool(lib is not None and lib.dsa_simd())


@contextmanager
def disabled() -> Iterator[None]:
    """Run the torch paths inside this block (tests and benchmarks compare both)."""
    global _force_off
    _force_off += 1
    try:
        yield
    finally:
        _force_off -= 1


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------- indexer scores


def index_scores_i8(q8: Tensor, qw: Tensor, k8: Tensor, ks: Tensor, *, out: Tensor | None = None,
                    s_end: Tensor | None = None) -> Tensor:
    """Indexer scores from int8 queries and int8 keys with per-token scales.

    ``out[t, s] = ks[s] * sum_h relu(q8[t, h] . k8[s]) * qw[t, h]`` with the integer dot exact and the head sum
    accumulated in float32 in ascending head order (mul, then add): bit-identical to ``index_scores_i8_torch``.

    Args:
        q8: (T, H, D) int8 queries.
        qw: (T, H) float32 per-head factors (head weight times the query's dequantisation scale).
        k8: (S, D) int8 keys; rows may be strided (a cache view), the last dim contiguous.
        ks: (S,) float32 per-key dequantisation scales.
        out: optional (T, S') float32, S' >= S, rows written in place (last dim contiguous).
        s_end: optional (T,) int64: row t only needs keys s < s_end[t] (the rest of the row is left unwritten).

    Returns:
        (T, S) float32 (a view of ``out`` when given).
    """
    t, h, d = q8.shape
    s = k8.shape[0]
    if out is None:
        out = torch.empty(t, s, dtype=torch.float32)
    lib = _get()
    if lib is None or t == 0 or s == 0:
        out[:, :s] = index_scores_i8_torch(q8, qw, k8, ks)
        return out[:, :s]
    q8c, qwc, ksc = q8.contiguous(), qw.float().contiguous(), ks.float().contiguous()
    if k8.stride(-1) != 1:
        k8 = k8.contiguous()
    se = None if s_end is None else s_end.to(torch.int64).contiguous()
    lib.dsa_index_scores_i8(_p(q8c), _p(qwc), _p(k8), k8.stride(0), _p(ksc), _p(out), out.stride(0), t, h, d, s,
                            _p(se), torch.get_num_threads())
    return out[:, :s]


def _int_dots(k8: Tensor, q8: Tensor) -> Tensor:
    """(S, D) int8 x (N, D) int8 -> (S, N) exact integer dots, as float32 (exact: |dot| <= D * 127**2 < 2**24)."""
    if k8.shape[1] * 127 * 127 >= 2**24:
        raise ValueError(f"int8 indexer dim {k8.shape[1]} too large for exact float32 dots (max 1040)")
    try:
        return torch._int_mm(k8.contiguous(), q8.t()).float()  # VNNI-backed in oneDNN where available
    except (RuntimeError, AttributeError):
        return k8.float() @ q8.float().t()  # every partial sum is an integer < 2**24: exact too


def index_scores_i8_torch(q8: Tensor, qw: Tensor, k8: Tensor, ks: Tensor) -> Tensor:
    """Torch twin of ``index_scores_i8`` (same arguments, same bits)."""
    t, h, d = q8.shape
    s = k8.shape[0]
    if t == 0 or s == 0:
        return torch.zeros(t, s)
    r = _int_dots(k8, q8.reshape(t * h, d)).clamp_min_(0).view(s, t, h)  # (S, T, H)
    qw = qw.float()
    acc = torch.zeros(s, t)
    for j in range(h):  # ascending heads, mul then add: the kernel's exact order
        acc.add_(r[:, :, j] * qw[:, j])
    return (acc * ks.float().view(s, 1)).t()


_local = threading.local()


def _scratch(numel: int) -> Tensor:
    """A float32 buffer reused across calls (a fresh multi-MiB tensor per call page-faults every time)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        # grow geometrically: a decode step needs one more score than the last, and a fresh buffer each step
        # would page-fault all of it again
        buf = torch.empty(max(numel, 1 << 16, 0 if buf is None else 2 * buf.numel()), dtype=torch.float32)
        _local.buf = buf
    return buf[:numel]


def select_i8(q: Tensor, w: Tensor, k8: Tensor, ks: Tensor, q_pos: Tensor, k: int, *, lo: int = 0,
              window: int | None = None, order: str = "score", out: Tensor | None = None) -> Tensor:
    """The int8 selection of one sequence's query chunk in ONE C call (needs ``available()``).

    Quantises ``q`` per (t, h) exactly like ``quant.quantize_int8_rows`` (so the twin below is bit-identical),
    scores keys ``lo .. lo + S - 1`` with ``index_scores_i8`` and keeps the exact top-k of each row over its
    visible keys (``s <= q_pos[t]``, and ``s > q_pos[t] - window`` with a window).

    Args:
        q: (T, H, D) float32 / bf16 indexer queries (last dim contiguous).
        w: (T, H) float32 head weights.
        k8: (S, D) int8 keys of absolute positions lo .. lo + S - 1 (rows may be strided).
        ks: (S,) float32 key scales.
        q_pos: (T,) int64 absolute query positions.
        k: entries per row; order: "score" or "position" (see ``topk_rows``).
        out: optional (T, k) int64 destination (last dim contiguous).

    Returns:
        (T, k) int64 absolute key positions, -1 padded.
    """
    lib = _get()
    assert lib is not None
    if order not in ("score", "position"):
        raise ValueError(f"order must be 'score' or 'position', got {order!r}")
    t, h, d = q.shape
    s = k8.shape[0]
    if out is None:
        out = torch.empty(t, k, dtype=torch.int64)
    if q.dtype not in _DT or q.stride(-1) != 1:
        q = q.float().contiguous()
    w = w.float()
    if w.stride(-1) != 1:
        w = w.contiguous()
    if k8.stride(-1) != 1:
        k8 = k8.contiguous()
    ks = ks.float().contiguous()
    qp = q_pos.to(torch.int64).contiguous()
    scores = _scratch(t * s)
    lib.dsa_select_i8(_p(q), _DT[q.dtype], q.stride(0), q.stride(1), _p(w), w.stride(0), _p(k8), k8.stride(0), _p(ks),
                      s, _p(qp), lo, window or 0, t, h, d, k, 0 if order == "score" else 1, _p(scores), _p(out),
                      out.stride(0), torch.get_num_threads(), None, None, 0)
    return out


def select_i8_batch(q: Tensor, w: Tensor, k8: Tensor, ks: Tensor, q_pos: Tensor, k: int, spans: list,
                    *, window: int | None = None, order: str = "score") -> Tensor:
    """``select_i8`` over a batch and query chunks with pointer arithmetic instead of tensor slicing (a decode
    step's whole selection is then one ctypes call: per-op Python overhead measured ~0.1 ms per layer).

    Args:
        q: (B, T, H, D) float32 / bf16; w: (B, T, H) float32; k8: (B, S, D) int8; ks: (B, S) float32;
        q_pos: (B, T) int64; spans: [(t0, t1, lo, hi)] query chunks and the key span each scores.

    Returns:
        (B, T, k) int64, rows of chunks not in ``spans`` set to -1.
    """
    lib = _get()
    assert lib is not None
    if order not in ("score", "position"):
        raise ValueError(f"order must be 'score' or 'position', got {order!r}")
    b, t, h, d = q.shape
    if q.dtype not in _DT or q.stride(-1) != 1:
        q = q.float().contiguous()
    if w.dtype != torch.float32 or w.stride(-1) != 1:
        w = w.float().contiguous()
    if k8.stride(-1) != 1:
        k8 = k8.contiguous()
    if ks.dtype != torch.float32 or ks.stride(-1) != 1:
        ks = ks.float().contiguous()
    if q_pos.dtype != torch.int64 or q_pos.stride(-1) != 1:
        q_pos = q_pos.to(torch.int64).contiguous()
    out = torch.empty(b, t, k, dtype=torch.int64)
    covered = 0
    qe, dq = q.element_size(), _DT[q.dtype]
    qp, wp, kp, ksp, pp, op = q.data_ptr(), w.data_ptr(), k8.data_ptr(), ks.data_ptr(), q_pos.data_ptr(), out.data_ptr()
    qs0, qs1, qs2 = q.stride(0), q.stride(1), q.stride(2)
    ws0, ws1 = w.stride(0), w.stride(1)
    ks0, ks1 = k8.stride(0), k8.stride(1)
    ss0, ps0 = ks.stride(0), q_pos.stride(0)
    nt = torch.get_num_threads()
    for t0, t1, lo, hi in spans:
        tc, span = t1 - t0, hi - lo
        covered += tc
        scores = _scratch(tc * span)
        for bi in range(b):
            lib.dsa_select_i8(qp + (bi * qs0 + t0 * qs1) * qe, dq, qs1, qs2, wp + (bi * ws0 + t0 * ws1) * 4, ws1,
                              kp + bi * ks0 + lo * ks1, ks1, ksp + (bi * ss0 + lo) * 4, span, pp + (bi * ps0 + t0) * 8,
                              lo, window or 0, tc, h, d, k, 0 if order == "score" else 1, scores.data_ptr(),
                              op + (bi * t + t0) * k * 8, k, nt, None, None, 0)
    if covered < t:
        done = torch.zeros(t, dtype=torch.bool)
        for t0, t1, _, _ in spans:
            done[t0:t1] = True
        out[:, ~done] = -1
    return out


# decode_sparse runs its step as ONE C call and one parallel region (dsa_decode_step); False: the two calls
# dsa_select_i8 + dsa_attend (two regions), kept for benchmarks/decode_region.py. Same results either way.
ONE_REGION_DECODE = True


def decode_sparse(qi: Tensor, cos: Tensor, sin: Tensor, w: Tensor, k8: Tensor, ks: Tensor, pos: int, topk: int,
                  window: int | None, q: Tensor, k: Tensor, v: Tensor, scale: float, split: int) -> tuple[Tensor, Tensor]:
    """One decode query's whole DSA step in one C call (one parallel region) and no torch op on the way: the
    indexer queries' RoPE, their int8 quantisation, the scores of every visible key, the exact top-k (ascending
    positions), then attention over those rows read in place. The caller checks ``decode_sparse_supported``.
    Tensors keep their leading batch / query dims of 1 (read through their strides: no indexing op per call).

    Args:
        qi: (1, 1, H_I, D_I) float32 / bf16 indexer queries BEFORE RoPE; cos, sin: (1, 1, r) rotate-half tables
            at ``pos`` in qi's dtype (r = 0: no RoPE); w: (1, 1, H_I) float32 head weights.
        k8: (1, S, D_I) int8 keys; ks: (1, S) float32 scales; pos: the query's position (S = pos + 1).
        q: (1, 1, H, D) main query after RoPE; k, v: (1, S, H_kv, D) cache views; split: rows per work item.

    Returns:
        (out (1, 1, H, D_v) in q's dtype, idx (1, 1, topk) int64 ascending, -1 padded).
    """
    lib = _get()
    s_len, h, d = k8.shape[1], qi.shape[2], qi.shape[3]
    r = cos.shape[-1]
    idx = torch.empty(1, 1, topk, dtype=torch.int64)
    nt = torch.get_num_threads()
    hq, dv = q.shape[2], v.shape[3]
    out = torch.empty(1, 1, hq, dv, dtype=q.dtype)
    if ONE_REGION_DECODE:
        rc = lib.dsa_decode_step(qi.data_ptr(), _DT[qi.dtype], qi.stride(2), w.data_ptr(), k8.data_ptr(), k8.stride(1),
                                 ks.data_ptr(), s_len, pos, window or 0, h, d, topk, _scratch(s_len).data_ptr(),
                                 idx.data_ptr(), cos.data_ptr() if r else None, sin.data_ptr() if r else None, r,
                                 q.data_ptr(), _DT[q.dtype], q.stride(2), k.data_ptr(), k.stride(1), k.stride(2),
                                 v.data_ptr(), v.stride(1), v.stride(2), _DT[k.dtype], hq, k.shape[2], q.shape[3], dv,
                                 float(scale), out.data_ptr(), dv, split, nt)
        if rc != 0:
            raise ValueError("decode_sparse: shape beyond the kernel's limits (check decode_sparse_supported)")
        return out, idx
    qpos = ctypes.c_int64(pos)  # the query position, passed by address (no tensor built per call)
    lib.dsa_select_i8(qi.data_ptr(), _DT[qi.dtype], 0, qi.stride(2), w.data_ptr(), 0, k8.data_ptr(), k8.stride(1),
                      ks.data_ptr(), s_len, ctypes.addressof(qpos), 0, window or 0, 1, h, d, topk, 1,
                      _scratch(s_len).data_ptr(), idx.data_ptr(), topk, nt, cos.data_ptr() if r else None, sin.data_ptr() if r else None, r)
    rc = lib.dsa_attend(q.data_ptr(), 0, q.stride(2), k.data_ptr(), k.stride(1), k.stride(2), v.data_ptr(), v.stride(1),
                        v.stride(2), _DT[q.dtype], _DT[k.dtype], idx.data_ptr(), topk, topk, None, 1, hq, k.shape[2],
                        q.shape[3], dv, float(scale), out.data_ptr(), 0, dv, _DT[q.dtype], split, nt)
    if rc != 0:
        raise ValueError("decode_sparse: shape beyond the kernel's limits (check decode_sparse_supported)")
    return out, idx


def decode_sparse_supported(qi: Tensor, cos: Tensor, sin: Tensor, w: Tensor, k8: Tensor, ks: Tensor, q: Tensor,
                            k: Tensor, v: Tensor) -> bool:
    """Shapes, dtypes and layouts ``decode_sparse`` takes (else compose select_topk and sparse)."""
    return (qi.dtype in _DT and cos.dtype == qi.dtype and sin.dtype == qi.dtype
            and w.dtype == torch.float32 and k8.dtype == torch.int8 and ks.dtype == torch.float32
            and qi.shape[:2] == (1, 1) and q.shape[:2] == (1, 1) and k8.shape[0] == 1 and k.shape[0] == 1
            and qi.stride(-1) == 1 and w.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
            and ks.stride(-1) == 1 and k8.stride(-1) == 1 and qi.device.type == "cpu"
            and attend_supported(q, k, v) and q.stride(-1) == 1 and k.stride(-1) == 1
            and v.stride(-1) == 1)


def quantize_rows_into(x: Tensor, q: Tensor, scale: Tensor) -> bool:
    """``quantize_int8_rows(x)`` written straight into ``q`` (T, D) int8 and ``scale`` (T,) float32 (e.g. cache
    slices), bit-identical, in one C call instead of nine torch ops and two copies. Returns False (nothing written)
    when the kernels or the layouts do not apply; the caller then takes the torch path."""
    lib = _get()
    if (lib is None or x.dim() != 2 or x.dtype not in _DT or x.stride(-1) != 1 or q.dtype != torch.int8
            or q.stride(-1) != 1 or scale.dtype != torch.float32 or scale.stride(-1) != 1 or x.device.type != "cpu"
            or q.device.type != "cpu" or q.shape != x.shape or scale.shape != x.shape[:1]):
        return False
    lib.dsa_quantize_rows(x.data_ptr(), _DT[x.dtype], x.stride(0), x.shape[0], x.shape[1], q.data_ptr(), q.stride(0),
                          scale.data_ptr())
    return True


# ---------------------------------------------------------------------------------------------- top-k

_INVISIBLE = torch.iinfo(torch.int64).min


def topk_rows(scores: Tensor, vlo: Tensor, vhi: Tensor, k: int, *, base: int = 0, order: str = "score",
              out: Tensor | None = None) -> Tensor:
    """Exact top-k per row by (score, position), ties to the later key, over a visible range of each row.

    Args:
        scores: (T, S) float32, finite where visible; last dim contiguous.
        vlo, vhi: (T,) int64: row t considers columns [vlo[t], vhi[t]).
        k: entries per row.
        base: added to every column index (the absolute position of column 0).
        order: "score" = descending (score, position); "position" = ascending position.
        out: optional (T, k) int64 destination (last dim contiguous).

    Returns:
        (T, k) int64: chosen positions first, then -1.
    """
    if order not in ("score", "position"):
        raise ValueError(f"order must be 'score' or 'position', got {order!r}")
    t = scores.shape[0]
    if out is None:
        out = torch.empty(t, k, dtype=torch.int64)
    lib = _get()
    if lib is None or t == 0:
        out.copy_(topk_rows_torch(scores, vlo, vhi, k, base=base, order=order))
        return out
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    lo, hi = vlo.to(torch.int64).contiguous(), vhi.to(torch.int64).contiguous()
    lib.dsa_topk_rows(_p(scores), scores.stride(0), _p(lo), _p(hi), t, k, base, 0 if order == "score" else 1,
                      _p(out), out.stride(0), torch.get_num_threads())
    return out


def topk_rows_torch(scores: Tensor, vlo: Tensor, vhi: Tensor, k: int, *, base: int = 0, order: str = "score"
                    ) -> Tensor:
    """Torch twin of ``topk_rows``: int64 sort keys ``(ordered_bits(score) << 32) + position`` and ``torch.topk``."""
    t, s = scores.shape
    out = torch.full((t, k), -1, dtype=torch.int64)
    if t == 0 or s == 0:
        return out
    bits = (scores.float() + 0.0).view(torch.int32)  # +0.0: -0.0 ties with +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    pos = torch.arange(s, dtype=torch.int64)
    key = (bits.to(torch.int64) << 32) + pos
    visible = (pos >= vlo.view(t, 1)) & (pos < vhi.view(t, 1))
    key.masked_fill_(~visible, _INVISIBLE)
    kk = min(k, s)
    vals, idx = torch.topk(key, kk, dim=-1, sorted=True)
    idx = idx.add_(base).masked_fill_(vals == _INVISIBLE, -1)
    if order == "position":
        idx = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx).sort(-1).values
        idx = idx.masked_fill_(idx == torch.iinfo(torch.int64).max, -1)
    out[:, :kk] = idx
    return out


# ---------------------------------------------------------------------------------------------- attention

_DT = {torch.float32: 0, torch.bfloat16: 1}


def attend_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Shapes and dtypes ``attend`` handles (else use the torch path)."""
    if _get() is None or q.dtype not in _DT or k.dtype not in _DT or v.dtype != k.dtype:
        return False
    if q.device.type != "cpu" or k.device.type != "cpu":
        return False
    h, h_kv, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return h_kv > 0 and h % h_kv == 0 and h // h_kv <= 16 and d <= 256 and dv <= 1024 and k.shape[-1] == d


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, *, idx: Tensor | None = None,
           range_hi: Tensor | None = None, split: int = 0, out: Tensor | None = None, blocks_from: int = 16) -> Tensor:
    """Attention of T queries over rows of one sequence's cache, read in place (C kernel; check
    ``attend_supported`` first).

    Args:
        q: (T, H, D) float32 / bf16 (last dim contiguous).
        k: (S, H_kv, D), v: (S, H_kv, D_v): cache views (any position / head strides, last dim contiguous).
        scale: softmax scale.
        idx: (T, n) int64 rows per query, -1 = skip (sparse). Or None with ``range_hi``:
        range_hi: (T,) int64, query t attends rows [0, range_hi[t]) (dense).
        split: rows per work item (0 = whole list); a long list split over threads is merged by log-sum-exp.
        out: optional (T, H, D_v) destination in q's dtype.
        blocks_from: with ``idx`` and at least this many queries, blocks of 16 neighbouring queries scan the
            union of their rows once (``dsa_attend_blocks``) instead of one random read per (query, row).

    Returns:
        (T, H, D_v) in q's dtype; a query with no row gives 0.
    """
    lib = _get()
    assert lib is not None
    t, h, d = q.shape
    h_kv, dv = k.shape[1], v.shape[2]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"attend: {name} needs a contiguous last dim")
    if out is None:
        out = torch.empty(t, h, dv, dtype=q.dtype)
    if idx is not None:
        idx = idx.to(torch.int64)
        if idx.stride(-1) != 1:
            idx = idx.contiguous()
        n, idx_st, rh = idx.shape[1], idx.stride(0), None
        if t >= blocks_from:
            # prefill: blocks of neighbouring queries share one scan of the union of their rows
            rc = lib.dsa_attend_blocks(_p(q), q.stride(0), q.stride(1), _p(k), k.stride(0), k.stride(1), _p(v),
                                       v.stride(0), v.stride(1), _DT[q.dtype], _DT[k.dtype], _p(idx), idx_st, n,
                                       k.shape[0], t, h, h_kv, d, dv, float(scale), _p(out), out.stride(0),
                                       out.stride(1), _DT[out.dtype], torch.get_num_threads())
            if rc == 0:
                return out
    else:
        assert range_hi is not None
        rh = range_hi.to(torch.int64).contiguous()
        n, idx_st = 0, 0
    rc = lib.dsa_attend(_p(q), q.stride(0), q.stride(1), _p(k), k.stride(0), k.stride(1), _p(v), v.stride(0),
                        v.stride(1), _DT[q.dtype], _DT[k.dtype], _p(idx), idx_st, n, _p(rh), t, h, h_kv, d, dv,
                        float(scale), _p(out), out.stride(0), out.stride(1), _DT[out.dtype], split,
                        torch.get_num_threads())
    if rc != 0:
        raise ValueError("attend: shape beyond the kernel's limits (check attend_supported)")
    return out
