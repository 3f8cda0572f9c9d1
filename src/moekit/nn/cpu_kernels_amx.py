"""float16 expert GEMMs on AMX-BF16 (prefill): each fp16 value split exactly into two bf16, four bf16 products.

On CPUs without a float16 matrix unit (AMX-FP16), torch's fp16 GEMM runs on AVX-512 FMA (fp32 arithmetic, the
same speed as an fp32 GEMM), while bf16 GEMMs run on AMX tiles several times faster. A float16 value has an
11-bit significand, bf16 an 8-bit one, so ``v = hi + lo`` with ``hi`` = the top 8 significant bits and ``lo`` = the
rest (at most 3 bits) holds **exactly** in bf16 for every finite fp16 value. Then ``x·w = xh·wh + xh·wl + xl·wh +
xl·wl``, four products that AMX (``tdpbf16ps``) computes exactly and sums in fp32: the numerics of torch's fp16 GEMM
(exact products, fp32 sums, one rounding to fp16), from bf16 tiles. (Dropping ``xl·wl`` saves a quarter of the tile
products but not time here: the kernel is bound by reading and splitting the weights and by tile loads.)

Layout: expert weights in nn.Linear's ``[E, out, in]`` (``in`` contiguous), the input's rows sorted by expert with
cumulative ``offsets``. Each thread splits blocks of 16 weight rows into hi/lo bf16 in its own buffer (no copy of
the weights is kept; the next block is fetched into L2 while the current one's tile products run) and multiplies them by the
expert's rows, packed once per call in the tiles' pair layout. Built like ``cpu_kernels`` (``load_library``,
``-march=native``); where the compiler or the CPU has no AMX-BF16, or the OS refuses the tile state,
``available()`` is False and callers use torch's ops.
"""

from __future__ import annotations

import ctypes

import torch

from moekit.nn import cpu_kernels

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__)
#define MOEKIT_AMX 1
#endif

extern "C" int moekit_amx_compiled() {
#ifdef MOEKIT_AMX
  return 1;
#else
  return 0;
#endif
}

#ifdef MOEKIT_AMX
/* Linux gives a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
static int amx_permitted() {
  static int ok = -1;
  if (ok < 0) ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct TileConfig { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

static void configure_tiles() {
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

/* 16 fp16 values → their exact split into bf16 hi (the fp32 value's top 16 bits: 8 significant bits) and lo (the
   remainder, at most 3 significant bits, so exact in bf16; 0 for inf/NaN, which hi carries). */
static inline void split16(const uint16_t* src, uint16_t* hi, uint16_t* lo) {
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)src));
  const __m512 hf = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32((int)0xffff0000u)));
  const __mmask16 special = _mm512_fpclass_ps_mask(f, 0x01 | 0x80 | 0x08 | 0x10);  /* NaN, +inf, -inf */
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_sub_ps(~special, f, hf), hf);  /* [hi | lo] */
  _mm256_storeu_si256((__m256i*)hi, _mm512_castsi512_si256(both));
  _mm256_storeu_si256((__m256i*)lo, _mm512_extracti64x4_epi64(both, 1));
}
#endif

extern "C" int moekit_amx_available() {
#ifdef MOEKIT_AMX
  return amx_permitted();
#else
  return 0;
#endif
}

/* out[r, n] = fp16(Σ_k x[r, k] · w[e(r), n, k]) for the rows r of each expert e (rows offsets[e-1] .. offsets[e]);
   rows past offsets[E-1] are zero. x: fp16 [S, K] (row stride ldx), w: fp16 [E, N, K] (strides sw_e, sw_n, unit
   along K), out: fp16 [S, N] (row stride ldo). K % 32 == 0, N % 16 == 0. xp: scratch of 2 · (S + 16·E) · K
   uint16 (the packed hi/lo rows). Returns 0, or -1 when AMX cannot run. */
extern "C" int moekit_amx_f16_grouped(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t sw_e, int64_t sw_n,
                                      const int32_t* offsets, int64_t ne, int64_t n, int64_t k, uint16_t* out,
                                      int64_t ldo, uint16_t* xp, int nthreads) {
#ifdef MOEKIT_AMX
  if (!amx_permitted() || k % 32 || n % 16) return -1;
  /* per expert: first row, row count, and where its packed rows start (in 16-row tiles) */
  int64_t* start = (int64_t*)malloc(sizeof(int64_t) * 3 * (ne + 1));
  int64_t *count = start + ne + 1, *pstart = count + ne + 1;
  /* a unit: 16 weight rows of one expert against a chunk of its row tiles; a chunk's packed rows (16 · k · 4 bytes
     per tile) stay within ~1 MB so that they stay in L2 while a thread runs the chunk's units one after another */
  const int64_t chunk = (1 << 20) / (64 * k) > 2 ? ((1 << 20) / (64 * k)) & ~(int64_t)1 : 2;
  int64_t prev = 0, ptiles = 0, units = 0;
  for (int64_t e = 0; e < ne; e++) {
    const int64_t end = offsets[e];
    start[e] = prev; count[e] = end - prev; pstart[e] = ptiles;
    ptiles += (count[e] + 15) / 16;
    units += (count[e] + 16 * chunk - 1) / (16 * chunk) * (n / 16);
    prev = end;
  }
  uint16_t* xph = xp;                       /* [tile][k/2][16][2]: hi parts */
  uint16_t* xpl = xp + ptiles * 16 * k;     /* lo parts, same layout */
  struct Unit { int64_t e, t0, t1, n0; };
  Unit* unit = (Unit*)malloc(sizeof(Unit) * (units + 1));
  int64_t* tile_e = (int64_t*)malloc(sizeof(int64_t) * (ptiles + 1));  /* the expert of each packed tile */
  /* work before each unit (its tiles, + 2 for splitting its weight rows): threads take equal shares of it */
  int64_t* work = (int64_t*)malloc(sizeof(int64_t) * (units + 1));
  work[0] = 0;
  for (int64_t e = 0, u = 0, t = 0; e < ne; e++) {
    const int64_t tiles = (count[e] + 15) / 16, parts = (tiles + chunk - 1) / chunk;
    for (int64_t p = 0; p < parts; p++) {  /* the expert's tiles in near-equal chunks */
      const int64_t t0 = tiles * p / parts, t1 = tiles * (p + 1) / parts;
      for (int64_t b = 0; b < n / 16; b++, u++) {
        unit[u] = Unit{e, t0, t1, b * 16};
        work[u + 1] = work[u] + (t1 - t0) + 2;
      }
    }
    for (int64_t i = 0; i < tiles; i++) tile_e[t++] = e;
  }
  #pragma omp parallel num_threads(nthreads)
  {
    /* 1. pack every expert's rows: tile t, pair row p, column m holds x[row, 2p], x[row, 2p + 1] (zero padding).
       Per 32 columns: the 16 rows' hi and lo pairs as 16 × 16 dwords, transposed by gathers (pair q of every row). */
    uint32_t hs[16 * 16] __attribute__((aligned(64))), ls[16 * 16] __attribute__((aligned(64)));
    const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < ptiles; t++) {
      const int64_t e = tile_e[t], m0 = (t - pstart[e]) * 16;
      const int64_t valid = count[e] - m0 < 16 ? count[e] - m0 : 16;
      uint16_t* th = xph + t * 16 * k;
      uint16_t* tl = xpl + t * 16 * k;
      memset(hs, 0, sizeof hs);
      memset(ls, 0, sizeof ls);
      for (int64_t c = 0; c < k; c += 32) {
        for (int64_t m = 0; m < valid; m++) {
          const uint16_t* row = x + (start[e] + m0 + m) * ldx + c;
          split16(row, (uint16_t*)(hs + m * 16), (uint16_t*)(ls + m * 16));
          split16(row + 16, (uint16_t*)(hs + m * 16) + 16, (uint16_t*)(ls + m * 16) + 16);
        }
        for (int64_t q = 0; q < 16; q++) {
          _mm512_storeu_si512(th + (c / 2 + q) * 32, _mm512_i32gather_epi32(rows16, hs + q, 4));
          _mm512_storeu_si512(tl + (c / 2 + q) * 32, _mm512_i32gather_epi32(rows16, ls + q, 4));
        }
      }
    }
    /* 2. each unit: 16 weight rows split into hi/lo (this thread's buffer), times the expert's packed rows */
    uint16_t* wb = (uint16_t*)aligned_alloc(64, (size_t)(2 * 16 * k) * sizeof(uint16_t) + 64);
    uint16_t* wh = wb;
    uint16_t* wl = wb + 16 * k;
    float cbuf[2][16 * 16] __attribute__((aligned(64)));
    configure_tiles();
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t v0 = 0, v1 = 0;
    while (v0 < units && work[v0] * nt < work[units] * tid) v0++;
    v1 = v0;
    while (v1 < units && work[v1] * nt < work[units] * (tid + 1)) v1++;
    for (int64_t v = v0; v < v1; v++) {
      const int64_t e = unit[v].e, n0 = unit[v].n0, tiles = unit[v].t1;
      const uint16_t* wr = w + e * sw_e + n0 * sw_n;
      /* the next unit's 16 weight rows (this thread's next), fetched into L2 while this
         unit's tiles run: 16 · k · 2 bytes in k / 32 steps, so that reading weights overlaps the tile products */
      const char* nextw = v + 1 < v1 ? (const char*)(w + unit[v + 1].e * sw_e + unit[v + 1].n0 * sw_n) : nullptr;
      const int64_t row_lines = k * 2 / 64, lines = 16 * row_lines;
      const int64_t steps = k / 32 * ((tiles - unit[v].t0 + 1) / 2);  /* spread over every pair's loop: few misses
                                                                          in flight at a time, none dropped */
      int64_t fetched = 0;
      for (int64_t i = 0; i < 16; i++)
        for (int64_t c = 0; c < k; c += 16) split16(wr + i * sw_n + c, wh + i * k + c, wl + i * k + c);
      for (int64_t t = unit[v].t0; t < tiles; t += 2) {
        const int two = t + 1 < tiles;
        const uint16_t* b0h = xph + (pstart[e] + t) * 16 * k;
        const uint16_t* b0l = xpl + (pstart[e] + t) * 16 * k;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t c = 0; c < k; c += 32) {
          if (nextw && fetched < lines) {
            const int64_t upto = fetched + (lines + steps - 1) / steps;
            for (; fetched < upto && fetched < lines; fetched++)
              _mm_prefetch(nextw + (fetched / row_lines) * sw_n * 2 + (fetched % row_lines) * 64, _MM_HINT_T1);
          }
          _tile_loadd(2, wh + c, 2 * k);
          _tile_loadd(3, wl + c, 2 * k);
          _tile_loadd(4, b0h + c * 16, 64);
          _tile_loadd(5, b0l + c * 16, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(0, 2, 5);
          _tile_dpbf16ps(0, 3, 4);
          _tile_dpbf16ps(0, 3, 5);
          if (two) {
            _tile_loadd(6, b0h + 16 * k + c * 16, 64);
            _tile_loadd(7, b0l + 16 * k + c * 16, 64);
            _tile_dpbf16ps(1, 2, 6);
            _tile_dpbf16ps(1, 2, 7);
            _tile_dpbf16ps(1, 3, 6);
            _tile_dpbf16ps(1, 3, 7);
          }
        }
        _tile_stored(0, cbuf[0], 64);
        if (two) _tile_stored(1, cbuf[1], 64);
        /* cbuf[j][i * 16 + m] = row m of tile t + j, output column n0 + i: one fp16 rounding */
        const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(16));
        for (int j = 0; j <= two; j++)
          for (int64_t m = 0; m < 16; m++) {
            const int64_t r = (t + j) * 16 + m;
            if (r >= count[e]) break;
            const __m512 vals = _mm512_i32gather_ps(col, cbuf[j] + m, 4);
            _mm256_storeu_si256((__m256i*)(out + (start[e] + r) * ldo + n0),
                                _mm512_cvtps_ph(vals, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          }
      }
    }
    _tile_release();
    free(wb);
  }
  free(unit);
  free(work);
  free(tile_e);
  free(start);
  return 0;
#else
  (void)x; (void)ldx; (void)w; (void)sw_e; (void)sw_n; (void)offsets; (void)ne; (void)n; (void)k; (void)out;
  (void)ldo; (void)xp; (void)nthreads;
  return -1;
#endif
}
"""

STEM = "moekit_amx"
# Below about 32 rows per weight matrix (per used expert, or of a linear's input) torch's fp16 GEMM is as fast: the
# kernel pads rows to 16-row tiles and splits every weight once per call (measured in docs/nn.md).
AMX_MIN_ROWS = 32
def _fn(name: str):
    """The AMX library's entry point ``name`` (int result), or None when it did not build."""
    return cpu_kernels.library_entry(SOURCE, STEM, name)


_AVAILABLE: list[bool] = []


def available() -> bool:
    """Whether the fp16-on-AMX kernel runs here: built with AMX-BF16, and the OS grants the tile state (once)."""
    if not _AVAILABLE:
        fn = _fn("moekit_amx_available")
        _AVAILABLE.append(bool(fn is not None and fn()))
    return _AVAILABLE[0]


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``f16_grouped_mm(x, w, ...)`` can run these tensors: CPU fp16, ``w [E, out, in]`` with ``in``
    contiguous, ``in`` a multiple of 32 and ``out`` of 16 (the tiles' sizes), ``x`` rows contiguous."""
    return (
        x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float16 and w.dtype == torch.float16
        and w.dim() == 3 and x.dim() == 2 and w.stride(-1) == 1 and x.stride(-1) == 1
        and w.shape[2] % 32 == 0 and w.shape[1] % 16 == 0 and x.shape[1] == w.shape[2]
    )


def f16_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """``out[r] = x[r] @ w[e(r)].T`` for rows sorted by expert (``offsets``: cumulative row counts, int ``[E]``),
    fp16 in and out, computed as four exact bf16 products per pair on AMX with fp32 sums; rows past the last
    offset are zero. None when the kernel cannot run (callers use torch's ``grouped_mm``)."""
    if not fits(x, w) or not available():
        return None
    fn = _fn("moekit_amx_f16_grouped")
    num_experts, n, k = w.shape
    offs = offsets.to(torch.int32).contiguous()
    out = x.new_empty(x.shape[0], n)
    used = int(offs[-1]) if num_experts else 0
    if used < x.shape[0]:
        out[used:].zero_()
    scratch = torch.empty(2 * (used + 16 * num_experts) * k, dtype=torch.int16)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    rc = fn(
        ptr(x.data_ptr()), i64(x.stride(0)), ptr(w.data_ptr()), i64(w.stride(0)), i64(w.stride(1)),
        ptr(offs.data_ptr()), i64(num_experts), i64(n), i64(k), ptr(out.data_ptr()), i64(out.stride(0)),
        ptr(scratch.data_ptr()), ctypes.c_int(torch.get_num_threads()),
    )
    return out if rc == 0 else None
