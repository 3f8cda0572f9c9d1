"""CPU decode kernels: the k active experts' matrix-vector products of one decode step in one parallel region.

Decode reads each active expert's weights once per token, so it is bound by memory bandwidth. ``torch.mv`` per
(token, slot) opens one small parallel region per product, and at 2 threads it reaches well under half of the
streaming-read rate. This kernel splits the rows of all slots' products across the threads at once (each thread
streams its own contiguous rows, 4 at a time against one fp32 copy of the input), accumulates in fp32 and rounds
once, like ``torch.mv``. Weights stay as they are (bf16 / fp16 / fp32, or moekit's int8 codes with per-row scales):
no packed copy, no extra memory.

The kernel is C++ built at first use with the system compiler (``c++``/``g++``, ``-O3 -march=native -fopenmp``,
about 2 s) into ``$MOEKIT_KERNEL_CACHE`` (default ``~/.cache/moekit/kernels``), keyed by the source, the flags and
the CPU; it links the OpenMP runtime torch has loaded, so torch's thread count applies. Without a compiler, or with
``MOEKIT_CPU_KERNELS=0``, ``available()`` is False and callers use torch's ops (same results within rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Scalar conversions (and the q8_0-style input quantization, and how far ahead the kernels prefetch) both kernel
# sources use (this one and ``cpu_kernels_int4``'s).
CONVERSIONS = r"""
#ifndef PF_BYTES
#define PF_BYTES 16384  /* how far ahead a kernel prefetches inside a matrix of short rows (see pf_blocks) */
#endif
#ifndef ROWS_TOGETHER
#define ROWS_TOGETHER 4  /* rows a kernel reads side by side: 4, or 1 (one after the other); moekit sets it per CPU */
#endif
/* Page order (rows read side by side, rows shorter than a 4 KiB page): a 4-row block takes the rows pg = 4096 / row
   bytes apart, so its four streams lie in four pages and the next block goes on in each page where the last stopped.
   Intel's L2 streamer follows one stream per page; consecutive rows of 1-2 KB read side by side put two or four
   streams in one page (int8 rows of 2 KB: 10.7 -> 12 GB/s at 1 thread, 22 -> 24.7 at 2). 1 where it does not apply
   (rows a page or longer, one row after the other, a row count that is not whole groups of 4 pg). Each row's sum is
   the same either way (the rows of a block are summed independently). */
static inline int64_t page_rows(int64_t row_stride_bytes, int64_t rows) {
  const int64_t rb = row_stride_bytes;  /* from one row's start to the next one's */
  if (ROWS_TOGETHER != 4 || rb < 64 || rb >= 4096 || 4096 % rb) return 1;
  const int64_t pg = 4096 / rb;
  return rows % (4 * pg) == 0 ? pg : 1;
}
/* The first row of block bi in page order (its rows: that one and the next three pg apart). */
static inline int64_t block_row(int64_t bi, int64_t pg) { return (bi - bi % pg) * 4 + bi % pg; }
static inline float bf16f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {  /* round to nearest even, NaN kept NaN (torch's rule) */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
/* half → float with integer ops that vectorize (the compiler's _Float16 conversion stays scalar here): the 15 low
   bits shifted into place and scaled by 2^112 give normals and subnormals exactly; inf/NaN get the top exponent. */
static inline float f16f(uint16_t h) {
  const uint32_t em = h & 0x7fffu, sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t u = em << 13; float f; memcpy(&f, &u, 4); f *= 0x1p112f;
  memcpy(&u, &f, 4); u |= sign | (em >= 0x7c00u ? 0x7f800000u : 0u); memcpy(&f, &u, 4);
  return f;
}
/* n fp32 values as int8 codes q = round(v · 127 / max|v|) (half to even), symmetric, like llama.cpp's q8_0
   activations; returns the block's scale d = max|v| / 127 (0 for an all-zero block: codes 0). */
static inline float quantize_q8(const float* v, int64_t n, int8_t* q) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {  /* the same codes, 16 at a time (cvtps2dq rounds half to even, as nearbyintf does) */
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(v + c)));
    const float amax = _mm512_reduce_max_ps(m), inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t c = 0; c < n; c += 16)
      _mm_storeu_si128((__m128i*)(q + c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + c),
                                                                                              _mm512_set1_ps(inv)))));
    return amax / 127.f;
  }
#endif
  float amax = 0.f;
  for (int64_t c = 0; c < n; c++) amax = fabsf(v[c]) > amax ? fabsf(v[c]) : amax;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t c = 0; c < n; c++) q[c] = (int8_t)nearbyintf(v[c] * inv);
  return amax / 127.f;
}
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <type_traits>
#include <math.h>
#include <omp.h>
#ifndef QB
#define QB 64
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

__CONVERSIONS__
#if defined(__AVX512F__)
#define LOAD16(body) static inline __m512 load16(const T* p) { body }
#else
#define LOAD16(body)
#endif
struct BF16 { typedef uint16_t T;
  LOAD16(return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));) static inline float get(T v) { return bf16f(v); } static inline T put(float f) { return f2bf(f); } };
struct F32 { typedef float T; LOAD16(return _mm512_loadu_ps(p);) static inline float get(T v) { return v; } static inline T put(float f) { return f; } };
#ifdef __FLT16_MAX__
struct F16 { typedef _Float16 T; LOAD16(return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));) static inline float get(T v) { uint16_t h; memcpy(&h, &v, 2); return f16f(h); }
             static inline T put(float f) { return (T)f; } };
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 2
#endif
struct I8 { typedef int8_t T; LOAD16(return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));) static inline float get(T v) { return (float)v; } };

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

/* One call's input rows, converted once: fp32 copies, and for int8 weights with VNNI (``qx``) int8 codes per QB-block
   of columns (symmetric, scale = max|x| / 127, like llama.cpp's q8_0 activations) with their scales. */
template <class W, class X> struct Input {
  const typename X::T* x; int64_t xs, cols; float* xf = nullptr; int8_t* xq = nullptr; float* xqs = nullptr;
  uint64_t* xneg = nullptr;
  bool vnni = false;
  int init(const typename X::T* x_, int64_t nx, int64_t xs_, int64_t cols_, int qx) {
    x = x_; xs = xs_; cols = cols_;
    xf = (float*)malloc((size_t)(nx * cols) * sizeof(float) + 64);
    if (!xf) return 1;
    for (int64_t s = 0; s < nx; s++)
      for (int64_t c = 0; c < cols; c++) xf[s * cols + c] = X::get(x[s * xs + c]);
    vnni = HAVE_VNNI && std::is_same<W, I8>::value && qx && cols % QB == 0;
    if (!vnni) return 0;
    xq = (int8_t*)malloc((size_t)(nx * cols) + 64); xqs = (float*)malloc((size_t)(nx * cols / QB) * sizeof(float) + 64);
    xneg = (uint64_t*)malloc((size_t)(nx * cols / 64) * sizeof(uint64_t) + 64);
    if (!xq || !xqs || !xneg) return 1;
    for (int64_t s = 0; s < nx; s++)
      for (int64_t bl = 0; bl < cols / QB; bl++)
        xqs[s * (cols / QB) + bl] = quantize_q8(xf + s * cols + bl * QB, QB, xq + s * cols + bl * QB);
#if HAVE_VNNI
    /* for the VNNI product: the codes' signs as bit masks (64 codes each), then the codes made |q| */
    for (int64_t i = 0; i < nx * cols / 64; i++) {
      const __m512i q = _mm512_loadu_si512(xq + i * 64);
      xneg[i] = _cvtmask64_u64(_mm512_movepi8_mask(q));
      _mm512_storeu_si512(xq + i * 64, _mm512_abs_epi8(q));
    }
#endif
    return 0;
  }
  ~Input() { free(xf); free(xq); free(xqs); free(xneg); }
};

/* Prefetch nr rows of cols weights at p: short rows and experts scattered in memory give the hardware prefetchers
   too short a stream to ramp up on. */
template <class W> static inline void prefetch_rows(const typename W::T* p, int64_t nr, int64_t rs, int64_t cols) {
  for (int64_t i = 0; i < nr; i++)
    for (int64_t off = 0; off < cols * (int64_t)sizeof(typename W::T); off += 64)
      __builtin_prefetch((const char*)(p + i * rs) + off);
}

/* How many 4-row blocks ahead a kernel prefetches inside one matrix: about PF_BYTES ahead for rows shorter than a
   page, none for longer rows (the hardware prefetchers follow those alone, and bf16 rows of 4 KB stream ~12% faster
   without; rows of 1-2 KB, as a down projection's, stream at half speed without), and none when a block's rows are
   read one after the other (ROWS_TOGETHER 1: one sequential stream, slower with any prefetch on Zen 4) or in page
   order (pg > 1, see page_rows: int8 rows of 2 KB stream ~10% slower with it). The first blocks of the next matrix
   are prefetched in any case: experts lie scattered in memory. */
template <class W> static inline int64_t pf_blocks(int64_t cols, int64_t pg = 1) {
  const int64_t rb = cols * (int64_t)sizeof(typename W::T);
  return rb >= 4096 || ROWS_TOGETHER == 1 || pg > 1 ? 0 : (PF_BYTES / (4 * rb) > 1 ? PF_BYTES / (4 * rb) : 1);
}

/* The dot products of NR rows (row stride rs) with one input row, read either side by side (NR = 4: one pass over
   the columns, four weight streams) or one row after the other (NR = 1: the block's rows are one sequential stream,
   four accumulators over the columns). ROWS_TOGETHER picks per CPU (moekit sets it at build time, see
   ``rows_together``): AMD Zen 4 streams one sequential stream ~1.3-2x faster than four interleaved ones, Intel's
   prefetchers follow four rows well. U = 4 / NR column blocks are summed side by side (bf16 dot products: 2 for one row).
   Summed in fp32; the order differs between the two (each is fixed, so a kernel's paths agree bit for bit). */
#if defined(__AVX512F__)
/* acc[r] = the sum of row r's U accumulators' lanes. */
template <int NR, int U>
static inline void sum_rows(const __m512 (&v)[NR][U], float* acc) {
  for (int r = 0; r < NR; r++) {
    __m512 t = v[r][0];
    for (int u = 1; u < U; u++) t = _mm512_add_ps(t, v[r][u]);
    acc[r] = _mm512_reduce_add_ps(t);
  }
}
#endif
#if HAVE_VNNI
/* Integer sums of the QB-block of columns at c for NR rows: |x| (xb) times the weights with x's signs (masks xn). */
template <int NR>
static inline void vnni_block(const int8_t* w0, int64_t rs, const int8_t* xb, const uint64_t* xn, int64_t c,
                              __m512i* i) {
  const __m512i zero = _mm512_setzero_si512();
  for (int r = 0; r < NR; r++) i[r] = zero;
  for (int64_t cc = c; cc < c + QB; cc += 64) {
    const __m512i xa = _mm512_loadu_si512(xb + cc);
    const __mmask64 neg = _cvtu64_mask64(xn[cc / 64]);
    for (int r = 0; r < NR; r++) {
      const __m512i wv = _mm512_loadu_si512(w0 + r * rs + cc);
      i[r] = _mm512_dpbusd_epi32(i[r], xa, _mm512_mask_sub_epi8(wv, neg, zero, wv));
    }
  }
}
/* int8 weights times q8_0-style int8 input (|x| unsigned at xb, x's signs as masks at xn moved onto the weights:
   exact integer products), each QB-block's integer sum scaled by its input scale in fp32. */
template <int NR>
static inline void vnni_rows(const int8_t* w0, int64_t rs, const int8_t* xb, const uint64_t* xn, const float* xd,
                             int64_t nbl, float* acc) {
  constexpr int U = 4 / NR;
  __m512 v[NR][U];
  __m512i i[NR];
  for (int r = 0; r < NR; r++) for (int u = 0; u < U; u++) v[r][u] = _mm512_setzero_ps();
  int64_t bl = 0;
  for (; bl + U <= nbl; bl += U)
    for (int u = 0; u < U; u++) {
      vnni_block<NR>(w0, rs, xb, xn, (bl + u) * QB, i);
      const __m512 d = _mm512_set1_ps(xd[bl + u]);
      for (int r = 0; r < NR; r++) v[r][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[r]), d, v[r][u]);
    }
  for (; bl < nbl; bl++) {  /* the blocks after the last group of U */
    vnni_block<NR>(w0, rs, xb, xn, bl * QB, i);
    const __m512 d = _mm512_set1_ps(xd[bl]);
    for (int r = 0; r < NR; r++) v[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[r]), d, v[r][0]);
  }
  sum_rows<NR, U>(v, acc);
}
#endif
#if defined(__AVX512BF16__) && !defined(NO_DPBF16)
/* bf16 weights and bf16 input: AVX512-BF16's dot product of 32 bf16 pairs per instruction, products exact in fp32 and
   summed in fp32 (inputs below 2^-126 count as 0): one instruction per 64 bytes of weights. Columns up to c32. */
template <int NR>
static inline void bf16dp_rows(const uint16_t* w0, int64_t rs, const uint16_t* xb, int64_t c32, float* acc) {
  constexpr int U = NR == 1 ? 2 : 1;  /* one row: two column blocks side by side (Zen 4: 1.2-1.8x four, docs/nn.md) */
  __m512 v[NR][U];
  for (int r = 0; r < NR; r++) for (int u = 0; u < U; u++) v[r][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 * U <= c32; c += 32 * U)
    for (int u = 0; u < U; u++) {
      const __m512bh xc = (__m512bh)_mm512_loadu_si512(xb + c + 32 * u);
      for (int r = 0; r < NR; r++)
        v[r][u] = _mm512_dpbf16_ps(v[r][u], (__m512bh)_mm512_loadu_si512(w0 + r * rs + c + 32 * u), xc);
    }
  for (; c < c32; c += 32) {
    const __m512bh xc = (__m512bh)_mm512_loadu_si512(xb + c);
    for (int r = 0; r < NR; r++) v[r][0] = _mm512_dpbf16_ps(v[r][0], (__m512bh)_mm512_loadu_si512(w0 + r * rs + c), xc);
  }
  sum_rows<NR, U>(v, acc);
}
#endif
#if defined(__AVX512F__)
/* Any weight type converted to fp32 16 at a time (explicit conversions: the compiler's vectorization of fp16 and int8
   is poor), times the fp32 input. Columns up to c16. */
template <int NR, class W>
static inline void fma_rows(const typename W::T* w0, int64_t rs, const float* xv, int64_t c16, float* acc) {
  constexpr int U = 4 / NR;
  __m512 v[NR][U];
  for (int r = 0; r < NR; r++) for (int u = 0; u < U; u++) v[r][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 * U <= c16; c += 16 * U)
    for (int u = 0; u < U; u++) {
      const __m512 xc = _mm512_loadu_ps(xv + c + 16 * u);
      for (int r = 0; r < NR; r++) v[r][u] = _mm512_fmadd_ps(W::load16(w0 + r * rs + c + 16 * u), xc, v[r][u]);
    }
  for (; c < c16; c += 16) {
    const __m512 xc = _mm512_loadu_ps(xv + c);
    for (int r = 0; r < NR; r++) v[r][0] = _mm512_fmadd_ps(W::load16(w0 + r * rs + c), xc, v[r][0]);
  }
  sum_rows<NR, U>(v, acc);
}
#endif

/* acc[i] = sum_c wr[i * rs + c] * x_s[c] for the nr <= 4 rows at wr, x_s = row s of the input, summed in fp32. */
template <class W, class X>
static inline void dot_rows(const typename W::T* wr, int64_t rs, int64_t nr, const Input<W, X>& in, int64_t s,
                            float* acc) {
  const int64_t cols = in.cols;
  const float* xv = in.xf + s * cols;
  acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
  const bool together = ROWS_TOGETHER == 4 && nr == 4;  /* else row by row */
#if HAVE_VNNI
  if (in.vnni) {
    const int8_t* xb = in.xq + s * cols; const float* xd = in.xqs + s * (cols / QB);
    const uint64_t* xn = in.xneg + s * (cols / 64);
    const int8_t* w0 = (const int8_t*)wr;
    if (together) vnni_rows<4>(w0, rs, xb, xn, xd, cols / QB, acc);
    else for (int64_t i = 0; i < nr; i++) vnni_rows<1>(w0 + i * rs, rs, xb, xn, xd, cols / QB, acc + i);
    return;
  }
#endif
#if defined(__AVX512BF16__) && !defined(NO_DPBF16)
  if (std::is_same<W, BF16>::value && std::is_same<X, BF16>::value) {
    const uint16_t* xb = (const uint16_t*)(in.x + s * in.xs);
    const uint16_t* w0 = (const uint16_t*)wr;
    const int64_t c32 = cols & ~(int64_t)31;
    if (together) bf16dp_rows<4>(w0, rs, xb, c32, acc);
    else for (int64_t i = 0; i < nr; i++) bf16dp_rows<1>(w0 + i * rs, rs, xb, c32, acc + i);
    for (int64_t c = c32; c < cols; c++)
      for (int64_t i = 0; i < nr; i++) acc[i] += W::get(wr[i * rs + c]) * xv[c];
    return;
  }
#endif
#if defined(__AVX512F__)
  {
    const int64_t c16 = cols & ~(int64_t)15;
    if (together) fma_rows<4, W>(wr, rs, xv, c16, acc);
    else for (int64_t i = 0; i < nr; i++) fma_rows<1, W>(wr + i * rs, rs, xv, c16, acc + i);
    for (int64_t c = c16; c < cols; c++)
      for (int64_t i = 0; i < nr; i++) acc[i] += W::get(wr[i * rs + c]) * xv[c];
    return;
  }
#endif
  if (nr == 4) {
    const typename W::T *w0 = wr, *w1 = wr + rs, *w2 = wr + 2 * rs, *w3 = wr + 3 * rs;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    #pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t c = 0; c < cols; c++) {
      const float xc = xv[c];
      a0 += W::get(w0[c]) * xc; a1 += W::get(w1[c]) * xc; a2 += W::get(w2[c]) * xc; a3 += W::get(w3[c]) * xc;
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    return;
  }
  for (int64_t i = 0; i < nr; i++) {
    const typename W::T* wi = wr + i * rs;
    float a = 0.f;
    #pragma omp simd reduction(+ : a)
    for (int64_t c = 0; c < cols; c++) a += W::get(wi[c]) * xv[c];
    acc[i] = a;
  }
}

/* out[s, r] = (scale[e, r] *) sum_c w[e, r, c] * x[s / xdiv, c] with e = ids[s]; 0 where e is not in [0, ne).
   w rows are contiguous (row stride rs, expert stride es); x rows contiguous with stride xs; out [n, rows].
   Threads split the 4-row blocks of all n products (static shares: each thread streams its rows in order). */
template <class W, class X>
static int gemv(const typename W::T* w, int64_t es, int64_t rs, const int64_t* ids, int64_t n, int64_t ne,
                const typename X::T* x, int64_t xs, int64_t xdiv, int64_t rows, int64_t cols,
                const typename X::T* scale, int64_t ss, typename X::T* out, int nthreads, int qx = 0) {
  Input<W, X> in;
  if (in.init(x, (n + xdiv - 1) / xdiv, xs, cols, qx)) return 1;  /* the caller falls back to torch's ops */
  const int64_t pg = page_rows(rs * (int64_t)sizeof(typename W::T), rows);  /* rows of a block: pg apart */
  const int64_t nb = (rows + 3) / 4, total = n * nb, pf = pf_blocks<W>(cols, pg), ahead = pf ? pf : PF_AHEAD;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < total; b++) {
    const int64_t s = b / nb, r0 = block_row(b % nb, pg), nr = rows - r0 < 4 ? rows - r0 : 4, e = ids[s];
    typename X::T* o = out + s * rows + r0;
    if (e < 0 || e >= ne) { for (int64_t i = 0; i < nr; i++) o[i * pg] = X::put(0.f); continue; }
    const int64_t nxt = b + ahead;  /* this thread's next blocks: in this matrix (short rows), or the next one's */
    if (nxt < total && (pf || nxt / nb != s)) {
      const int64_t ne2 = ids[nxt / nb], nr0 = block_row(nxt % nb, pg);
      if (ne2 >= 0 && ne2 < ne) prefetch_rows<W>(w + ne2 * es + nr0 * rs, rows - nr0 < 4 ? rows - nr0 : 4, rs * pg, cols);
    }
    float acc[4];
    dot_rows<W, X>(w + e * es + r0 * rs, rs * pg, nr, in, s / xdiv, acc);
    for (int64_t i = 0; i < nr; i++) o[i * pg] = X::put(scale ? acc[i] * X::get(scale[e * ss + r0 + i * pg]) : acc[i]);
  }
  return 0;
}

/* The down projection and the weighted sum of a decode step in one pass: out[t, r] = sum_j g[s] * (sc_s[r] *)
   sum_c W_s[r, c] * x[s, c] over the k slots s = t * k + j, where W_s is the matrix at address wp[s] (row stride rs;
   0: the slot adds nothing) and sc_s its int8 row scales at sp[s]. Addresses rather than (bank, id) let one call
   take experts from several banks (the offload engine's slots and its scratch). Summed in fp32, rounded once.
   Threads split chunks of RC rows; a chunk walks the k experts' rows (RC rows each, contiguous). One token (a decode
   step): each thread takes a contiguous range of rows and streams that range of every slot in turn, its sums in
   L1, so a slot's rows are one long stream per thread (same sums in the same order). */
#define RC 32
#define CT 4096  /* one token: rows summed per pass (fp32 sums on the stack) */
template <class W, class X>
static int gemv_combine(const int64_t* wp, int64_t rs, int64_t T, int64_t k, const typename X::T* x, int64_t xs,
                        int64_t rows, int64_t cols, const int64_t* sp, const float* g, typename X::T* out,
                        int nthreads, int qx = 0) {
  Input<W, X> in;
  if (in.init(x, T * k, xs, cols, qx)) return 1;
  if (T == 1) {  /* one token: each thread its contiguous rows of every slot in turn (long streams), sums in L1 */
    const int64_t pg = page_rows(rs * (int64_t)sizeof(typename W::T), rows), unit = 4 * pg;  /* (CT: whole units) */
    const int64_t nb = (rows + unit - 1) / unit, pf = pf_blocks<W>(cols, pg);
    #pragma omp parallel num_threads(nthreads)
    {
      const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t lo = nb * tid / nth * unit, hi0 = nb * (tid + 1) / nth * unit, hi = hi0 < rows ? hi0 : rows;
      for (int64_t t0 = lo; t0 < hi; t0 += CT) {
        const int64_t t1 = t0 + CT < hi ? t0 + CT : hi;
        float sum[CT];
        for (int64_t i = 0; i < t1 - t0; i++) sum[i] = 0.f;
        for (int64_t j = 0; j < k; j++) {
          if (!wp[j]) continue;
          const typename W::T* we = (const typename W::T*)(intptr_t)wp[j];
          const typename X::T* sc = sp ? (const typename X::T*)(intptr_t)sp[j] : nullptr;
          int64_t jn = j + 1; while (jn < k && !wp[jn]) jn++;
          const typename W::T* wn = jn < k ? (const typename W::T*)(intptr_t)wp[jn] : nullptr;
          const int64_t nbk = (t1 - t0 + 3) / 4;
          for (int64_t bk = 0; bk < nbk; bk++) {
            const int64_t r = t0 + block_row(bk, pg), nr = t1 - r < 4 ? t1 - r : 4, pb = bk + (pf ? pf : PF_AHEAD);
            const int64_t pr = t0 + block_row(pb < nbk ? pb : pb - nbk, pg);
            if (pb < nbk) { if (pf) prefetch_rows<W>(we + pr * rs, t1 - pr < 4 ? t1 - pr : 4, rs, cols); }
            else if (wn && pb - nbk < nbk)  /* the next slot's first rows */
              prefetch_rows<W>(wn + pr * rs, t1 - pr < 4 ? t1 - pr : 4, rs * pg, cols);
            float acc[4];
            dot_rows<W, X>(we + r * rs, rs * pg, nr, in, j, acc);
            for (int64_t i = 0; i < nr; i++)
              sum[r - t0 + i * pg] += g[j] * (sc ? acc[i] * X::get(sc[r + i * pg]) : acc[i]);
          }
        }
        for (int64_t i = 0; i < t1 - t0; i++) out[t0 + i] = X::put(sum[i]);
      }
    }
    return 0;
  }
  const int64_t nc = (rows + RC - 1) / RC, total = T * nc;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < total; b++) {
    const int64_t t = b / nc, r0 = (b % nc) * RC, nrc = rows - r0 < RC ? rows - r0 : RC;
    float sum[RC];
    for (int64_t i = 0; i < nrc; i++) sum[i] = 0.f;
    for (int64_t j = 0; j < k; j++) {
      const int64_t s = t * k + j;
      if (!wp[s]) continue;
      const typename W::T* we = (const typename W::T*)(intptr_t)wp[s];
      const typename X::T* sc = sp ? (const typename X::T*)(intptr_t)sp[s] : nullptr;
      for (int64_t r = r0; r < r0 + nrc; r += 4) {
        const int64_t nr = r0 + nrc - r < 4 ? r0 + nrc - r : 4;
        if (r + 4 * PF_AHEAD < r0 + nrc) prefetch_rows<W>(we + (r + 4 * PF_AHEAD) * rs, 1, rs, cols);
        float acc[4];
        dot_rows<W, X>(we + r * rs, rs, nr, in, s, acc);
        for (int64_t i = 0; i < nr; i++) sum[r - r0 + i] += g[s] * (sc ? acc[i] * X::get(sc[r + i]) : acc[i]);
      }
    }
    for (int64_t i = 0; i < nrc; i++) out[t * rows + r0 + i] = X::put(sum[i]);
  }
  return 0;
}

#define ARGS(WT, XT) const WT* w, int64_t es, int64_t rs, const int64_t* ids, int64_t n, int64_t ne, const XT* x, \
  int64_t xs, int64_t xdiv, int64_t rows, int64_t cols
#define PASS w, es, rs, ids, n, ne, x, xs, xdiv, rows, cols
extern "C" {
int moekit_gemv_bfloat16(ARGS(uint16_t, uint16_t), uint16_t* out, int nt) { return gemv<BF16, BF16>(PASS, nullptr, 0, out, nt); }
int moekit_gemv_float32(ARGS(float, float), float* out, int nt) { return gemv<F32, F32>(PASS, nullptr, 0, out, nt); }
int moekit_gemv_int8_bfloat16(ARGS(int8_t, uint16_t), const uint16_t* sc, int64_t ss, uint16_t* out, int nt, int qx) {
  return gemv<I8, BF16>(PASS, sc, ss, out, nt, qx); }
int moekit_gemv_int8_float32(ARGS(int8_t, float), const float* sc, int64_t ss, float* out, int nt, int qx) {
  return gemv<I8, F32>(PASS, sc, ss, out, nt, qx); }
#define CARGS(XT) const int64_t* wp, int64_t rs, int64_t T, int64_t k, const XT* x, int64_t xs, int64_t rows, \
  int64_t cols, const int64_t* sp, const float* g, XT* out, int nt
#define CPASS wp, rs, T, k, x, xs, rows, cols, sp, g, out, nt
int moekit_combine_bfloat16(CARGS(uint16_t)) { return gemv_combine<BF16, BF16>(CPASS); }
int moekit_combine_float32(CARGS(float)) { return gemv_combine<F32, F32>(CPASS); }
int moekit_combine_int8_bfloat16(CARGS(uint16_t), int qx) { return gemv_combine<I8, BF16>(CPASS, qx); }
int moekit_combine_int8_float32(CARGS(float), int qx) { return gemv_combine<I8, F32>(CPASS, qx); }
#ifdef __FLT16_MAX__
int moekit_gemv_float16(ARGS(_Float16, _Float16), _Float16* out, int nt) { return gemv<F16, F16>(PASS, nullptr, 0, out, nt); }
int moekit_gemv_int8_float16(ARGS(int8_t, _Float16), const _Float16* sc, int64_t ss, _Float16* out, int nt, int qx) {
  return gemv<I8, F16>(PASS, sc, ss, out, nt, qx); }
int moekit_combine_float16(CARGS(_Float16)) { return gemv_combine<F16, F16>(CPASS); }
int moekit_combine_int8_float16(CARGS(_Float16), int qx) { return gemv_combine<I8, F16>(CPASS, qx); }
#endif
int moekit_has_vnni(void) { return HAVE_VNNI; }
}
"""
SOURCE = SOURCE.replace("__CONVERSIONS__\n", CONVERSIONS)

_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_lock = threading.Lock()
_state: dict = {}


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (Linux), else the platform string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.platform() + platform.processor()


def rows_together() -> int:
    """Rows the kernels read side by side (``ROWS_TOGETHER``): ``$MOEKIT_ROWS_TOGETHER`` (1 or 4), else 1 on AMD CPUs
    (a block's rows read one after the other, one sequential stream: 1.3-2x the rate of four interleaved streams
    measured on Zen 4) and 4 elsewhere (Intel's prefetchers follow four rows side by side)."""
    forced = os.environ.get("MOEKIT_ROWS_TOGETHER", "").strip()
    if forced in ("1", "4"):
        return int(forced)
    try:
        return 1 if "AuthenticAMD" in Path("/proc/cpuinfo").read_text() else 4
    except OSError:
        return 4


def cache_dir() -> Path:
    """Where built kernels are kept (``$MOEKIT_KERNEL_CACHE``, default ``~/.cache/moekit/kernels``)."""
    return Path(os.environ.get("MOEKIT_KERNEL_CACHE") or Path.home() / ".cache" / "moekit" / "kernels")


def _build(compiler: str, source: str = SOURCE, stem: str = "moekit_gemv") -> Path | None:
    """Compile ``source`` to a shared library ``<stem>_<key>.so`` in the cache (once per source, flags and CPU);
    None when it fails."""
    folder = cache_dir()
    source = f"#define ROWS_TOGETHER {rows_together()}\n" + source
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("moekit CPU kernels: cannot create %s (%s); using torch's ops", folder, exc)
        return None
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([source, compiler, *flags, _cpu_id()]).encode()).hexdigest()[:16]
        lib = folder / f"{stem}_{key}.so"
        if lib.is_file():
            return lib
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "gemv.cpp", Path(tmp) / "gemv.so"
            src.write_text(source)
            cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c++17", "-o", str(out), str(src)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.info("moekit CPU kernels: %s failed (%s)", compiler, exc)
                continue
            if proc.returncode == 0 and out.is_file():
                os.replace(out, lib)  # atomic: a concurrent build of the same key writes the same bytes
                return lib
            log.info("moekit CPU kernels: build with %s failed: %s", flags, proc.stderr.strip()[-300:])
    return None


def load_library(source: str = SOURCE, stem: str = "moekit_gemv") -> ctypes.CDLL | None:
    """A kernel library (``source``, named ``stem`` in the cache), built and loaded once per process; None when
    disabled (``MOEKIT_CPU_KERNELS=0``) or no compiler works. Other kernel modules (``cpu_kernels_int4``) build
    their own source through this."""
    if stem in _state:  # built or refused already: no lock on the per-call path
        return _state[stem]
    with _lock:
        if stem in _state:
            return _state[stem]
        lib = None
        if os.environ.get("MOEKIT_CPU_KERNELS", "1") not in ("0", "false", "no"):
            compiler = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
            path = _build(compiler, source, stem) if compiler else None
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as exc:
                    log.info("moekit CPU kernels: cannot load %s (%s)", path, exc)
        _state[stem] = lib
        return lib


_ENTRIES: dict = {}  # (library, name) → entry point: the per-call lookup is one dict access


def library_entry(source: str, stem: str, name: str) -> Callable[..., int] | None:
    """Entry point ``name`` (int result) of the kernel library built from ``source`` as ``stem`` (``load_library``),
    looked up once; None when the library or that entry is missing. Kernel modules with their own source
    (``cpu_kernels_int4``, ``cpu_kernels_amx``) reach their entries through this."""
    lib = load_library(source, stem)
    key = (id(lib), name)
    if key not in _ENTRIES:
        fn = getattr(lib, name, None) if lib is not None else None
        if fn is not None:
            fn.restype = ctypes.c_int
        _ENTRIES[key] = fn
    return _ENTRIES[key]


def _load() -> ctypes.CDLL | None:
    """The decode kernel library (SOURCE), built and loaded once per process; None when disabled or no compiler."""
    return load_library()


def available() -> bool:
    """Whether the compiled decode kernel is in use on this machine (builds it on the first call)."""
    return _load() is not None


def _fn(name: str) -> Callable[..., int] | None:
    """The kernel entry point ``name`` (0 on success), or None when the library or that dtype's variant is missing."""
    lib = _load()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is not None:
        fn.restype = ctypes.c_int
    return fn


def int8_activations() -> str:
    """How int8 weights meet their input: ``"int8"`` (default where the CPU has AVX512-VNNI: the input is quantized
    per block of 64 values, symmetric, and each block's products are summed exactly in int32, like llama.cpp's
    q8_0) or ``"float"`` (``MOEKIT_INT8_ACTIVATIONS=float``: weights converted to fp32, the input kept as it is)."""
    mode = os.environ.get("MOEKIT_INT8_ACTIVATIONS", "int8").strip().lower()
    return "float" if mode in ("float", "fp32", "0", "no") else "int8"


def has_vnni() -> bool:
    """Whether the built kernel has the AVX512-VNNI int8 dot product (int8 activations for int8 weights)."""
    fn = _fn("moekit_has_vnni")
    return bool(fn is not None and fn())


def _entry(prefix: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> Callable[..., int] | None:
    """The kernel entry ``prefix`` for these tensors' dtypes (``moekit_gemv_bfloat16``, ``moekit_combine_int8_float16``
    ...), or None when the kernel cannot run them: not CPU, rows not contiguous, dtypes that do not match."""
    if x.device.type != "cpu" or w.device.type != "cpu" or w.dim() != 3 or w.stride(-1) != 1:
        return None
    dtype_name = _DTYPES.get(x.dtype)
    if dtype_name is None or (scale is None and w.dtype != x.dtype):
        return None
    if scale is not None and (w.dtype != torch.int8 or scale.dtype != x.dtype or scale.stride(-1) != 1):
        return None
    return _fn(f"{prefix}_int8_{dtype_name}" if scale is not None else f"{prefix}_{dtype_name}")


def _rows(x: torch.Tensor, count: int, cols: int) -> torch.Tensor | None:
    """``x`` as ``count`` rows of ``cols`` contiguous values (a view when it can be), or None."""
    xs = x.reshape(-1, cols) if x.stride(-1) == 1 else x.contiguous().reshape(-1, cols)
    return None if xs.shape[0] != count or (count > 1 and xs.stride(0) < cols) else xs


def _tail_args(scale: torch.Tensor | None) -> list:
    """The int8 scale arguments (pointer, row stride) that follow the common ones."""
    return [] if scale is None else [ctypes.c_void_p(scale.data_ptr()), ctypes.c_int64(scale.stride(0))]


def expert_gemv(
    x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor | None = None,
    activations: str | None = None,
) -> torch.Tensor | None:
    """``out[t, j] = x[t] (or x[t, j]) @ w[ids[t, j]].T`` (× ``scale[ids[t, j]]`` per row for int8 ``w``) as one
    kernel call, or None when the kernel cannot run these tensors (then use torch's ops).

    ``w [E, out, in]`` with contiguous rows (nn.Linear's layout; int8 codes with ``scale [E, out]``), ``x [T, in]``
    or ``[T, k, in]`` in the compute dtype, ``ids [T, k]``; slots with ids outside [0, E) are zero. For int8 ``w``,
    ``activations`` (default ``int8_activations()``) says whether ``x`` is quantized per 64-block for VNNI.
    """
    fn = _entry("moekit_gemv", x, w, scale)
    if fn is None:
        return None
    num_tokens, top_k = ids.shape
    rows, cols = w.shape[1], w.shape[2]
    per_slot = x.dim() == 3
    xs = _rows(x, num_tokens * (top_k if per_slot else 1), cols)
    if xs is None:
        return None
    ids64 = ids.to(torch.int64).contiguous()
    out = x.new_empty(num_tokens, top_k, rows)
    ptr = ctypes.c_void_p
    args = [
        ptr(w.data_ptr()), ctypes.c_int64(w.stride(0)), ctypes.c_int64(w.stride(1)), ptr(ids64.data_ptr()),
        ctypes.c_int64(ids64.numel()), ctypes.c_int64(w.shape[0]), ptr(xs.data_ptr()), ctypes.c_int64(xs.stride(0)),
        ctypes.c_int64(1 if per_slot else top_k), ctypes.c_int64(rows), ctypes.c_int64(cols),
        *_tail_args(scale), ptr(out.data_ptr()), ctypes.c_int(torch.get_num_threads()),
    ]
    if scale is not None:
        args.append(ctypes.c_int(int((activations or int8_activations()) == "int8")))
    return out if fn(*args) == 0 else None


def expert_gemv_combine(
    h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None = None,
    activations: str | None = None,
) -> torch.Tensor | None:
    """``out[t] = Σ_j weights[t, j] · h[t, j] @ w[ids[t, j]].T`` (× row scales for int8 ``w``): a decode step's
    down projection and weighted sum over its k slots in one kernel call, summed in fp32 and rounded once; slots
    with ids outside [0, E) add nothing. None when the kernel cannot run these tensors.

    ``h [T, k, in]`` in the compute dtype, ``w [E, out, in]`` (contiguous rows), ``ids``/``weights [T, k]``;
    the result is ``[T, out]`` in ``h``'s dtype.
    """
    return combine_banks(h, [(ids, w, scale)], weights, activations)


def _addresses(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Byte address of ``t[ids[s]]`` for every slot, 0 where the id is outside [0, len(t))."""
    valid = (ids >= 0) & (ids < t.shape[0])
    step = t.stride(0) * t.element_size()
    return torch.where(valid, t.data_ptr() + ids.to(torch.int64).clamp(0, t.shape[0] - 1) * step, 0)


def combine_banks(
    h: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    weights: torch.Tensor,
    activations: str | None = None,
) -> torch.Tensor | None:
    """``expert_gemv_combine`` with each slot's expert taken from one of several banks: ``parts`` lists
    ``(ids [T, k], w [E_p, out, in], scale or None)``, a slot using the bank whose ids hold it in range (the offload
    engine's slots and its scratch buffer). One kernel call, so the result equals one bank's call bit for bit."""
    if not parts or h.dim() != 3:
        return None
    ids0, w0, s0 = parts[0]
    fn = _entry("moekit_combine", h, w0, s0)
    rows, cols = w0.shape[1], w0.shape[2]
    if fn is None or any(
        _entry("moekit_combine", h, w, s) is None or w.shape[1:] != (rows, cols) or w.stride(1) != w0.stride(1)
        or w.dtype != w0.dtype or (s is None) != (s0 is None) for _, w, s in parts[1:]
    ):
        return None
    num_tokens, top_k = ids0.shape
    xs = _rows(h, num_tokens * top_k, cols)
    if xs is None:
        return None
    wp = _addresses(w0, ids0)  # one bank (a decode step in memory): its addresses as they are
    sp = _addresses(s0, ids0) if s0 is not None else None
    for ids, w, s in parts[1:]:
        a = _addresses(w, ids)
        wp = torch.where(a != 0, a, wp)
        if sp is not None and s is not None:
            sp = torch.where(a != 0, _addresses(s, ids), sp)
    g = weights.to(torch.float32).contiguous()
    out = h.new_empty(num_tokens, rows)
    ptr = ctypes.c_void_p
    args = [
        ptr(wp.data_ptr()), ctypes.c_int64(w0.stride(1)), ctypes.c_int64(num_tokens), ctypes.c_int64(top_k),
        ptr(xs.data_ptr()), ctypes.c_int64(xs.stride(0)), ctypes.c_int64(rows), ctypes.c_int64(cols),
        ptr(sp.data_ptr() if sp is not None else None), ptr(g.data_ptr()), ptr(out.data_ptr()),
        ctypes.c_int(torch.get_num_threads()),
    ]
    if s0 is not None:
        args.append(ctypes.c_int(int((activations or int8_activations()) == "int8")))
    return out if fn(*args) == 0 else None


_ONE_SLOT = torch.zeros(1, 1, dtype=torch.int64)
_LINEAR_FNS: dict = {}
_GEMV_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                  ctypes.c_int]


def _linear_step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``x @ w.T`` for one row as one kernel call with plain-int arguments and one allocation (a decode step makes
    ~25 of these: ``expert_gemv``'s general checks and views cost ~7 small ops per call); None when the kernel
    cannot run it (then ``expert_gemv`` or F.linear)."""
    fn = _LINEAR_FNS.get(x.dtype, False)
    if fn is False:
        lib, name = _load(), _DTYPES.get(x.dtype)
        fn = None
        if lib is not None and name is not None and hasattr(lib, f"moekit_gemv_{name}"):
            fn = lib[f"moekit_gemv_{name}"]  # a fresh function object: argtypes for plain ints, this use only
            fn.restype, fn.argtypes = ctypes.c_int, _GEMV_ARGTYPES
        _LINEAR_FNS[x.dtype] = fn
    rows, cols = w.shape
    if fn is None or not x.is_contiguous() or w.stride(1) != 1 or w.device.type != "cpu":
        return expert_gemv(x.reshape(1, -1), w.unsqueeze(0), _ONE_SLOT)
    out = x.new_empty(*x.shape[:-1], rows)
    if fn(w.data_ptr(), rows * w.stride(0), w.stride(0), _ONE_SLOT.data_ptr(), 1, 1, x.data_ptr(), cols, 1, rows,
          cols, out.data_ptr(), torch.get_num_threads()):
        return None
    return out


def _gemv_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward, with a one-row CPU input (a decode step) run by the kernel; F.linear otherwise."""
    w = self.weight
    one_row = x.dim() >= 1 and x.numel() == x.shape[-1]
    if (
        one_row
        and x.device.type == "cpu"
        and x.dtype == w.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        if torch.compiler.is_compiling():  # the custom op (moekit.nn.dispatch) keeps the kernel in the graph
            y = torch.ops.moekit.expert_gemv(x.reshape(1, -1), w.unsqueeze(0), _ONE_SLOT, True)
        else:
            y = _linear_step(x, w)
        if y is not None:
            y = y if y.dim() == x.dim() else y.reshape(*x.shape[:-1], w.shape[0])
            return y if self.bias is None else y + self.bias
    elif x.dtype == torch.float16 and w.dtype == torch.float16 and not torch.is_grad_enabled() and (
        not torch.compiler.is_compiling()
    ):
        y = _f16_prefill(x, w)
        if y is not None:
            return y if self.bias is None else y + self.bias
    return torch.nn.functional.linear(x, w, self.bias)


def _f16_prefill(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """A float16 prefill's ``x @ w.T`` (at least ``AMX_MIN_ROWS`` rows) on AMX-BF16 (``cpu_kernels_amx``: the
    exact hi/lo bf16 split, fp32 sums), where torch's fp16 GEMM runs at fp32-FMA speed; None elsewhere."""
    from moekit.nn import cpu_kernels_amx  # (it builds its library through this module)

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < cpu_kernels_amx.AMX_MIN_ROWS or x.device.type != "cpu":
        return None
    y = cpu_kernels_amx.f16_grouped_mm(x.reshape(rows, x.shape[-1]), w.unsqueeze(0),
                                       torch.tensor([rows], dtype=torch.int32))
    return None if y is None else y.reshape(*x.shape[:-1], w.shape[0])


def use_for_linears(model: torch.nn.Module, enable: bool = True) -> int:
    """Run every ``nn.Linear`` of ``model`` (attention, ``lm_head``, dense MLPs) through the decode kernel when its
    input is one row on CPU; returns how many modules changed. ``enable=False`` restores ``F.linear``.

    Decode reads the non-expert weights once per token too (attention and ``lm_head`` are a third of the bytes of
    OLMoE-1B-7B), and ``F.linear`` with one row streams them at ~65% of the read bandwidth against ~85% here.
    A float16 prefill (inference, at least ``cpu_kernels_amx.AMX_MIN_ROWS`` rows) runs on AMX-BF16 where the CPU has
    it (``cpu_kernels_amx``, torch's fp16 numerics); other prefills and training keep ``F.linear``; under ``torch.compile`` a one-row step calls
    the kernel through the ``moekit::expert_gemv`` custom op, so compiled decode keeps it too.
    """
    import types

    changed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:  # subclasses (LoRA, quantized linears) keep their own forward
            continue
        if enable and "forward" not in module.__dict__:
            module.forward = types.MethodType(_gemv_linear_forward, module)
            changed += 1
        elif not enable and "forward" in module.__dict__:
            del module.forward
            changed += 1
    return changed
