"""CPU decode kernel for int4 experts: the k active experts' matrix-vector products of one decode step on packed
4-bit codes, in one parallel region.

The weights are moekit's int4 codec (``moekit.formats.quantized``): two codes per byte (low nibble = even column),
per group of ``gs`` columns one float16 scale ``s`` and one uint8 zero point ``z``, weight = (q − z)·s. A decode
step is bound by the bytes it reads, and int4 reads 0.5 + 3/gs bytes per weight against bf16's 2.

Per row and group the kernel forms d = Σ q·x over the group's columns, adds s·d to the row's fp32 accumulator, and
subtracts Σ_g s·z·Σx_g once per row (the per-group input sums are computed once per call). Rows are split across
torch's OpenMP threads four at a time with a prefetch two blocks ahead, like ``cpu_kernels``' ``gemv``.

With int8 activations (``int4_activations()``, the default) on a CPU with AVX512-VNNI and groups of 64k, the input
is quantized per block of 64 values like the int8 kernel's (llama.cpp's Q4 × Q8 scheme): AND / shift unpack 128
codes from a 64-byte load and ``vpdpbusd`` sums their products with the int8 input exactly in int32, so the result
is the dequantized weights times the block-quantized input up to fp32 rounding. Otherwise (float activations) the
codes meet the input as it is and results differ from dequantize-then-matmul in fp32 only by the accumulation
order, in three loops (``kernel_path``): bf16 inputs on a CPU with AVX512-BF16 and groups of 64k: each code becomes the bf16 number
128 + q (OR into 0x4300; 128 comes off with the zero point) and ``vdpbf16ps`` multiplies it with the bf16 input;
other inputs with AVX-512 and groups of 32k: 16 bytes → 16 lanes (``vpmovzxbd``), and/shift, ``vcvtdq2ps``, FMA;
otherwise a scalar loop. The vector loops read an input copy permuted once per call into the order the codes
unpack in.

Its own source and library (``moekit_gemv_int4_*.so``), built and cached by ``cpu_kernels.load_library``.
"""

from __future__ import annotations

import ctypes
import os

import torch

from moekit.nn import cpu_kernels

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

__CONVERSIONS__
struct BF16 { typedef uint16_t T; static const bool bf16 = true; static inline float get(T v) { return bf16f(v); } static inline T put(float f) { return f2bf(f); } };
struct F32 { typedef float T; static const bool bf16 = false; static inline float get(T v) { return v; } static inline T put(float f) { return f; } };
#ifdef __FLT16_MAX__
struct F16 { typedef _Float16 T; static const bool bf16 = false; static inline float get(T v) { uint16_t h; memcpy(&h, &v, 2); return f16f(h); }
             static inline T put(float f) { return (T)f; } };
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 2
#endif

#if defined(__F16C__)
static inline float scale_f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float scale_f(uint16_t h) { return f16f(h); }
#endif

/* Rows r0..r0+NR-1 of one expert: acc[i] = Σ_g s[i,g] · Σ_{c in g} q[i,c] · x[c]  (the zero points are applied by
   the caller). fp32 path: xv is the input permuted per 32 columns (16 even columns, then the 16 odd ones); the
   codes of low and high nibbles accumulate separately (two independent FMA chains per row). */
#if defined(__AVX512F__)
template <int NR>
static inline void rows_avx512(const uint8_t* wr, int64_t rs, const float* sf, int64_t groups, int64_t gs,
                               const float* xv, float* acc) {
  const __m512i lo4 = _mm512_set1_epi32(0xf);
  __m512 a[NR];
  for (int i = 0; i < NR; i++) a[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m512 d[NR], h[NR];
    for (int i = 0; i < NR; i++) { d[i] = _mm512_setzero_ps(); h[i] = _mm512_setzero_ps(); }
    for (int64_t c = g * gs, end = c + gs; c < end; c += 32) {
      const __m512 xe = _mm512_loadu_ps(xv + c), xo = _mm512_loadu_ps(xv + c + 16);
      for (int i = 0; i < NR; i++) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wr + i * rs + c / 2)));
        d[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, lo4)), xe, d[i]);
        h[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), xo, h[i]);
      }
    }
    for (int i = 0; i < NR; i++)
      a[i] = _mm512_fmadd_ps(_mm512_add_ps(d[i], h[i]), _mm512_set1_ps(sf[i * groups + g]), a[i]);
  }
  for (int i = 0; i < NR; i++) acc[i] = _mm512_reduce_add_ps(a[i]);
}
#endif

/* bf16 inputs with AVX512-BF16: a code q becomes the bf16 number 128 + q by OR-ing its bits into 0x4300 (exact: bf16
   holds 128..143), and vdpbf16ps multiplies with the bf16 input (products exact in fp32, fp32 sums); the caller
   subtracts 128 with the zero point (z + 128). No shuffles: the unpack is shifts and ternary logic only.
   BLK = 128 (groups of 128k): a 64-byte load is 32 words of 4 codes; the input is permuted per 128 columns into
   4 runs of 32 (columns 4j, 4j+1, 4j+2, 4j+3). BLK = 64: 32 bytes zero-extended to 32 words of 2 codes; runs of
   the 32 even and the 32 odd columns. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16DP 1
template <int NR, int BLK>
static inline void rows_bf16dp(const uint8_t* wr, int64_t rs, const float* sf, int64_t groups, int64_t gs,
                               const uint16_t* xb, float* acc) {
  const __m512i m4 = _mm512_set1_epi16(0xf), base = _mm512_set1_epi16(0x4300);
  __m512 a[NR];
  for (int i = 0; i < NR; i++) a[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m512 d[NR], h[NR];
    for (int i = 0; i < NR; i++) { d[i] = _mm512_setzero_ps(); h[i] = _mm512_setzero_ps(); }
    for (int64_t c = g * gs, end = c + gs; c < end; c += BLK) {
      if (BLK == 128) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void*)(xb + c));
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512((const void*)(xb + c + 32));
        const __m512bh x2 = (__m512bh)_mm512_loadu_si512((const void*)(xb + c + 64));
        const __m512bh x3 = (__m512bh)_mm512_loadu_si512((const void*)(xb + c + 96));
        for (int i = 0; i < NR; i++) {
          const __m512i w = _mm512_loadu_si512((const void*)(wr + i * rs + c / 2));
          /* 0xEA: (A & B) | C */
          const __m512i n0 = _mm512_ternarylogic_epi32(w, m4, base, 0xEA);
          const __m512i n1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), m4, base, 0xEA);
          const __m512i n2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), m4, base, 0xEA);
          const __m512i n3 = _mm512_or_si512(_mm512_srli_epi16(w, 12), base);
          d[i] = _mm512_dpbf16_ps(d[i], (__m512bh)n0, x0);
          h[i] = _mm512_dpbf16_ps(h[i], (__m512bh)n1, x1);
          d[i] = _mm512_dpbf16_ps(d[i], (__m512bh)n2, x2);
          h[i] = _mm512_dpbf16_ps(h[i], (__m512bh)n3, x3);
        }
      } else {
        const __m512bh xe = (__m512bh)_mm512_loadu_si512((const void*)(xb + c));
        const __m512bh xo = (__m512bh)_mm512_loadu_si512((const void*)(xb + c + 32));
        for (int i = 0; i < NR; i++) {
          const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wr + i * rs + c / 2)));
          const __m512i lo = _mm512_ternarylogic_epi32(w, m4, base, 0xEA);
          const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), base);
          d[i] = _mm512_dpbf16_ps(d[i], (__m512bh)lo, xe);
          h[i] = _mm512_dpbf16_ps(h[i], (__m512bh)hi, xo);
        }
      }
    }
    for (int i = 0; i < NR; i++)
      a[i] = _mm512_fmadd_ps(_mm512_add_ps(d[i], h[i]), _mm512_set1_ps(sf[i * groups + g]), a[i]);
  }
  for (int i = 0; i < NR; i++) acc[i] = _mm512_reduce_add_ps(a[i]);
}
#endif

/* int8 activations with AVX512-VNNI: the input is quantized per block of 64 columns (q8_0-style, ``quantize_q8``)
   and the codes meet it as bytes: a 64-byte load is 128 codes, AND / shift split it into the low nibbles (even
   columns) and the high ones (odd columns), and ``vpdpbusd`` (unsigned codes × signed input, 4 products summed
   into each int32 lane, 64 products per instruction) sums each block's products exactly. xp: the quantized input
   permuted per chunk of 128 columns (its 64 even columns, then its 64 odd ones; a 64-column tail: 32 + 32), so
   int32 lanes 0-7 hold the chunk's first 64 columns and lanes 8-15 its second 64. dv: per chunk 16 lanes of the
   blocks' scales (0 past the end). G128 (groups of 128k): one weight scale per chunk, applied per group; otherwise
   (groups of 64·odd) the two halves' scales per chunk. */
#if HAVE_VNNI
template <int NR, bool G128>
static inline void rows_vnni(const uint8_t* wr, int64_t rs, const float* sf, int64_t groups, int64_t gs, int64_t cols,
                             const int8_t* xp, const float* dv, float* acc) {
  const __m512i m4 = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
  __m512 a[NR];
  for (int i = 0; i < NR; i++) a[i] = _mm512_setzero_ps();
  if (G128) {
    for (int64_t g = 0; g < groups; g++) {
      __m512 t[NR];
      for (int i = 0; i < NR; i++) t[i] = _mm512_setzero_ps();
      for (int64_t c = g * gs, end = c + gs; c < end; c += 128) {
        const __m512i xl = _mm512_loadu_si512((const void*)(xp + c)), xh = _mm512_loadu_si512((const void*)(xp + c + 64));
        const __m512 d = _mm512_loadu_ps(dv + c / 8);
        for (int i = 0; i < NR; i++) {
          const __m512i w = _mm512_loadu_si512((const void*)(wr + i * rs + c / 2));
          __m512i p = _mm512_dpbusd_epi32(zero, _mm512_and_si512(w, m4), xl);
          p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), xh);
          t[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, t[i]);
        }
      }
      for (int i = 0; i < NR; i++) a[i] = _mm512_fmadd_ps(t[i], _mm512_set1_ps(sf[i * groups + g]), a[i]);
    }
  } else {
    for (int64_t c = 0; c < cols; c += 128) {
      const int64_t n = cols - c < 128 ? cols - c : 128;
      const __mmask64 mk = n == 128 ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
      const __m512i xl = _mm512_maskz_loadu_epi8(mk, xp + c), xh = _mm512_maskz_loadu_epi8(mk, xp + c + n / 2);
      const __m512 d = _mm512_loadu_ps(dv + c / 8);
      const int64_t g0 = c / gs, g1 = n == 128 ? (c + 64) / gs : g0;
      for (int i = 0; i < NR; i++) {
        const __m512i w = _mm512_maskz_loadu_epi8(mk, wr + i * rs + c / 2);
        __m512i p = _mm512_dpbusd_epi32(zero, _mm512_and_si512(w, m4), xl);
        p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), xh);
        const __m512 sv = _mm512_mask_blend_ps((__mmask16)0xff00, _mm512_set1_ps(sf[i * groups + g0]),
                                               _mm512_set1_ps(sf[i * groups + g1]));
        a[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), d), sv, a[i]);
      }
    }
  }
  for (int i = 0; i < NR; i++) acc[i] = _mm512_reduce_add_ps(a[i]);
}
#endif

static inline float row_scalar(const uint8_t* wr, const float* sf, int64_t groups, int64_t gs, const float* xv) {
  float acc = 0.f;
  for (int64_t g = 0; g < groups; g++) {
    float d = 0.f;
    for (int64_t c = g * gs, end = c + gs; c < end; c += 2) {
      const uint8_t b = wr[c / 2];
      d += (float)(b & 0xf) * xv[c] + (float)(b >> 4) * xv[c + 1];
    }
    acc += sf[g] * d;
  }
  return acc;
}

/* The loop a call runs: 0 scalar; 1 AVX-512 fp32 (groups of 32k); 2 / 3 AVX512-BF16 dot products (bf16 input,
   groups of 64k / 128k); 4 int8 activations with AVX512-VNNI (qx set, groups of 64k, any input dtype). */
static int int4_mode(int64_t gs, bool bf16_input, int qx) {
  int mode = 0;
#if defined(__AVX512F__)
  if (gs % 32 == 0) mode = 1;
#endif
#if defined(HAVE_BF16DP)
  if (bf16_input && gs % 64 == 0) mode = gs % 128 == 0 ? 3 : 2;
#endif
  if (HAVE_VNNI && qx && gs % 64 == 0) mode = 4;
  (void)gs; (void)bf16_input; (void)qx;
  return mode;
}

/* acc[i] for the nr <= 4 rows at wr (row stride rs, fp32 scales sf per row) by the loop of ``mode`` (int4_mode):
   xpv / dvv the quantized input (mode 4), xbv the bf16 input (modes 2, 3), xv the fp32 one (modes 0, 1). */
static inline void int4_rows(int mode, int64_t nr, const uint8_t* wr, int64_t rs, const float* sf, int64_t groups,
                             int64_t gs, int64_t cols, const int8_t* xpv, const float* dvv, const uint16_t* xbv,
                             const float* xv, float* acc) {
  (void)cols; (void)xpv; (void)dvv; (void)xbv;
#if HAVE_VNNI
  if (mode == 4) {
    if (gs % 128 == 0) switch (nr) {
      case 4: rows_vnni<4, true>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
      case 3: rows_vnni<3, true>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
      case 2: rows_vnni<2, true>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
      default: rows_vnni<1, true>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
    } else switch (nr) {
      case 4: rows_vnni<4, false>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
      case 3: rows_vnni<3, false>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
      case 2: rows_vnni<2, false>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
      default: rows_vnni<1, false>(wr, rs, sf, groups, gs, cols, xpv, dvv, acc); break;
    }
  } else
#endif
#if defined(HAVE_BF16DP)
  if (mode == 2 || mode == 3) {
    if (mode == 3) switch (nr) {
      case 4: rows_bf16dp<4, 128>(wr, rs, sf, groups, gs, xbv, acc); break;
      case 3: rows_bf16dp<3, 128>(wr, rs, sf, groups, gs, xbv, acc); break;
      case 2: rows_bf16dp<2, 128>(wr, rs, sf, groups, gs, xbv, acc); break;
      default: rows_bf16dp<1, 128>(wr, rs, sf, groups, gs, xbv, acc); break;
    } else switch (nr) {
      case 4: rows_bf16dp<4, 64>(wr, rs, sf, groups, gs, xbv, acc); break;
      case 3: rows_bf16dp<3, 64>(wr, rs, sf, groups, gs, xbv, acc); break;
      case 2: rows_bf16dp<2, 64>(wr, rs, sf, groups, gs, xbv, acc); break;
      default: rows_bf16dp<1, 64>(wr, rs, sf, groups, gs, xbv, acc); break;
    }
  } else
#endif
#if defined(__AVX512F__)
  if (mode == 1) {
    switch (nr) {
      case 4: rows_avx512<4>(wr, rs, sf, groups, gs, xv, acc); break;
      case 3: rows_avx512<3>(wr, rs, sf, groups, gs, xv, acc); break;
      case 2: rows_avx512<2>(wr, rs, sf, groups, gs, xv, acc); break;
      default: rows_avx512<1>(wr, rs, sf, groups, gs, xv, acc); break;
    }
  } else
#endif
  for (int64_t i = 0; i < nr; i++) acc[i] = row_scalar(wr + i * rs, sf + i * groups, groups, gs, xv);
}

/* out[s, r] = Σ_c (q[e, r, c] − z[e, r, c / gs]) · s[e, r, c / gs] · x[s / xdiv, c] with e = ids[s]; 0 where e is
   not in [0, ne). q: packed bytes, row stride rs and expert stride es (bytes); scales (float16 bits) and zeros
   share the strides ges (expert) and grs (row); x rows contiguous with stride xs; out [n, rows]. */
template <class X>
static int gemv4(const uint8_t* q, int64_t es, int64_t rs, const uint16_t* sc, const uint8_t* zp, int64_t ges,
                 int64_t grs, const int64_t* ids, int64_t n, int64_t ne, const typename X::T* x, int64_t xs,
                 int64_t xdiv, int64_t rows, int64_t cols, int64_t gs, typename X::T* out, int nthreads, int qx) {
  if (gs < 2 || gs % 2 || cols % gs) return 2;
  const int64_t nx = (n + xdiv - 1) / xdiv, groups = cols / gs;
  const int mode = int4_mode(gs, X::bf16, qx);
  const int64_t blk = mode == 3 ? 128 : mode == 2 ? 64 : 32;
  const float zoff = mode == 2 || mode == 3 ? 128.f : 0.f;  /* the bf16 dot-product paths add 128 to every code */
  float* xf = (float*)malloc((size_t)(nx * (cols + groups)) * sizeof(float) + (size_t)(nx * cols) * 2 + 128);
  if (!xf) return 1;  /* the caller falls back to torch's ops */
  float* xsum = xf + nx * cols;
  uint16_t* xb = (uint16_t*)(xsum + nx * groups);
  /* mode 4: the quantized input, permuted per 128-column chunk (see rows_vnni), and per chunk 16 lanes of block
     scales; xsum then holds Σ_b d_b · Σ_{c in b} xq_c per group (the zero points' share on the quantized input) */
  const int64_t nch = (cols + 127) / 128;
  int8_t* xp = nullptr; float* dv = nullptr;
  if (mode == 4) {
    xp = (int8_t*)malloc((size_t)(nx * cols) + (size_t)(nx * nch * 16) * sizeof(float) + 128);
    if (!xp) { free(xf); return 1; }
    dv = (float*)(xp + ((nx * cols + 63) & ~(int64_t)63));
    int8_t qb[64];
    float vb[64];
    for (int64_t s = 0; s < nx; s++) {
      const typename X::T* xi = x + s * xs;
      float* xg = xsum + s * groups;
      float* dvs = dv + s * nch * 16;
      for (int64_t g = 0; g < groups; g++) xg[g] = 0.f;
      for (int64_t k = 0; k < nch * 16; k++) dvs[k] = 0.f;
      for (int64_t c0 = 0; c0 < cols; c0 += 64) {
        /* block c0 is half h of chunk ch (n columns): its even columns go to the chunk's first n/2 bytes, its odd
           ones to the last n/2, 32 each from offset 32·h */
        const int64_t ch = c0 / 128, h = (c0 / 64) % 2, n = cols - ch * 128 < 128 ? cols - ch * 128 : 128;
        for (int j = 0; j < 64; j++) vb[j] = X::get(xi[c0 + j]);
        const float d = quantize_q8(vb, 64, qb);
        int8_t* lo = xp + s * cols + ch * 128 + 32 * h;
        int8_t* hi = lo + n / 2;
        int32_t t = 0;
        for (int j = 0; j < 32; j++) { lo[j] = qb[2 * j]; hi[j] = qb[2 * j + 1]; t += qb[2 * j] + qb[2 * j + 1]; }
        for (int l = 0; l < 8; l++) dvs[ch * 16 + 8 * h + l] = d;
        xg[c0 / gs] += d * (float)t;
      }
    }
  }
  for (int64_t s = 0; s < nx && mode != 4; s++) {
    float* xr = xf + s * cols;
    const typename X::T* xi = x + s * xs;
    for (int64_t c = 0; c < cols; c++) {
      /* vector modes, within every blk columns: the order the codes unpack in (modes 1, 2: the even columns, then
         the odd ones; mode 3: columns 4j, then 4j+1, 4j+2, 4j+3); the scalar loop reads the input as it is */
      const int64_t in = c % blk, run = mode == 3 ? in % 4 : in % 2, pos = mode == 3 ? in / 4 : in / 2;
      const int64_t dst = mode ? (c - in) + run * (mode == 3 ? 32 : blk / 2) + pos : c;
      xr[dst] = X::get(xi[c]);
      if (mode >= 2) memcpy(xb + s * cols + dst, xi + c, 2);
    }
    for (int64_t g = 0; g < groups; g++) {
      float t = 0.f;
      for (int64_t c = g * gs; c < (g + 1) * gs; c++) t += xr[c];  /* a group is whole blocks: the same sum */
      xsum[s * groups + g] = t;
    }
  }
  const int64_t nb = (rows + 3) / 4, total = n * nb, rowbytes = cols / 2;
  const int64_t pg = page_rows(rs, rows), rsb = rs * pg, grsb = grs * pg;  /* a block's rows: pg apart */
  /* prefetch distance: PF_AHEAD blocks, or PF_BYTES of codes where that is more (short rows: 1 KB for a gate;up of
     H = 2048, 512 B for its down projection; 2 threads stream those ~10% faster 16 KB ahead than 2 blocks ahead) */
  const int64_t ahead = ROWS_TOGETHER == 1 ? PF_AHEAD
                       : PF_BYTES / (4 * rowbytes) > PF_AHEAD ? PF_BYTES / (4 * rowbytes) : PF_AHEAD;
  #pragma omp parallel num_threads(nthreads)
  {
  float* sf = (float*)__builtin_alloca((size_t)(4 * groups) * sizeof(float));  /* this thread's block scales */
  #pragma omp for schedule(static)
  for (int64_t b = 0; b < total; b++) {
    const int64_t s = b / nb, r0 = block_row(b % nb, pg), nr = rows - r0 < 4 ? rows - r0 : 4, e = ids[s];
    typename X::T* o = out + s * rows + r0;
    if (e < 0 || e >= ne) { for (int64_t i = 0; i < nr; i++) o[i * pg] = X::put(0.f); continue; }
    const float* xv = xf + (s / xdiv) * cols;
    const float* xg = xsum + (s / xdiv) * groups;
    const uint8_t* wr = q + e * es + r0 * rs;
    const uint16_t* sr = sc + e * ges + r0 * grs;
    const uint8_t* zr = zp + e * ges + r0 * grs;
    const int64_t nxt = b + ahead;  /* prefetch the codes of the block `ahead` blocks on (see gemv) */
    if (PF_AHEAD > 0 && nxt < total && (ROWS_TOGETHER == 4 || nxt / nb != s)) {  /* rows one after the other:
                                                                                   the next matrix's only */
      const int64_t ns = nxt / nb, ne2 = ids[ns];
      if (ne2 >= 0 && ne2 < ne) {
        const int64_t nr0 = block_row(nxt % nb, pg), nnr = rows - nr0 < 4 ? rows - nr0 : 4;
        const char* p = (const char*)(q + ne2 * es + nr0 * rs);
        for (int64_t i = 0; i < nnr; i++)
          for (int64_t off = 0; off < rowbytes; off += 64) __builtin_prefetch(p + i * rsb + off);
      }
    }
    /* this block's scales in fp32, and the zero points' share: corr = Σ_g s · z · Σx_g */
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = 0; i < nr; i++) {
      const uint16_t* si = sr + i * grsb;
      const uint8_t* zi = zr + i * grsb;
      float* fi = sf + i * groups;
      int64_t g = 0;
#if defined(__AVX512F__)
      __m512 cv = _mm512_setzero_ps();
      for (; g + 16 <= groups; g += 16) {
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(si + g)));
        _mm512_storeu_ps(fi + g, sv);
        const __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zi + g))));
        cv = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_add_ps(zv, _mm512_set1_ps(zoff))), _mm512_loadu_ps(xg + g), cv);
      }
      corr[i] = _mm512_reduce_add_ps(cv);
#endif
      for (; g < groups; g++) { fi[g] = scale_f(si[g]); corr[i] += fi[g] * ((float)zi[g] + zoff) * xg[g]; }
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const int8_t* xpv = mode == 4 ? xp + (s / xdiv) * cols : nullptr;
    const float* dvv = mode == 4 ? dv + (s / xdiv) * nch * 16 : nullptr;
    const uint16_t* xbv = xb + (s / xdiv) * cols;
    if (ROWS_TOGETHER == 1)  /* one row after the other: the block is one sequential stream (see cpu_kernels) */
      for (int64_t i = 0; i < nr; i++)
        int4_rows(mode, 1, wr + i * rs, rs, sf + i * groups, groups, gs, cols, xpv, dvv, xbv, xv, acc + i);
    else
      int4_rows(mode, nr, wr, rsb, sf, groups, gs, cols, xpv, dvv, xbv, xv, acc);
    for (int64_t i = 0; i < nr; i++) o[i * pg] = X::put(acc[i] - corr[i]);
  }
  }
  free(xf);
  free(xp);
  return 0;
}

#define ARGS4(XT) const uint8_t* q, int64_t es, int64_t rs, const uint16_t* sc, const uint8_t* zp, int64_t ges, \
  int64_t grs, const int64_t* ids, int64_t n, int64_t ne, const XT* x, int64_t xs, int64_t xdiv, int64_t rows, \
  int64_t cols, int64_t gs
#define PASS4 q, es, rs, sc, zp, ges, grs, ids, n, ne, x, xs, xdiv, rows, cols, gs
extern "C" {
int moekit_gemv_int4_bfloat16(ARGS4(uint16_t), uint16_t* out, int nt, int qx) { return gemv4<BF16>(PASS4, out, nt, qx); }
int moekit_gemv_int4_float32(ARGS4(float), float* out, int nt, int qx) { return gemv4<F32>(PASS4, out, nt, qx); }
#ifdef __FLT16_MAX__
int moekit_gemv_int4_float16(ARGS4(_Float16), _Float16* out, int nt, int qx) { return gemv4<F16>(PASS4, out, nt, qx); }
#endif
/* which path a call takes (int4_mode) */
int moekit_int4_path(int64_t gs, int bf16_input, int qx) { return int4_mode(gs, bf16_input != 0, qx); }
}
"""
SOURCE = SOURCE.replace("__CONVERSIONS__\n", cpu_kernels.CONVERSIONS)

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
STEM = "moekit_gemv_int4"


def _fn(name: str):
    """The int4 library's entry point ``name``, or None when the library (or that dtype's variant) is missing."""
    return cpu_kernels.library_entry(SOURCE, STEM, name)


def int4_activations() -> str:
    """How int4 weights meet their input: ``$MOEKIT_INT4_ACTIVATIONS`` (``int8`` or ``float``) when set, else what
    int8 weights do (``cpu_kernels.int8_activations()``, ``$MOEKIT_INT8_ACTIVATIONS``; ``"int8"`` by default)."""
    mode = os.environ.get("MOEKIT_INT4_ACTIVATIONS", "").strip().lower()
    if not mode:
        return cpu_kernels.int8_activations()
    return "float" if mode in ("float", "fp32", "0", "no") else "int8"


def available() -> bool:
    """Whether the compiled int4 decode kernel is in use on this machine (builds it on the first call)."""
    return cpu_kernels.load_library(SOURCE, STEM) is not None


PATHS = ("scalar", "avx512-fp32", "avx512-bf16-dot-64", "avx512-bf16-dot-128", "avx512-vnni-int8")


def kernel_path(group_size: int, dtype: torch.dtype, activations: str | None = None) -> str | None:
    """Which loop the kernel runs for this group size, input dtype and ``activations`` (default
    ``int4_activations()``) (``PATHS``), None without the kernel."""
    fn = _fn("moekit_int4_path")
    if fn is None:
        return None
    qx = (activations or int4_activations()) == "int8"
    return PATHS[fn(ctypes.c_int64(group_size), ctypes.c_int(dtype == torch.bfloat16), ctypes.c_int(qx))]


def expert_gemv_int4(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor,
    activations: str | None = None,
) -> torch.Tensor | None:
    """``out[t, j] = x[t] (or x[t, j]) @ W[ids[t, j]].T`` for int4 experts, W = (codes − zero)·scale per group, as one
    kernel call; None when the kernel cannot run these tensors (then use torch's ops).

    ``q [E, out, in/2]`` uint8 packed codes (low nibble = even column) with contiguous rows, ``scale [E, out, G]``
    float16 and ``zero [E, out, G]`` uint8 with equal strides (group size in / G), ``x [T, in]`` or ``[T, k, in]``
    in bf16/fp16/fp32, ``ids [T, k]``; slots with ids outside [0, E) are zero. The result has ``x``'s dtype.
    ``activations`` (default ``int4_activations()``): ``"int8"`` quantizes ``x`` per block of 64 for
    AVX512-VNNI where the CPU has it and the group size is a multiple of 64 (``"float"``: ``x`` as it is).
    """
    tensors = (x, q, scale, zero, ids)
    if any(t.device.type != "cpu" for t in tensors) or q.dim() != 3 or q.dtype != torch.uint8 or q.stride(-1) != 1:
        return None
    if scale.dtype != torch.float16 or zero.dtype != torch.uint8 or scale.dim() != 3:
        return None
    if scale.shape != zero.shape or scale.stride() != zero.stride() or scale.stride(-1) != 1:
        return None
    rows, cols, groups = q.shape[1], 2 * q.shape[2], scale.shape[2]
    if scale.shape[:2] != q.shape[:2] or groups < 1 or cols % groups or (cols // groups) % 2:
        return None
    dtype_name = _DTYPES.get(x.dtype)
    fn = _fn(f"moekit_gemv_int4_{dtype_name}") if dtype_name else None
    if fn is None:
        return None
    num_tokens, top_k = ids.shape
    per_slot = x.dim() == 3
    xs = x.reshape(-1, cols) if x.stride(-1) == 1 else x.contiguous().reshape(-1, cols)
    if xs.shape[0] != num_tokens * (top_k if per_slot else 1) or (xs.shape[0] > 1 and xs.stride(0) < cols):
        return None
    ids64 = ids.to(torch.int64).contiguous()
    out = x.new_empty(num_tokens, top_k, rows)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    rc = fn(
        ptr(q.data_ptr()), i64(q.stride(0)), i64(q.stride(1)), ptr(scale.data_ptr()), ptr(zero.data_ptr()),
        i64(scale.stride(0)), i64(scale.stride(1)), ptr(ids64.data_ptr()), i64(ids64.numel()), i64(q.shape[0]),
        ptr(xs.data_ptr()), i64(xs.stride(0)), i64(1 if per_slot else top_k), i64(rows), i64(cols),
        i64(cols // groups), ptr(out.data_ptr()), ctypes.c_int(torch.get_num_threads()),
        ctypes.c_int(int((activations or int4_activations()) == "int8")),
    )
    return out if rc == 0 else None
