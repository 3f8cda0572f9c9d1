"""Fused decode ops: a one-token step's RMSNorms, attention (norms, rotary, cache write, single-query attention)
and router each in one native call instead of tens of small torch ops.

At 2 threads an eager decode step of OLMoE spends ~13 ms outside the weight-streaming kernels, ~1 400 small aten ops
that run cold after every kernel call has flushed the caches (docs/nn.md "Where a decode step goes"). Per decoder
layer these calls replace: the input/post-attention RMSNorm (~27 aten ops each), the attention between its
projections (q/k norms, views, rotary, the static-cache write, mask, SDPA: ~90 ops) and the router's linear,
softmax, top-k and renormalisation (~20 ops). Modules change by a forward swap, like ``cpu_kernels.use_for_linears``:
transformers' model code is not forked, and every call that is not a plain one-token CPU inference step (prefill,
batches, grads, masks that are not boolean, caches other than transformers' static and dynamic layers, options
such as ``output_attentions`` or ``clip_qkv``) runs the module's own forward.

Numerics follow transformers' modules: RMSNorm in fp32, rounded to the input dtype, then times the weight and
rounded again; rotary with each product and the sum rounded to the dtype as torch does (bit-identical); attention
scores, softmax and the weighted sum of values in fp32, rounded once (SDPA's CPU kernel rounds its probabilities to
bf16 before the value product, so outputs differ in the last bit of bf16 now and then); the router's logits
rounded to the dtype like ``F.linear``, softmax and renormalisation in fp32, ties in top-k to the lower expert id.

Qwen2-MoE's q/k/v biases and gated shared expert are optional parts of the whole-layer step (``Qwen2Extras``), and so
are GLM4-MoE's / dots1's DeepSeek-V3-style router (``SigmoidRouter``: fp32 logits, sigmoid, selection bias, group-limited
top-k with the ids in ``torch.topk``'s order, renormalised and scaled in fp32), ungated shared experts and partial
rotary (``LayerArgs.rotary_dim``).

Experts that the offload engine serves (``moekit.serve``) take the whole-layer step too (``EXPERTS_PROVIDER``): the
native call runs them on the cache's slot bank when every chosen expert is resident, else stops after the router
and hands them to the engine.

The C++ is built at first use by ``cpu_kernels.load_library`` (same compiler, flags, cache and ``MOEKIT_CPU_KERNELS=0``
switch); ``MOEKIT_FUSED_DECODE=0`` keeps every module's own forward (bench_decode's ``moekit-linears-unfused`` row).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from moekit.formats.quantized import INT4_BUFFERS
from moekit.nn import cpu_kernels, cpu_kernels_int4
from moekit.nn.int8_experts import INT8_BUFFERS, INT8_LINEAR_BUFFERS, int8_linear_forward

# ``layer_step``'s arguments as named fields: one list per struct, from which both the C text (in SOURCE) and the
# ctypes mirror are made, so the two cannot disagree. Addresses are int64 (0: none), like the other entries' arrays.
_I64 = ctypes.c_int64
_OFFLOAD_FIELDS = (
    ("table", _I64, "int64 [E]: expert -> slot of the banks gate_up/down, -1: absent; 0: no slot bank"),
    ("moe_in", _I64, "out: the MoE input (post-attention norm) [hidden]"),
    ("residual", _I64, "out: the residual (h + attention) [hidden]"),
    ("ids", _I64, "out: the router's top-k expert ids, int64 [k]"),
    ("weights", _I64, "out: their weights [k] (fp32 when scores_f32, else the dtype)"),
    ("slots", _I64, "slots in the banks gate_up/down"),
)
"""Experts an offload engine owns (``EXPERTS_PROVIDER``): the router's output goes to the caller's buffers, and the
experts run on the engine's slot banks when every chosen one is resident (else ``layer_step`` returns 4)."""
_QWEN2_FIELDS = (
    ("qkv_bias", _I64 * 3, "q, k, v bias addresses (0: none; float projections only): gemv_multi's bias array"),
    ("sx_gate", _I64, "shared expert: gate_proj weight"),
    ("sx_up", _I64, "shared expert: up_proj weight"),
    ("sx_gate_scalar", _I64, "shared_expert_gate weight [1, hidden] (0: ungated, GLM4-MoE / DeepSeek-V3)"),
    ("sx_down", _I64, "shared expert: down_proj weight (0: no shared expert)"),
    ("sx_inner", _I64, "shared expert: inner size"),
    ("sx_rstride", _I64, "row stride of sx_gate, sx_up and sx_gate_scalar"),
    ("sx_down_rstride", _I64, "row stride of sx_down"),
    ("sx_out", _I64, "where the shared expert's output goes (0: scratch)"),
    ("sx_format", _I64, "the shared expert's linears: 0 the dtype, 1 int8 codes (quantize_linears_int8)"),
    ("sx_scales", _I64 * 4, "int8: the per-row scales of sx_gate, sx_up, sx_gate_scalar and sx_down"),
    ("sx_act_int8", _I64, "int8: the linears quantize their activations to int8"),
)
"""Qwen2-MoE's q/k/v biases and gated shared expert, optional parts of ``layer_step`` (``LayerArgs.extras``); also the
biases and ungated shared experts of GLM4-MoE / dots1 (``sx_gate_scalar`` 0)."""
_SIGMOID_ROUTER_FIELDS = (
    ("bias", _I64, "e_score_correction_bias, fp32 [experts]: added to the scores for choosing only"),
    ("groups", _I64, "n_group: the experts in that many equal consecutive groups"),
    ("topk_group", _I64, "groups kept: those with the largest sums of their 2 best scores"),
    ("weight_f32", _I64, "the router's weight in fp32 (transformers keeps it so), else in the dtype"),
    ("scaling", ctypes.c_float, "routed_scaling_factor, times the chosen (renormalised) scores"),
)
"""DeepSeek-V3's router (GLM4-MoE, dots1): sigmoid scores of fp32 logits, group-limited top-k over the scores plus a
selection bias, the scores (not the bias) as weights, renormalised, scaled (``LayerArgs.sigmoid_router``)."""
_LAYER_FIELDS = (
    ("h", _I64, "hidden state in [hidden]"),
    ("out", _I64, "hidden state out [hidden]"),
    ("ln1", _I64, "input_layernorm weight"),
    ("ln2", _I64, "post_attention_layernorm weight"),
    ("wq", _I64, "q_proj weight (or int8 codes)"),
    ("wk", _I64, "k_proj weight (or int8 codes)"),
    ("wv", _I64, "v_proj weight (or int8 codes)"),
    ("wo", _I64, "o_proj weight (or int8 codes)"),
    ("q_norm", _I64, "q_norm weight (0: none)"),
    ("k_norm", _I64, "k_norm weight (0: none)"),
    ("q_group", _I64, "values per q_norm group (0: no q/k norms)"),
    ("k_group", _I64, "values per k_norm group"),
    ("cos", _I64, "rotary cos [head_dim]"),
    ("sin", _I64, "rotary sin [head_dim]"),
    ("k_cache", _I64, "the layer's keys"),
    ("v_cache", _I64, "the layer's values"),
    ("k_head_stride", _I64, "keys' stride between heads"),
    ("k_pos_stride", _I64, "keys' stride between positions"),
    ("v_head_stride", _I64, "values' stride between heads"),
    ("v_pos_stride", _I64, "values' stride between positions"),
    ("cum_length", _I64, "a static layer's cumulative_length (int64), 0: dynamic cache"),
    ("cache_len", _I64, "cached positions (a static cache's length; a dynamic one's after the append)"),
    ("mask", _I64, "boolean mask [cache_len] (0: none)"),
    ("heads", _I64, "attention heads"),
    ("kv_heads", _I64, "key/value heads"),
    ("head_dim", _I64, "head size"),
    ("hidden", _I64, "hidden size"),
    ("router", _I64, "router weight [experts, hidden]"),
    ("experts", _I64, "routed experts"),
    ("top_k", _I64, "experts per token"),
    ("norm_topk", _I64, "renormalise the top-k scores"),
    ("scores_f32", _I64, "the router's scores in fp32 (Mixtral), else rounded to the dtype"),
    ("gate_up", _I64, "experts' gate;up bank (or codes; an offload engine's slot bank)"),
    ("gate_up_estride", _I64, "gate_up's stride between experts"),
    ("down", _I64, "experts' down bank (or codes)"),
    ("down_estride", _I64, "down's stride between experts"),
    ("inner", _I64, "experts' inner size"),
    ("threads", _I64, "threads of the kernels' parallel regions"),
    ("qkv_rstride", _I64, "row stride of wq, wk and wv"),
    ("o_rstride", _I64, "row stride of wo"),
    ("gate_up_rstride", _I64, "gate_up's stride between rows"),
    ("down_rstride", _I64, "down's stride between rows"),
    ("qkv", _I64, "the caller's q|k|v buffer, 0: scratch (a dynamic cache reads k and v between the phases)"),
    ("phase", _I64, "0: static cache; dynamic cache: 1 = up to rotary (the caller appends k, v), 2 = the rest"),
    ("offload", _I64, "OffloadExperts of an offload engine (0: none)"),
    ("attn_format", _I64, "attention projections: 0 the dtype, 1 int8 linears"),
    ("q_scale", _I64, "int8 q_proj's per-row scales"),
    ("k_scale", _I64, "int8 k_proj's per-row scales"),
    ("v_scale", _I64, "int8 v_proj's per-row scales"),
    ("o_scale", _I64, "int8 o_proj's per-row scales"),
    ("attn_act_int8", _I64, "int8 linears quantize their activations to int8"),
    ("expert_format", _I64, "experts: 0 the dtype, 1 int8, 2 packed int4 (through int4_kernel)"),
    ("gate_up_scale", _I64, "int8 / int4: gate_up's scales"),
    ("gate_up_scale_estride", _I64, "int8: gate_up scales' stride between experts"),
    ("down_scale", _I64, "int8 / int4: down's scales"),
    ("down_scale_estride", _I64, "int8: down scales' stride between experts"),
    ("expert_act_int8", _I64, "int8 / int4 experts quantize their activations to int8"),
    ("gate_up_zeros", _I64, "int4: gate_up's zero points"),
    ("down_zeros", _I64, "int4: down's zero points"),
    ("gate_up_group_estride", _I64, "int4: gate_up scales' and zero points' stride between experts"),
    ("gate_up_group_rstride", _I64, "int4: their stride between rows"),
    ("down_group_estride", _I64, "int4: down scales' and zero points' stride between experts"),
    ("down_group_rstride", _I64, "int4: their stride between rows"),
    ("gate_up_group_size", _I64, "int4: gate_up's group size"),
    ("down_group_size", _I64, "int4: down's group size"),
    ("int4_kernel", _I64, "int4: the address of cpu_kernels_int4's moekit_gemv_int4_<dtype>"),
    ("extras", _I64, "Qwen2Extras (0: none)"),
    ("sigmoid_router", _I64, "SigmoidRouter (0: the softmax top-k router)"),
    ("rotary_dim", _I64, "rotary on the first rotary_dim values of each head (0: all head_dim)"),
    ("eps", ctypes.c_float, "eps of the layer norms"),
    ("qk_eps", ctypes.c_float, "eps of the q/k norms"),
    ("scale", ctypes.c_float, "attention scale"),
)
"""``layer_step``'s arguments (``_layer_args`` fills them in)."""


def _c_struct(name: str, fields: tuple) -> str:
    """The C declaration of struct ``name`` with ``fields`` ((name, ctypes type, comment) each), as ctypes lays it."""
    c_types = {ctypes.c_int64: "int64_t", ctypes.c_float: "float"}
    lines = []
    for field, ctype, doc in fields:
        if hasattr(ctype, "_length_"):
            decl = f"{c_types[ctype._type_]} {field}[{ctype._length_}];"
        else:
            decl = f"{c_types[ctype]} {field};"
        lines.append(f"  {decl:<32}/* {doc} */")
    size = ctypes.sizeof(_structure(name, fields, ""))  # the layout both sides must agree on
    return (f"struct {name} {{\n" + "\n".join(lines) + "\n};\n"
            f"static_assert(sizeof({name}) == {size}, \"{name}: ctypes' layout\");\n")


def _structure(name: str, fields: tuple, doc: str) -> type[ctypes.Structure]:
    """The ctypes mirror of ``_c_struct(name, fields)``."""
    return type(name, (ctypes.Structure,), {"_fields_": [(f, t) for f, t, _ in fields], "__doc__": doc})


OffloadExperts = _structure("OffloadExperts", _OFFLOAD_FIELDS, "``layer_step``'s experts an offload engine owns.")
Qwen2Extras = _structure("Qwen2Extras", _QWEN2_FIELDS, "``layer_step``'s Qwen2-MoE biases and shared expert.")
SigmoidRouter = _structure("SigmoidRouter", _SIGMOID_ROUTER_FIELDS, "``layer_step``'s DeepSeek-V3-style router.")
LayerArgs = _structure("LayerArgs", _LAYER_FIELDS, "``layer_step``'s arguments.")
_C_STRUCTS = "\n/* ---- layer_step's arguments (made from fused_decode's _LAYER_FIELDS and co.) ---- */\n" + "".join(
    _c_struct(n, f) for n, f in (("OffloadExperts", _OFFLOAD_FIELDS), ("Qwen2Extras", _QWEN2_FIELDS),
                                 ("SigmoidRouter", _SIGMOID_ROUTER_FIELDS), ("LayerArgs", _LAYER_FIELDS)))

SOURCE = cpu_kernels.SOURCE + _C_STRUCTS + r"""
/* ---- fused decode ops (cpu_kernels' source above: its conversions, BF16/F16/F32 types and dot_rows) ---- */
#include <algorithm>
#include <cmath>
#include <utility>
template <class X> static inline float rnd(float f) { return X::get(X::put(f)); }  /* round to X's precision */

/* transformers' RMSNorm over groups of n values: h = x * rsqrt(mean(x^2) + eps) in fp32, rounded to the dtype,
   then w * h rounded again. In place is fine (out == x). */
template <class X>
static void rmsnorm(const typename X::T* x, const typename X::T* w, typename X::T* out, int64_t groups, int64_t n,
                    float eps) {
  for (int64_t g = 0; g < groups; g++) {
    const typename X::T* xg = x + g * n; typename X::T* og = out + g * n;
    float ss = 0.f;
    #pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < n; c++) { const float v = X::get(xg[c]); ss += v * v; }
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t c = 0; c < n; c++) og[c] = X::put(X::get(w[c]) * rnd<X>(X::get(xg[c]) * inv));
  }
}

/* rotate_half rotary on the first R of each of nh heads' D values in place (R < D: partial_rotary_factor, the
   rest passes), each product and the sum rounded like torch's ops. */
template <class X>
static void rotary(typename X::T* v, int64_t nh, int64_t D, int64_t R, const typename X::T* cs,
                   const typename X::T* sn) {
  const int64_t h2 = R / 2;
  for (int64_t h = 0; h < nh; h++) {
    typename X::T* p = v + h * D;
    for (int64_t d = 0; d < h2; d++) {
      const float x1 = X::get(p[d]), x2 = X::get(p[d + h2]);
      const float c1 = X::get(cs[d]), c2 = X::get(cs[d + h2]), s1 = X::get(sn[d]), s2 = X::get(sn[d + h2]);
      p[d] = X::put(rnd<X>(x1 * c1) + rnd<X>(-x2 * s1));
      p[d + h2] = X::put(rnd<X>(x2 * c2) + rnd<X>(x1 * s2));
    }
  }
}

/* Single-query attention for H heads over L cached positions (GQA: head h reads kv head h / (H / Hkv)), the
   positions where mask[j] is true (all when mask is null): scores, softmax and the value sum in fp32, rounded
   once into out [H * D]. 1 when no position is attended. */
template <class X>
static int attend(const typename X::T* q, const typename X::T* kc, const typename X::T* vc, int64_t khs, int64_t kps,
                  int64_t vhs, int64_t vps, int64_t L, const uint8_t* mask, int64_t H, int64_t Hkv, int64_t D,
                  float scale, typename X::T* out, int nt) {
  int64_t first = -1;
  for (int64_t j = 0; j < L; j++) if (!mask || mask[j]) { first = j; break; }
  if (first < 0) return 1;
  const int64_t rep = H / Hkv;
  const int par = nt > 1 && L * H * D > (int64_t)1 << 18;
  #pragma omp parallel for num_threads(nt) schedule(static) if (par)
  for (int64_t h = 0; h < H; h++) {
    const int64_t g = h / rep;
    float* s = (float*)malloc((size_t)L * sizeof(float));
    float* acc = (float*)calloc((size_t)D, sizeof(float));
    float* qf = (float*)malloc((size_t)D * sizeof(float));
    for (int64_t d = 0; d < D; d++) qf[d] = X::get(q[h * D + d]);
    float mx = -INFINITY;
    for (int64_t j = first; j < L; j++) {
      if (mask && !mask[j]) continue;
      const typename X::T* kj = kc + g * khs + j * kps;
      float a = 0.f;
      #pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; d++) a += qf[d] * X::get(kj[d]);
      s[j] = a * scale; mx = s[j] > mx ? s[j] : mx;
    }
    float sum = 0.f;
    for (int64_t j = first; j < L; j++) {
      if (mask && !mask[j]) continue;
      const float e = expf(s[j] - mx); sum += e;
      const typename X::T* vj = vc + g * vhs + j * vps;
      #pragma omp simd
      for (int64_t d = 0; d < D; d++) acc[d] += e * X::get(vj[d]);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) out[h * D + d] = X::put(acc[d] * inv);
    free(s); free(acc); free(qf);
  }
  return 0;
}

/* One decode step's attention between the projections. q [H*D], k [Hkv*D] are normed (qn/kn weights over groups
   of qg/kg values; null: none) and rotated in place. Static cache (cum != null): k and v are written at position
   p = *cum of the cache, *cum += 1, then attention over the L positions the mask allows. Without cum the caller
   has written the cache (transformers' dynamic layer) and ``attend`` runs alone (``moekit_attend``). cs/sn hold R
   values: rotary on the first R of each head's D. Return codes:
   0 done; 2 p >= L (nothing written: the caller's fallback raises transformers' own error); 1 nothing attended. */
template <class X>
static int attn_static(typename X::T* q, typename X::T* k, const typename X::T* v, const typename X::T* qn,
                       const typename X::T* kn, int64_t qg, int64_t kg, float eps, const typename X::T* cs,
                       const typename X::T* sn, int64_t R, typename X::T* kc, typename X::T* vc, int64_t khs, int64_t kps,
                       int64_t vhs, int64_t vps, int64_t* cum, int64_t L, const uint8_t* mask, int64_t H,
                       int64_t Hkv, int64_t D, float scale, typename X::T* out, int nt) {
  if (cum && (*cum < 0 || *cum >= L)) return 2;
  if (qn) rmsnorm<X>(q, qn, q, H * D / qg, qg, eps);
  if (kn) rmsnorm<X>(k, kn, k, Hkv * D / kg, kg, eps);
  if (cs) { rotary<X>(q, H, D, R, cs, sn); rotary<X>(k, Hkv, D, R, cs, sn); }
  if (!cum) return 0;
  const int64_t p = *cum;
  for (int64_t g = 0; g < Hkv; g++) {
    memcpy(kc + g * khs + p * kps, k + g * D, (size_t)D * sizeof(typename X::T));
    memcpy(vc + g * vhs + p * vps, v + g * D, (size_t)D * sizeof(typename X::T));
  }
  *cum = p + 1;
  return attend<X>(q, kc, vc, khs, kps, vhs, vps, L, mask, H, Hkv, D, scale, out, nt);
}

/* A router's one-token step: logits = W x (fp32 sums rounded to the dtype, like F.linear), softmax in fp32, top-k
   (ties: the lower id), optionally renormalised; scores in the dtype (sf32: fp32, Mixtral's router). */
template <class X>
static void router(const typename X::T* x, const typename X::T* w, int64_t E, int64_t n, int64_t k, int norm, int sf32,
                   typename X::T* logits, void* scores, int64_t* idx) {
  float* p = (float*)malloc((size_t)E * sizeof(float));
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; e++) {
    const typename X::T* we = w + e * n;
    float a = 0.f;
    #pragma omp simd reduction(+ : a)
    for (int64_t c = 0; c < n; c++) a += X::get(we[c]) * X::get(x[c]);
    logits[e] = X::put(a); p[e] = X::get(logits[e]); mx = p[e] > mx ? p[e] : mx;
  }
  float sum = 0.f;
  for (int64_t e = 0; e < E; e++) { p[e] = expf(p[e] - mx); sum += p[e]; }
  for (int64_t e = 0; e < E; e++) p[e] /= sum;
  float top[256]; float tsum = 0.f;
  for (int64_t i = 0; i < k; i++) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++) {
      bool taken = false;
      for (int64_t j = 0; j < i; j++) taken |= idx[j] == e;
      if (!taken && (best < 0 || p[e] > p[best])) best = e;
    }
    idx[i] = best; top[i] = p[best]; tsum += p[best];
  }
  for (int64_t i = 0; i < k; i++) {
    const float v = norm ? top[i] / tsum : top[i];
    if (sf32) ((float*)scores)[i] = v; else ((typename X::T*)scores)[i] = X::put(v);
  }
  free(p);
}

/* torch.topk's order on the CPU (aten's TopKImpl.h): of q [n] (value, index) the k largest first (NaN largest),
   by std::partial_sort when k * 64 <= n, else std::nth_element (sorted: the first k - 1 then sorted too), so the
   ids come in the order, and ties resolve as, transformers' router gets them. */
typedef std::pair<float, int64_t> Ranked;
static void torch_topk(Ranked* q, int64_t n, int64_t k, bool sorted) {
  auto gt = [](const Ranked& x, const Ranked& y) -> bool {
    return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first; };
  if (k * 64 <= n) std::partial_sort(q, q + k, q + n, gt);
  else { std::nth_element(q, q + k - 1, q + n, gt); if (sorted) std::sort(q, q + k - 1, gt); }
}

/* DeepSeek-V3's router (GLM4-MoE, dots1) for one token, as transformers' TopkRouter: logits = W x in fp32 (W: fp32,
   or the dtype), scores = sigmoid(logits); choice = scores + bias; each of G groups scored by the sum of its 2
   best choices, the topk_group best groups kept (the others' choices -inf), top-k of the choices; weights = the
   chosen scores, renormalised (+ 1e-20) when norm, times the scaling; all fp32. logits [E], wts [k], idx [k].
   1 for a layout torch would refuse (groups not dividing E, fewer than 2 experts per group, k over the kept). */
template <class X, class W>
static int router_sigmoid(const typename X::T* x, const typename W::T* w, int64_t E, int64_t n, int64_t k, int norm,
                          const SigmoidRouter* r, float* logits, float* wts, int64_t* idx) {
  const int64_t G = r->groups, per = G > 0 ? E / G : 0, tg = r->topk_group;
  if (G < 1 || E % G || per < 2 || tg < 1 || tg > G || k < 1 || k > tg * per) return 1;
  float* s = (float*)malloc(sizeof(float) * (size_t)(2 * E + G));
  Ranked* q = (Ranked*)malloc(sizeof(Ranked) * (size_t)E);
  if (!s || !q) { free(s); free(q); return 1; }
  float *c = s + E, *gs = c + E;
  const float* bias = (const float*)r->bias;
  for (int64_t e = 0; e < E; e++) {
    const typename W::T* we = w + e * n;
    float a = 0.f;
    #pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < n; i++) a += W::get(we[i]) * X::get(x[i]);
    logits[e] = a; s[e] = 1.f / (1.f + expf(-a)); c[e] = s[e] + bias[e];
  }
  for (int64_t g = 0; g < G; g++) {
    for (int64_t j = 0; j < per; j++) q[j] = Ranked(c[g * per + j], j);
    torch_topk(q, per, 2, true);
    gs[g] = q[0].first + q[1].first;
  }
  for (int64_t g = 0; g < G; g++) q[g] = Ranked(gs[g], g);
  torch_topk(q, G, tg, false);
  for (int64_t g = 0; g < G; g++) gs[g] = 0.f;
  for (int64_t j = 0; j < tg; j++) gs[q[j].second] = 1.f;  /* the kept groups */
  for (int64_t e = 0; e < E; e++) q[e] = Ranked(gs[e / per] != 0.f ? c[e] : -INFINITY, e);
  torch_topk(q, E, k, false);
  float sum = 0.f;
  for (int64_t j = 0; j < k; j++) { idx[j] = q[j].second; wts[j] = s[idx[j]]; sum += wts[j]; }
  if (norm) { const float den = sum + 1e-20f; for (int64_t j = 0; j < k; j++) wts[j] /= den; }
  for (int64_t j = 0; j < k; j++) wts[j] *= r->scaling;
  free(s); free(q);
  return 0;
}

template <class X>
static int router_sigmoid_any(const typename X::T* x, const void* w, int64_t E, int64_t n, int64_t k, int norm,
                              const SigmoidRouter* r, float* logits, float* wts, int64_t* idx) {
  return r->weight_f32 ? router_sigmoid<X, F32>(x, (const float*)w, E, n, k, norm, r, logits, wts, idx)
                       : router_sigmoid<X, X>(x, (const typename X::T*)w, E, n, k, norm, r, logits, wts, idx);
}

/* act = silu(gate) * up for gate = h[0:I], up = h[I:2I] (silu in fp32 rounded, the product rounded, as torch). */
template <class X>
static void silu_mul(const typename X::T* h, int64_t I, typename X::T* act) {
  for (int64_t c = 0; c < I; c++) {
    const float x = X::get(h[c]);
    act[c] = X::put(rnd<X>(x / (1.f + expf(-x))) * X::get(h[I + c]));
  }
}

/* Between a decode step's two expert kernel calls: silu_mul for the k slots of h [k, 2I], each slot's
   down-projection address base + id * stride (0 for ids outside [0, E): the slot adds nothing) and its routing
   weight in fp32 (wf32: the weights are fp32 already). */
template <class X>
static void moe_mid(const typename X::T* h, int64_t k, int64_t I, typename X::T* act, const int64_t* ids,
                    const void* wts, int wf32, int64_t E, int64_t base, int64_t stride, int64_t* wp, float* g) {
  for (int64_t s = 0; s < k; s++) {
    silu_mul<X>(h + s * 2 * I, I, act + s * I);
    wp[s] = ids[s] >= 0 && ids[s] < E ? base + ids[s] * stride : 0;
    g[s] = wf32 ? ((const float*)wts)[s] : X::get(((const typename X::T*)wts)[s]);
  }
}

/* Up to 8 matrices (addresses wp, rows[i] rows each, row stride rs, cols columns) times one input row x, into one
   output [sum rows]: an attention's q, k and v projections in one parallel region (one fork/join, one pass). W: the
   weights' format (X itself, or I8: int8 codes with per-row scales at sp[i], the input quantized per block when qx
   is set, as ``cpu_kernels``' gemv does for an int8 linear: the same blocks, so the same numbers). bp: null, or each
   matrix's bias address (0: none), added to the fp32 sum before the one rounding, as F.linear. */
template <class W, class X>
static int gemv_multi(const int64_t* wp, const int64_t* rows, int64_t m, int64_t rs, const typename X::T* x,
                      int64_t cols, typename X::T* out, int nt, const int64_t* sp = nullptr, int qx = 0,
                      const int64_t* bp = nullptr) {
  if (m < 1 || m > 8) return 1;
  Input<W, X> in;
  if (in.init(x, 1, cols, cols, qx)) return 1;
  int64_t start[9], off[9]; start[0] = 0; off[0] = 0;
  for (int64_t i = 0; i < m; i++) { start[i + 1] = start[i] + (rows[i] + 3) / 4; off[i + 1] = off[i] + rows[i]; }
  int64_t pg[8];  /* each matrix's page order (cpu_kernels' page_rows) */
  for (int64_t i = 0; i < m; i++) pg[i] = page_rows(rs * (int64_t)sizeof(typename W::T), rows[i]);
  const int64_t total = start[m], pf = pf_blocks<W>(cols), ahead = pf ? pf : PF_AHEAD;
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < total; b++) {
    int64_t i = 0; while (b >= start[i + 1]) i++;
    const int64_t p = pg[i], r0 = block_row(b - start[i], p), nr = rows[i] - r0 < 4 ? rows[i] - r0 : 4;
    const int64_t nxt = b + ahead;  /* as gemv: in this matrix (short rows, not in page order), or the next one's */
    if (nxt < total && (pf_blocks<W>(cols, p) || nxt >= start[i + 1])) {
      int64_t i2 = i; while (nxt >= start[i2 + 1]) i2++;
      const int64_t n0 = block_row(nxt - start[i2], pg[i2]);
      prefetch_rows<W>((const typename W::T*)(intptr_t)wp[i2] + n0 * rs, rows[i2] - n0 < 4 ? rows[i2] - n0 : 4,
                       rs * pg[i2], cols);
    }
    float acc[4];
    dot_rows<W, X>((const typename W::T*)(intptr_t)wp[i] + r0 * rs, rs * p, nr, in, 0, acc);
    const typename X::T* sc = sp ? (const typename X::T*)(intptr_t)sp[i] + r0 : nullptr;
    const typename X::T* bias = bp && bp[i] ? (const typename X::T*)(intptr_t)bp[i] + r0 : nullptr;
    for (int64_t j = 0; j < nr; j++) {
      const float v = sc ? acc[j] * X::get(sc[j * p]) : acc[j];
      out[off[i] + r0 + j * p] = X::put(bias ? v + X::get(bias[j * p]) : v);
    }
  }
  return 0;
}

/* Default rotary embedding at one position: cos/sin [2 * half] = cos/sin(pos * inv_freq) (twice) * scaling in fp32,
   rounded to the dtype, as transformers' rotary modules compute them. */
template <class X>
static void rope(const int64_t* pos, const float* inv_freq, int64_t half, float scaling, typename X::T* cs,
                 typename X::T* sn) {
  const float p = (float)*pos;
  for (int64_t d = 0; d < half; d++) {
    const float f = p * inv_freq[d];
    cs[d] = cs[d + half] = X::put(cosf(f) * scaling);
    sn[d] = sn[d + half] = X::put(sinf(f) * scaling);
  }
}

/* A decode step's projections of one input row through up to 3 matrices in one region: weights in the dtype
   (lf = 0; bp: their biases, as gemv_multi) or int8 codes with per-row scales at sp (lf = 1; qx: q8_0-style input
   blocks). */
template <class X>
static int proj(int64_t lf, const int64_t* wp, const int64_t* rows, int64_t m, int64_t rs, const typename X::T* x,
                int64_t cols, typename X::T* out, int nt, const int64_t* sp, int qx, const int64_t* bp = nullptr) {
  return lf ? gemv_multi<I8, X>(wp, rows, m, rs, x, cols, out, nt, sp, qx)
            : gemv_multi<X, X>(wp, rows, m, rs, x, cols, out, nt, nullptr, 0, bp);
}

/* The int4 experts kernel's entry (cpu_kernels_int4's moekit_gemv_int4_<dtype>, its own library: the caller passes
   its address). */
template <class T>
using Int4Fn = int (*)(const uint8_t*, int64_t, int64_t, const uint16_t*, const uint8_t*, int64_t, int64_t,
                       const int64_t*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*, int,
                       int);

/* A whole decoder layer's one-token step with a static cache (OLMoE / Qwen3-MoE / Mixtral / Qwen2-MoE layout): input norm, q/k/v,
   attention (q/k norms, rotary, cache write, single-query attention), o_proj, residual, post-attention norm,
   router, the k experts (gate;up, SiLU, down and weighted sum) and the residual, in one call: between the weight
   kernels' parallel regions no interpreter work runs on the caches they flushed. a: the pointers, sizes and eps
   (struct LayerArgs above, built by fused_decode._layer_args; each field's meaning is next to it there). Weight
   formats, each with the kernel and the numbers of its per-module forward: attn_format for the attention's
   projections, expert_format for the experts. a->extras: null, or the Qwen2-MoE extras (struct Qwen2Extras): the
   biases are added as F.linear does, and sigmoid(gate-scalar . x) * down(silu(gate x) * up x), each step rounded as
   transformers' modules, is added to the routed experts' sum before the residual (on code 4 the shared expert's
   output is at extras->sx_out).
   Returns attn_static's codes (2: the position is past the cache, nothing changed; 1: nothing attended), 3 when
   nothing ran (out of memory, bad formats), 4: stopped after the router (a->offload's experts), 5 when a kernel
   failed after the cache write. */
template <class X>
static int layer_step(const LayerArgs* a) {
  typedef typename X::T T;
  const T* h = (const T*)a->h; T* out = (T*)a->out;
  const int64_t H = a->heads, Hkv = a->kv_heads, D = a->head_dim, Hd = a->hidden, E = a->experts, k = a->top_k,
                I = a->inner;
  const int nt = (int)a->threads;
  const int64_t rq = H * D, rk = Hkv * D, lf = a->attn_format, ef = a->expert_format;
  const Qwen2Extras* xa = (const Qwen2Extras*)a->extras;  /* Qwen2-MoE: q/k/v biases, the shared expert */
  const int64_t Is = xa && xa->sx_down ? xa->sx_inner : 0;
  if (k < 1 || k > 256 || lf < 0 || lf > 1 || ef < 0 || ef > 2 || Is < 0 || (Is && (xa->sx_format < 0 || xa->sx_format > 1)))
    return 3;
  T* sc = (T*)malloc(sizeof(T) * (size_t)(4 * Hd + rq + 2 * rk + rq + E + 3 * k * I + (ef == 2 ? k * Hd : 0)
                                          + (Is ? 3 * Is + 1 + Hd : 0)) + 64);
  float* fs = (float*)malloc(sizeof(float) * (size_t)(2 * k + (a->sigmoid_router ? E : 0)) + 64);
  int64_t* is = (int64_t*)malloc(sizeof(int64_t) * (size_t)(4 * k) + 64);
  if (!sc || !fs || !is) { free(sc); free(fs); free(is); return 3; }
  T *x1 = sc, *o = x1 + Hd, *h2 = o + Hd, *x2 = h2 + Hd, *qkv = x2 + Hd, *att = qkv + rq + 2 * rk, *lg = att + rq,
    *h1 = lg + E, *act = h1 + 2 * k * I, *y = act + k * I, *sh = y + (ef == 2 ? k * Hd : 0), *sa = sh + 2 * Is + 1,
    *sxo = Is && xa->sx_out ? (T*)xa->sx_out : sa + Is;  /* shared expert: gate|up|gate-scalar, act, output */
  float *g = fs, *g2 = fs + k, *lgf = fs + 2 * k;  /* lgf: a sigmoid router's fp32 logits */
  int64_t *idx = is, *wp = is + k, *sidx = is + 2 * k, *sp = is + 3 * k;
  const OffloadExperts* ext = (const OffloadExperts*)a->offload;  /* experts the caller owns: see below */
  const int64_t* eidx = idx;  /* the experts' rows in the banks gate_up/down: expert ids, or slots of ext's table */
  int64_t Eb = E;
  int rc = 0;
  const int64_t phase = a->phase;
  if (a->qkv) qkv = (T*)a->qkv;
  if (phase != 2) {
    rmsnorm<X>(h, (const T*)a->ln1, x1, 1, Hd, a->eps);
    const int64_t wqkv[3] = {a->wq, a->wk, a->wv}, rqkv[3] = {rq, rk, rk},
                  sqkv[3] = {a->q_scale, a->k_scale, a->v_scale};
    rc = proj<X>(lf, wqkv, rqkv, 3, a->qkv_rstride, x1, Hd, qkv, nt, sqkv, (int)a->attn_act_int8,
                 xa ? xa->qkv_bias : nullptr) ? 3 : 0;
  }
  if (!rc && phase == 2)
    rc = attend<X>(qkv, (const T*)a->k_cache, (const T*)a->v_cache, a->k_head_stride, a->k_pos_stride,
                   a->v_head_stride, a->v_pos_stride, a->cache_len, (const uint8_t*)a->mask, H, Hkv, D, a->scale,
                   att, nt);
  else if (!rc)
    rc = attn_static<X>(qkv, qkv + rq, qkv + rq + rk, (const T*)a->q_norm, (const T*)a->k_norm, a->q_group,
                        a->k_group, a->qk_eps, (const T*)a->cos, (const T*)a->sin, a->rotary_dim ? a->rotary_dim : D,
                        (T*)a->k_cache, (T*)a->v_cache,
                        a->k_head_stride, a->k_pos_stride, a->v_head_stride, a->v_pos_stride,
                        phase == 1 ? nullptr : (int64_t*)a->cum_length, a->cache_len, (const uint8_t*)a->mask, H,
                        Hkv, D, a->scale, att, nt);
  if (phase == 1) { free(sc); free(fs); free(is); return rc; }
  const bool attended = !rc;
  if (!rc) {
    const int64_t wo[1] = {a->wo}, ro[1] = {Hd}, so[1] = {a->o_scale};
    rc = proj<X>(lf, wo, ro, 1, a->o_rstride, att, rq, o, nt, so, (int)a->attn_act_int8);
  }
  if (!rc) {
    for (int64_t i = 0; i < Hd; i++) h2[i] = X::put(X::get(h[i]) + X::get(o[i]));
    rmsnorm<X>(h2, (const T*)a->ln2, x2, 1, Hd, a->eps);
    if (Is) {  /* the shared expert: gate, up and the gate scalar in one region, SiLU, down, times the sigmoid (no
                  gate scalar: GLM4-MoE's / DeepSeek-V3's shared experts, added as they are) */
      const int64_t ws[3] = {xa->sx_gate, xa->sx_up, xa->sx_gate_scalar}, rs3[3] = {Is, Is, 1}, wd[1] = {xa->sx_down},
                    rd[1] = {Hd}, *ss = xa->sx_scales, sd[1] = {xa->sx_scales[3]};
      const int qs = (int)xa->sx_act_int8;
      rc = proj<X>(xa->sx_format, ws, rs3, xa->sx_gate_scalar ? 3 : 2, xa->sx_rstride, x2, Hd, sh, nt, ss, qs);
      if (!rc) {
        silu_mul<X>(sh, Is, sa);
        rc = proj<X>(xa->sx_format, wd, rd, 1, xa->sx_down_rstride, sa, Is, sxo, nt, sd, qs);
      }
      if (!rc && xa->sx_gate_scalar) {
        const float sg = rnd<X>(1.f / (1.f + expf(-X::get(sh[2 * Is]))));
        for (int64_t i = 0; i < Hd; i++) sxo[i] = X::put(sg * X::get(sxo[i]));
      }
    }
  }
  if (!rc) {
    const SigmoidRouter* sr = (const SigmoidRouter*)a->sigmoid_router;  /* GLM4-MoE / DeepSeek-V3: fp32 weights */
    if (sr) rc = router_sigmoid_any<X>(x2, (const void*)a->router, E, Hd, k, (int)a->norm_topk, sr, lgf, g, idx) ? 3 : 0;
    else router<X>(x2, (const T*)a->router, E, Hd, k, (int)a->norm_topk, 1, lg, g, idx);
  }
  if (!rc) {
    if (!a->scores_f32) for (int64_t j = 0; j < k; j++) g[j] = rnd<X>(g[j]);  /* scores in the dtype (not Mixtral's fp32) */
    if (ext) {
      /* the MoE input, the residual, the top-k ids and weights (the router's scores: fp32 for Mixtral, else the
         dtype) to the caller; then the experts on the banks gate_up/down of ext->slots slots when ext->table maps
         every chosen expert to a slot, else return 4: the caller computes the experts and the residual add */
      memcpy((T*)ext->moe_in, x2, sizeof(T) * (size_t)Hd);
      memcpy((T*)ext->residual, h2, sizeof(T) * (size_t)Hd);
      memcpy((int64_t*)ext->ids, idx, sizeof(int64_t) * (size_t)k);
      for (int64_t j = 0; j < k; j++)
        if (a->scores_f32) ((float*)ext->weights)[j] = g[j]; else ((T*)ext->weights)[j] = X::put(g[j]);
      const int64_t* table = (const int64_t*)ext->table;
      for (int64_t j = 0; j < k && !rc; j++) {
        sidx[j] = table && idx[j] >= 0 && idx[j] < E ? table[idx[j]] : -1;
        if (sidx[j] < 0 || sidx[j] >= ext->slots) rc = 4;
      }
      eidx = sidx; Eb = ext->slots;
    }
  }
  const int qe = (int)a->expert_act_int8;
  if (!rc) {
    if (ef == 0)
      rc = gemv<X, X>((const T*)a->gate_up, a->gate_up_estride, a->gate_up_rstride, eidx, k, Eb, x2, Hd, k, 2 * I,
                      Hd, nullptr, 0, h1, nt);
    else if (ef == 1)
      rc = gemv<I8, X>((const int8_t*)a->gate_up, a->gate_up_estride, a->gate_up_rstride, eidx, k, Eb, x2, Hd, k,
                       2 * I, Hd, (const T*)a->gate_up_scale, a->gate_up_scale_estride, h1, nt, qe);
    else
      rc = ((Int4Fn<T>)(intptr_t)a->int4_kernel)((const uint8_t*)a->gate_up, a->gate_up_estride, a->gate_up_rstride,
                                                 (const uint16_t*)a->gate_up_scale, (const uint8_t*)a->gate_up_zeros,
                                                 a->gate_up_group_estride, a->gate_up_group_rstride, eidx, k, Eb, x2,
                                                 Hd, k, 2 * I, Hd, a->gate_up_group_size, h1, nt, qe);
  }
  if (!rc) {
    const int64_t esz = ef == 0 ? (int64_t)sizeof(T) : 1;  /* bytes per code of the down projection's bank */
    moe_mid<X>(h1, k, I, act, eidx, g, 1, Eb, a->down, a->down_estride * esz, wp, g2);
    if (ef == 0) rc = gemv_combine<X, X>(wp, a->down_rstride, 1, k, act, I, Hd, I, nullptr, g2, o, nt);
    else if (ef == 1) {
      for (int64_t s = 0; s < k; s++)
        sp[s] = wp[s] ? a->down_scale + eidx[s] * a->down_scale_estride * (int64_t)sizeof(T) : 0;
      rc = gemv_combine<I8, X>(wp, a->down_rstride, 1, k, act, I, Hd, I, sp, g2, o, nt, qe);
    } else {
      /* as expert_forward_int4: each slot's down projection rounded to the dtype, then their weighted sum (fp32,
         rounded once; a slot outside [0, E) adds nothing) */
      rc = ((Int4Fn<T>)(intptr_t)a->int4_kernel)((const uint8_t*)a->down, a->down_estride, a->down_rstride,
                                                 (const uint16_t*)a->down_scale, (const uint8_t*)a->down_zeros,
                                                 a->down_group_estride, a->down_group_rstride, eidx, k, Eb, act, I, 1,
                                                 Hd, I, a->down_group_size, y, nt, qe);
      if (!rc)
        for (int64_t i = 0; i < Hd; i++) {
          float acc = 0.f;
          for (int64_t s = 0; s < k; s++) if (wp[s]) acc += g2[s] * X::get(y[s * Hd + i]);
          o[i] = X::put(acc);
        }
    }
  }
  if (!rc && Is) for (int64_t i = 0; i < Hd; i++) o[i] = X::put(X::get(o[i]) + X::get(sxo[i]));
  if (!rc) for (int64_t i = 0; i < Hd; i++) out[i] = X::put(X::get(h2[i]) + X::get(o[i]));
  else if (attended && rc != 4) rc = 5;  /* a kernel failed after the cache write: the caller cannot fall back */
  free(sc); free(fs); free(is);
  return rc;
}

#define ATTN_ARGS(T) T* q, T* k, const T* v, const T* qn, const T* kn, int64_t qg, int64_t kg, float eps, const T* cs, \
  const T* sn, int64_t R, T* kc, T* vc, int64_t khs, int64_t kps, int64_t vhs, int64_t vps, int64_t* cum, int64_t L, \
  const uint8_t* mask, int64_t H, int64_t Hkv, int64_t D, float scale, T* out, int nt
#define ATTN_PASS q, k, v, qn, kn, qg, kg, eps, cs, sn, R, kc, vc, khs, kps, vhs, vps, cum, L, mask, H, Hkv, D, scale, out, nt
#define ATT_ARGS(T) const T* q, const T* kc, const T* vc, int64_t khs, int64_t kps, int64_t vhs, int64_t vps, int64_t L, \
  const uint8_t* mask, int64_t H, int64_t Hkv, int64_t D, float scale, T* out, int nt
#define ATT_PASS q, kc, vc, khs, kps, vhs, vps, L, mask, H, Hkv, D, scale, out, nt
#define DEFINE(NAME, X) \
  void moekit_rmsnorm_##NAME(const X::T* x, const X::T* w, X::T* out, int64_t groups, int64_t n, float eps) { \
    rmsnorm<X>(x, w, out, groups, n, eps); } \
  int moekit_attn_##NAME(ATTN_ARGS(X::T)) { return attn_static<X>(ATTN_PASS); } \
  int moekit_attend_##NAME(ATT_ARGS(X::T)) { return attend<X>(ATT_PASS); } \
  void moekit_router_##NAME(const X::T* x, const X::T* w, int64_t E, int64_t n, int64_t k, int norm, int sf32, \
                            X::T* logits, void* scores, int64_t* idx) { router<X>(x, w, E, n, k, norm, sf32, logits, scores, idx); } \
  void moekit_moe_mid_##NAME(const X::T* h, int64_t k, int64_t I, X::T* act, const int64_t* ids, const void* wts, \
                             int wf32, int64_t E, int64_t base, int64_t stride, int64_t* wp, float* g) { \
    moe_mid<X>(h, k, I, act, ids, wts, wf32, E, base, stride, wp, g); } \
  int moekit_qkv_##NAME(const int64_t* wp, const int64_t* rows, int64_t m, int64_t rs, const X::T* x, int64_t cols, \
                        X::T* out, int nt, const int64_t* bp) { \
    return gemv_multi<X, X>(wp, rows, m, rs, x, cols, out, nt, nullptr, 0, bp); } \
  void moekit_rope_##NAME(const int64_t* pos, const float* inv_freq, int64_t half, float scaling, X::T* cs, X::T* sn) { \
    rope<X>(pos, inv_freq, half, scaling, cs, sn); } \
  int moekit_router_sigmoid_##NAME(const X::T* x, const void* w, int64_t E, int64_t n, int64_t k, int norm, \
                                   const SigmoidRouter* r, float* logits, float* wts, int64_t* idx) { \
    return router_sigmoid_any<X>(x, w, E, n, k, norm, r, logits, wts, idx); } \
  int moekit_layer_##NAME(const LayerArgs* a) { return layer_step<X>(a); }
extern "C" {
DEFINE(bfloat16, BF16)
DEFINE(float32, F32)
#ifdef __FLT16_MAX__
DEFINE(float16, F16)
#endif
}
"""

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "rmsnorm": (None, [_P, _P, _P, _I, _I, _F]),
    "attn": (_C, [_P, _P, _P, _P, _P, _I, _I, _F, _P, _P, _I, _P, _P, _I, _I, _I, _I, _P, _I, _P, _I, _I, _I, _F, _P,
                  _C]),
    "attend": (_C, [_P, _P, _P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _F, _P, _C]),
    "router": (None, [_P, _P, _I, _I, _I, _C, _C, _P, _P, _P]),
    "qkv": (_C, [ctypes.POINTER(_I), ctypes.POINTER(_I), _I, _I, _P, _I, _P, _C, _P]),
    "rope": (None, [_P, _P, _I, _F, _P, _P]),
    "layer": (_C, [ctypes.POINTER(LayerArgs)]),
    "router_sigmoid": (_C, [_P, _P, _I, _I, _I, _C, ctypes.POINTER(SigmoidRouter), _P, _P, _P]),
    "moe_mid": (None, [_P, _I, _I, _P, _P, _P, _C, _I, _I, _I, _P, _P]),
    # cpu_kernels' decode kernel entries (its library), typed here for plain-int arguments
    "gemv": (_C, [_P, _I, _I, _P, _I, _I, _P, _I, _I, _I, _I, _P, _C]),
    "combine": (_C, [_P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _P, _C]),
}
_fns: dict[str, Callable | None] = {}
calls: collections.Counter = collections.Counter()
"""How many one-token steps each fused op ran in this process ("rmsnorm", "rope", "attention", "qkv", "router",
"experts", "layer"; of the layers with offloaded experts, "layer_slots" ran them on the cache's slots in the native
call and "layer_split" handed them to the engine): which path a model takes (tests, diagnostics)."""


def enabled() -> bool:
    """Whether fused decode ops may be used (``MOEKIT_FUSED_DECODE`` is not 0 and the library builds here)."""
    if os.environ.get("MOEKIT_FUSED_DECODE", "1").strip().lower() in ("0", "false", "no"):
        return False
    return cpu_kernels.load_library(SOURCE, "moekit_fused") is not None


def _fn(op: str, dtype: torch.dtype) -> Callable | None:
    """The entry ``moekit_<op>_<dtype>`` with its argument types set, or None (no library, no such dtype)."""
    key = f"{op}_{_DTYPES.get(dtype)}"
    if key not in _fns:
        lib = (cpu_kernels.load_library() if op in ("gemv", "combine")
               else cpu_kernels.load_library(SOURCE, "moekit_fused"))
        fn = None
        if lib is not None and dtype in _DTYPES:
            try:
                fn = lib[f"moekit_{key}"]  # a fresh function object: its argtypes are this module's alone
            except AttributeError:
                fn = None
        if fn is not None:
            fn.restype, fn.argtypes = _SIGNATURES[op]
        _fns[key] = fn
    return _fns[key]


def _step_ok(x: torch.Tensor) -> bool:
    """A one-token CPU inference step: one row, contiguous, no autograd."""
    return (
        x.device.type == "cpu" and x.numel() == x.shape[-1] and x.is_contiguous()
        and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
    )


# ----- RMSNorm -----
RMSNORM_CLASSES = ("OlmoeRMSNorm", "Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm", "MixtralRMSNorm", "LlamaRMSNorm",
                   "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Glm4MoeRMSNorm", "Dots1RMSNorm",
                   "DeepseekV3RMSNorm")
"""transformers' RMSNorms that compute ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)``."""


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """transformers' RMSNorm of the rows of ``x`` (last dim = ``weight``'s length) in one call, or None when the
    kernel cannot run it (other device or dtypes, non-contiguous input)."""
    fn = _fn("rmsnorm", x.dtype)
    n = weight.shape[-1]
    if fn is None or weight.dtype != x.dtype or x.device.type != "cpu" or not x.is_contiguous() or x.shape[-1] != n \
            or not weight.is_contiguous():
        return None
    out = torch.empty_like(x) if out is None else out
    fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's forward with a one-token CPU inference step in one call; the class's forward otherwise."""
    if _step_ok(hidden_states):
        y = rmsnorm(hidden_states, self.weight, self.variance_epsilon)
        if y is not None:
            calls["rmsnorm"] += 1
            return y
    return type(self).forward(self, hidden_states)


# ----- attention -----
ATTENTION_CLASSES = ("OlmoeAttention", "Qwen3MoeAttention", "Qwen2MoeAttention", "MixtralAttention", "Glm4MoeAttention",
                     "Dots1Attention")
"""Attention modules with the standard q/k/v/o layout whose decode step the fused op runs (others keep theirs); rotary
on the first ``cos.shape[-1]`` values of each head (GLM4-MoE's ``partial_rotary_factor``)."""


def _cache_layer(cache, idx: int):
    """Layer ``idx`` of a transformers cache with a ``layers`` list, or None."""
    layers = getattr(cache, "layers", None)
    return layers[idx] if layers is not None and 0 <= idx < len(layers) else None


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                       cache=None, past_key_values=None, **kwargs):
    """The attention module's decode step fused (see module docstring); its own forward for anything else."""
    cache = cache if cache is not None else past_key_values
    out = _fused_attention(self, hidden_states, position_embeddings, attention_mask, cache, kwargs)
    if out is not None:
        calls["attention"] += 1
        return out, None
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    elif cache is not None:
        kwargs["cache"] = cache
    return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)


_I64x8 = ctypes.c_int64 * 8


def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k and v of a one-token step in one kernel call (views of one buffer) when the three projections are plain
    linears on moekit's kernel (``use_for_linears``; biases, as Qwen2-MoE's, added to the fp32 sums before the one
    rounding, as F.linear); None otherwise (then each projection's forward)."""
    projs = (self.q_proj, self.k_proj, self.v_proj)
    if not all(_kernel_linear(p, h.dtype, h.shape[-1], bias=True) for p in projs) \
            or any(p.weight.stride(0) != projs[0].weight.stride(0) for p in projs):
        return None
    fn = _fn("qkv", h.dtype)
    if fn is None:
        return None
    rows = [p.weight.shape[0] for p in projs]
    buf = h.new_empty(sum(rows))
    biases = _biases(projs)
    if fn(_I64x8(*(p.weight.data_ptr() for p in projs)), _I64x8(*rows), 3, projs[0].weight.stride(0), h.data_ptr(),
          h.shape[-1], buf.data_ptr(), torch.get_num_threads(), biases):
        return None
    q, k, v = buf.split(rows)
    calls["qkv"] += 1
    return q, k, v


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data address, None for no tensor (a null pointer)."""
    return t.data_ptr() if t is not None else None


def _fused_attention(self, h: torch.Tensor, pos_emb, mask, cache, kwargs) -> torch.Tensor | None:
    """The fused decode step's output (after o_proj), or None when this call must take the module's own forward;
    nothing is changed before it is sure to run."""
    if (
        not _step_ok(h) or h.dim() != 3 or pos_emb is None or cache is None or self.training
        or kwargs.get("output_attentions") or getattr(self.config, "clip_qkv", None) is not None
        or self.config._attn_implementation not in ("sdpa", "eager")
    ):
        return None
    layer = _cache_layer(cache, self.layer_idx)
    kind = type(layer).__name__
    if kind not in ("StaticLayer", "DynamicLayer") or not getattr(layer, "is_initialized", False):
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.device.type != "cpu" or mask.numel() != mask.shape[-1]
                             or mask.stride(-1) != 1):
        return None
    if kind == "StaticLayer" and mask is None:  # transformers always masks a static cache's unused tail
        return None
    cos, sin = pos_emb
    D = self.head_dim
    R = cos.numel()  # rotary on the first R values of each head (partial_rotary_factor)
    if cos.dtype != h.dtype or cos.shape[-1] != R or R > D or R % 2 or sin.numel() != R \
            or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    fn = _fn("attn", h.dtype)
    if fn is None:
        return None
    norms = []
    for name in ("q_norm", "k_norm"):
        norm = getattr(self, name, None)
        if norm is None:
            norms.append((None, 0))
        elif type(norm).__name__ in RMSNORM_CLASSES and norm.weight.dtype == h.dtype:
            norms.append((norm.weight, norm.weight.shape[-1]))
        else:
            return None
    eps = float(self.q_norm.variance_epsilon) if norms[0][0] is not None else 0.0
    if norms[1][0] is not None and float(self.k_norm.variance_epsilon) != eps:
        return None
    qkv = _qkv(self, h)
    q, k, v = qkv if qkv is not None else (self.q_proj(h), self.k_proj(h), self.v_proj(h))
    H, Hkv = q.shape[-1] // D, k.shape[-1] // D
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or v.shape[-1] != Hkv * D \
            or H % Hkv or any(w is not None and (H * D if i == 0 else Hkv * D) % g for i, (w, g) in enumerate(norms)):
        return None
    (qn, qg), (kn, kg) = norms
    out = torch.empty_like(q)
    nt = torch.get_num_threads()
    scale = float(self.scaling)
    if kind == "StaticLayer":
        kc, vc = layer.keys, layer.values
        L = kc.shape[2]
        if kc.shape[0] != 1 or kc.dtype != h.dtype or vc.dtype != h.dtype or kc.stride(-1) != 1 or vc.stride(-1) != 1 \
                or mask.shape[-1] != L or layer.cumulative_length.dtype != torch.int64 or kc.shape[-1] != D:
            return None
        rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(qn), _ptr(kn), qg, kg, eps, cos.data_ptr(), sin.data_ptr(),
                R, kc.data_ptr(), vc.data_ptr(), kc.stride(1), kc.stride(2), vc.stride(1), vc.stride(2),
                layer.cumulative_length.data_ptr(), L, mask.data_ptr(), H, Hkv, D, scale, out.data_ptr(), nt)
        if rc == 2:
            return None  # position past the cache: transformers' own forward raises its error
        if rc:
            raise RuntimeError("fused attention attended no position")  # a mask with no True: SDPA would give NaN
    else:
        if layer.keys.dtype != h.dtype:
            return None
        fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(qn), _ptr(kn), qg, kg, eps, cos.data_ptr(), sin.data_ptr(),
           R, None, None, 0, 0, 0, 0, None, 0, None, H, Hkv, D, scale, None, nt)
        keys, values = layer.update(k.view(1, 1, Hkv, D).transpose(1, 2), v.view(1, 1, Hkv, D).transpose(1, 2))
        L = keys.shape[2]
        if (mask is not None and mask.shape[-1] != L) or keys.stride(-1) != 1 or values.stride(-1) != 1:
            qh = q.view(1, 1, H, D).transpose(1, 2)  # (the cache is updated already: finish with torch's attention)
            o = torch.nn.functional.scaled_dot_product_attention(
                qh, keys, values, attn_mask=mask, scale=scale, enable_gqa=Hkv != H)
            out = o.transpose(1, 2).reshape(q.shape)
        elif _fn("attend", h.dtype)(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(1), keys.stride(2),
                                    values.stride(1), values.stride(2), L, _ptr(mask), H, Hkv, D, scale,
                                    out.data_ptr(), nt):
            raise RuntimeError("fused attention attended no position")
    return self.o_proj(out)


# ----- rotary embedding -----
ROTARY_CLASSES = ("OlmoeRotaryEmbedding", "Qwen3MoeRotaryEmbedding", "Qwen2MoeRotaryEmbedding", "MixtralRotaryEmbedding",
                  "Glm4MoeRotaryEmbedding", "Dots1RotaryEmbedding", "DeepseekV3RotaryEmbedding")
"""transformers' rotary modules whose default rope (``rope_type == "default"``) at one position the fused op computes."""


def _rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    """cos and sin of one position (default rope) in one call; the class's forward otherwise (other rope types,
    several positions)."""
    inv = self.inv_freq
    if (getattr(self, "rope_type", None) == "default" and position_ids.numel() == 1
            and position_ids.dtype == torch.int64 and position_ids.device.type == "cpu" and inv.device.type == "cpu"
            and inv.dtype == torch.float32 and inv.is_contiguous() and x.device.type == "cpu"
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)):
        fn = _fn("rope", x.dtype)
        if fn is not None:
            half = inv.shape[0]
            cos, sin = x.new_empty(1, 1, 2 * half), x.new_empty(1, 1, 2 * half)
            fn(position_ids.data_ptr(), inv.data_ptr(), half, float(self.attention_scaling), cos.data_ptr(),
               sin.data_ptr())
            calls["rope"] += 1
            return cos, sin
    return type(self).forward(self, x, position_ids)


# ----- router -----
SIGMOID_ROUTER_TWINS = {"Glm4MoeLiteTopkRouter": "glm4_moe_lite", "Glm4vMoeTextTopkRouter": "glm4v_moe",
                        "GlmMoeDsaTopkRouter": "glm_moe_dsa", "DeepseekV32TopkRouter": "deepseek_v32",
                        "Dots3NoteTextTopkRouter": "dots3_note", "SolarOpenTopkRouter": "solar_open",
                        "HYV4TopkRouter": "hy_v4", "HYV4VLTopkRouter": "hy_v4_vl"}
"""Routers whose ``__init__`` and ``forward`` are ``Glm4MoeTopkRouter``'s, word for word (and their model package)."""
ROUTER_CLASSES = {"OlmoeTopKRouter": "norm_topk_prob", "Qwen3MoeTopKRouter": "norm_topk_prob",
                  "Qwen2MoeTopKRouter": "norm_topk_prob", "MixtralTopKRouter": "mixtral",
                  "Glm4MoeTopkRouter": "sigmoid", "Dots1TopkRouter": "sigmoid", "DeepseekV3TopkRouter": "sigmoid",
                  **dict.fromkeys(SIGMOID_ROUTER_TWINS, "sigmoid")}
"""Routers computing softmax → top-k (→ renormalise) over ``F.linear(x, weight)``, and where their renorm flag is;
"sigmoid": DeepSeek-V3's router (``SigmoidRouter``: sigmoid scores, selection bias, group-limited top-k, fp32)."""


def _sigmoid_router(router: torch.nn.Module, x: torch.Tensor) -> ctypes.Structure | None:
    """``SigmoidRouter`` of a DeepSeek-V3-style router (fp32 or ``x``'s dtype weight [E, H], fp32 selection bias) for
    the one-token input ``x``, or None when the native router would not compute what its forward does."""
    w, bias = router.weight, getattr(router, "e_score_correction_bias", None)
    E, G, tg, k = w.shape[0], getattr(router, "num_group", 0), getattr(router, "topk_group", 0), router.top_k
    if (w.dtype not in (torch.float32, x.dtype) or w.dim() != 2 or not w.is_contiguous() or w.device.type != "cpu"
            or w.shape[1] != x.shape[-1] or not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
            or bias.shape != (E,) or not bias.is_contiguous() or bias.device.type != "cpu"
            or getattr(router, "num_experts", E) != E or not isinstance(G, int) or not isinstance(tg, int)
            or G < 1 or E % G or E // G < 2 or not 1 <= tg <= G or not 1 <= k <= min(tg * (E // G), 256)):
        return None
    return SigmoidRouter(bias=bias.data_ptr(), groups=G, topk_group=tg, weight_f32=int(w.dtype == torch.float32),
                         scaling=float(router.routed_scaling_factor))


def _router_forward(self, hidden_states: torch.Tensor):
    """A top-k router's one-token step in one call (logits, scores, ids as the class returns them); its own forward
    otherwise."""
    w = self.weight
    if ROUTER_CLASSES[type(self).__name__] == "sigmoid":
        sr = _sigmoid_router(self, hidden_states) if _step_ok(hidden_states) else None
        fn = _fn("router_sigmoid", hidden_states.dtype) if sr is not None else None
        if fn is not None:
            logits = torch.empty(1, w.shape[0], dtype=torch.float32)
            scores = torch.empty(1, self.top_k, dtype=torch.float32)
            ids = torch.empty(1, self.top_k, dtype=torch.int64)
            if not fn(hidden_states.data_ptr(), w.data_ptr(), w.shape[0], w.shape[1], self.top_k,
                      int(bool(self.norm_topk_prob)), ctypes.byref(sr), logits.data_ptr(), scores.data_ptr(),
                      ids.data_ptr()):
                calls["router"] += 1
                return logits, scores, ids
        return type(self).forward(self, hidden_states)
    if _step_ok(hidden_states) and w.dtype == hidden_states.dtype and w.is_contiguous() and self.top_k <= 256 \
            and getattr(self, "bias", None) is None:
        fn = _fn("router", w.dtype)
        if fn is not None:
            mixtral = ROUTER_CLASSES[type(self).__name__] == "mixtral"
            logits = hidden_states.new_empty(1, w.shape[0])
            scores = torch.empty(1, self.top_k, dtype=torch.float32 if mixtral else w.dtype)
            ids = torch.empty(1, self.top_k, dtype=torch.int64)
            fn(hidden_states.data_ptr(), w.data_ptr(), w.shape[0], w.shape[1], self.top_k,
               int(mixtral or bool(self.norm_topk_prob)), int(mixtral), logits.data_ptr(), scores.data_ptr(),
               ids.data_ptr())
            calls["router"] += 1
            return logits, scores, ids
    return type(self).forward(self, hidden_states)


# ----- experts (moekit's implementation) -----
EXPERTS_CLASSES = ("OlmoeExperts", "Qwen3MoeExperts", "Qwen2MoeExperts", "MixtralExperts", "Glm4MoeExperts",
                   "Dots1Experts", "DeepseekV3Experts")
"""transformers' experts modules (experts interface, gate;up + SiLU) whose one-token step under moekit's
implementation takes the lean path."""

def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """transformers' experts module with moekit's implementation: a plain one-token step (gate;up, SiLU, no biases,
    float weights) as two kernel calls and one call between them, without moekit's general dispatch (~40 small ops);
    the class's forward (the configured implementation) otherwise. Same kernels, so the same numbers."""
    out = _lean_experts(self, hidden_states, top_k_index, top_k_weights)
    if out is not None:
        calls["experts"] += 1
    return out if out is not None else type(self).forward(self, hidden_states, top_k_index, top_k_weights)


def _lean_module_check(self) -> bool:
    """True when the experts module computes something else than gate;up, SiLU, down and the weighted sum without
    biases (another layout, activation or gate, a post-expert norm, expert parallelism)."""
    from transformers.integrations.moe import _default_apply_gate

    return bool(
        getattr(self, "has_bias", False) or not getattr(self, "has_gate", True)
        or getattr(self, "is_transposed", False) or not getattr(self, "is_concatenated", True)
        or getattr(self, "has_post_expert_norm", False) or getattr(self, "_is_expert_parallel", False)
        or getattr(type(self), "_apply_gate", _default_apply_gate) is not _default_apply_gate
        or type(getattr(self, "act_fn", None)).__name__ != "SiLUActivation"
    )


def _lean_banks_check(w1, w2, x: torch.Tensor) -> bool:
    """True when ``w1`` [E, 2I, H] and ``w2`` [E, H, I] are not the kernel's contiguous CPU banks of ``x``'s dtype."""
    return bool(
        not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor) or w1.dim() != 3 or w2.dim() != 3
        or w1.device.type != "cpu" or w2.device.type != "cpu"
        or w1.dtype != x.dtype or w2.dtype != x.dtype or w1.requires_grad and torch.is_grad_enabled()
        or not (w1.is_contiguous() and w2.is_contiguous()) or w1.shape[0] != w2.shape[0]
        or w1.shape[2] != x.shape[-1] or w2.shape[2] * 2 != w1.shape[1] or w2.shape[1] != x.shape[-1]
    )


def _experts_layout_refused(self, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> bool:
    """True when this call of the experts module is not moekit's one-token gate;up, SiLU, down and weighted sum over
    the router's top-k (whatever format its weights are in)."""
    return bool(
        getattr(self.config, "_experts_implementation", None) != "moekit" or not _step_ok(x) or x.dim() != 2
        or _lean_module_check(self)
        or ids.dtype != torch.int64 or not ids.is_contiguous()
        or ids.shape[0] != 1 or wts.shape != ids.shape or not wts.is_contiguous()
        or wts.dtype not in (torch.float32, x.dtype)
    )


def _lean_experts_check(self, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> bool:
    """True when the lean path cannot run this call (another layout, quantized, offloaded, not moekit's...)."""
    return bool(
        _experts_layout_refused(self, x, ids, wts)
        or any(name.startswith("moekit_") for name in self._buffers)  # quantized experts (int8, int4)
        or _lean_banks_check(getattr(self, "gate_up_proj", None), getattr(self, "down_proj", None), x)
    )


def _lean_experts(self, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor | None:
    if _lean_experts_check(self, x, ids, wts):
        return None
    w1, w2 = self.gate_up_proj, self.down_proj
    gemv, mid, combine = _fn("gemv", x.dtype), _fn("moe_mid", x.dtype), _fn("combine", x.dtype)
    if gemv is None or mid is None or combine is None:
        return None
    k = ids.shape[1]
    E, R1, H = w1.shape
    inner = R1 // 2
    nt = torch.get_num_threads()
    h = x.new_empty(k, R1)
    if gemv(w1.data_ptr(), w1.stride(0), w1.stride(1), ids.data_ptr(), k, E, x.data_ptr(), H, k, R1, H,
            h.data_ptr(), nt):
        return None
    act = x.new_empty(k, inner)
    wp = torch.empty(k, dtype=torch.int64)
    g = torch.empty(k, dtype=torch.float32)
    mid(h.data_ptr(), k, inner, act.data_ptr(), ids.data_ptr(), wts.data_ptr(), int(wts.dtype == torch.float32), E,
        w2.data_ptr(), w2.stride(0) * w2.element_size(), wp.data_ptr(), g.data_ptr())
    out = x.new_empty(1, w2.shape[1])
    if combine(wp.data_ptr(), w2.stride(1), 1, k, act.data_ptr(), inner, w2.shape[1], inner, None, g.data_ptr(),
               out.data_ptr(), nt):
        return None
    return out


# ----- a whole decoder layer -----
SHARED_EXPERT_CLASSES = ("Qwen2MoeMLP", "Glm4MoeMLP", "Dots1MLP")
"""Shared-expert MLPs computing ``down(act(gate(x)) * up(x))`` with three bias-free linears."""
LAYER_CLASSES = ("OlmoeDecoderLayer", "Qwen3MoeDecoderLayer", "MixtralDecoderLayer", "Qwen2MoeDecoderLayer",
                 "Glm4MoeDecoderLayer", "Dots1DecoderLayer")
"""Decoder layers (norm → attention → residual → norm → sparse MoE block → residual) whose one-token step runs as one
native call (two with a dynamic cache) when every piece qualifies for its own fused op. Qwen2-MoE's q/k/v biases and
shared expert (``SHARED_EXPERT_BLOCKS``), GLM4-MoE's partial rotary and DeepSeek-V3-style router (``SigmoidRouter``)
are optional parts of the same step; dense layers (``first_k_dense_replace``) take the per-module path."""
MOE_BLOCKS = ("OlmoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
              "Glm4MoeMoE", "Dots1MoE")
SHARED_EXPERT_BLOCKS = {"Qwen2MoeSparseMoeBlock": ("shared_expert", "shared_expert_gate"),
                        "Glm4MoeMoE": ("shared_experts", None), "Dots1MoE": ("shared_experts", None)}
"""MoE blocks that add a shared expert (a gate/up/down SiLU MLP) to the routed experts' sum: its attribute and that
of its one-row sigmoid gate (Qwen2-MoE: ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``; None: added as it
is); the others have no shared expert."""
_SLOTS: dict = {}

EXPERTS_PROVIDER = "moekit_experts_provider"
"""An experts module whose weights someone else holds (the offload engine: ``moekit.serve``) carries an object under
this attribute, and a whole-layer step then runs up to the router in the native call and hands the experts to it:

- ``forward(module, x, ids, weights) -> Tensor``: the experts' output for the MoE input ``x`` [1, H] and the router's
  top-k ``ids`` and ``weights`` [1, k] (what the experts module's forward would return);
- ``slot_bank() -> SlotBank | None``: banks the native call may run the experts on itself (same kernels), with
  their expert → slot table and the lock that keeps the table true during the call; None: ``forward`` always;
- ``slot_hits(ids)``: the lock held, right after a call that ran every expert of ``ids`` [1, k] on the slot bank:
  the bookkeeping of a lookup that found them all (counts, recency);
- ``after_hits(x)``: after that, the lock released (prediction, prefetch)."""


class SlotBank(NamedTuple):
    """Banks of ``slots`` experts (``gate_up`` [slots, 2I, H], ``down`` [slots, H, I]) with ``table`` (int64 [E]:
    expert → slot, -1 for experts not usable now) and the ``lock`` under which the table does not change. Packed int4
    slots: ``int4`` holds their tensors by ``INT4_BUFFERS`` name (``gate_up``/``down`` are then their codes)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    table: torch.Tensor
    lock: Any
    int4: dict[str, torch.Tensor] | None = None


class _Offload(NamedTuple):
    """A whole-layer step's offloaded experts: the ``OffloadExperts`` struct (alive until the call is done), the
    provider, its slot bank (None: the call stops after the router), the experts module and the buffers the native
    call fills (MoE input, residual, top-k ids and weights; the shared expert's output or None)."""

    args: ctypes.Structure
    provider: Any
    bank: SlotBank | None
    experts: torch.nn.Module
    x2: torch.Tensor
    h2: torch.Tensor
    ids: torch.Tensor
    wts: torch.Tensor
    so: torch.Tensor | None


def _linear_weights(proj: torch.nn.Module, dtype: torch.dtype, cols: int,
                    bias: bool = False) -> tuple[int, torch.Tensor, int] | None:
    """A bias-free nn.Linear whose one-row forward is one of moekit's decode kernels, as (format, weight rows, scale
    address): 0 = its weight in ``dtype`` on the kernel (``use_for_linears``); 1 = int8 codes with per-row scales in
    ``dtype`` (``quantize_linears_int8``). Rows contiguous, ``cols`` of them; None for anything else. ``bias``: a
    format-0 linear may have a bias in ``dtype`` (``layer_step`` adds it as F.linear does; int8 linears add theirs
    after the kernel's rounding, which the native step does not do)."""
    # (a decode step checks this for 4 projections per layer: the modules' dicts directly, not nn.Module's getattr)
    b = proj._parameters.get("bias")
    if type(proj) is not torch.nn.Linear or (b is not None and not bias):
        return None
    fwd = getattr(proj.__dict__.get("forward"), "__func__", None)
    if fwd is cpu_kernels._gemv_linear_forward:
        w, fmt, scale = proj._parameters.get("weight"), 0, None
        if w is None:
            return None
    elif fwd is int8_linear_forward:
        w, scale = proj._buffers.get(INT8_LINEAR_BUFFERS[0]), proj._buffers.get(INT8_LINEAR_BUFFERS[1])
        if (not isinstance(w, torch.Tensor) or not isinstance(scale, torch.Tensor) or w.dtype != torch.int8
                or w.dim() != 2 or scale.dtype != dtype or scale.shape != w.shape[:1] or scale.device.type != "cpu"
                or not scale.is_contiguous()):
            return None
        fmt = 1
    else:
        return None
    if w.dtype != (dtype if fmt == 0 else torch.int8) or w.device.type != "cpu" or w.stride(1) != 1 \
            or w.shape[1] != cols:
        return None
    if b is not None and (fmt != 0 or b.dtype != dtype or b.device.type != "cpu" or not b.is_contiguous()
                          or b.shape != w.shape[:1]):
        return None
    return fmt, w, scale.data_ptr() if scale is not None else 0


_INT4_ENTRIES: dict = {}


def _int4_entry(dtype: torch.dtype) -> int | None:
    """The address of the int4 experts kernel for ``dtype`` (its own library, ``cpu_kernels_int4``), which
    ``layer_step`` calls through a pointer; None without it."""
    if dtype not in _INT4_ENTRIES:
        name = _DTYPES.get(dtype)
        fn = cpu_kernels_int4._fn(f"moekit_gemv_int4_{name}") if name else None
        _INT4_ENTRIES[dtype] = ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None
    return _INT4_ENTRIES[dtype]


def _bank_fields(w1: torch.Tensor, w2: torch.Tensor, inner: int) -> dict[str, int]:
    """``LayerArgs``' fields of the gate;up bank ``w1`` and the down bank ``w2`` (experts' inner size ``inner``)."""
    return {"gate_up": w1.data_ptr(), "gate_up_estride": w1.stride(0), "gate_up_rstride": w1.stride(1),
            "down": w2.data_ptr(), "down_estride": w2.stride(0), "down_rstride": w2.stride(1), "inner": inner}


def _expert_banks(experts: torch.nn.Module, x: torch.Tensor, num_experts: int) -> dict[str, int] | None:
    """The experts' weights as ``layer_step`` reads them for the MoE input ``x`` [1, H]: ``LayerArgs``' fields of the
    banks (``_bank_fields``) and of their format (``expert_format`` and its scales, zero points, strides...; the
    others stay 0), or None when the decode kernels of their per-module forward would not run them. Formats as
    moekit's experts forward picks them: packed int4 (``quantize_experts_int4``, a packed load), else int8
    (``quantize_experts_int8``), else float."""
    buffers = experts._buffers
    if INT4_BUFFERS[0] in buffers:
        return _int4_bank_fields(buffers, x, num_experts)
    return _int8_or_float_banks(experts, x, num_experts)


def _int4_bank_fields(buffers: dict, x: torch.Tensor, num_experts: int) -> dict[str, int] | None:
    """``LayerArgs``' fields of packed int4 banks (``INT4_BUFFERS`` in ``buffers``: an experts module's, or an expert
    cache's slots) of ``num_experts`` experts (or slots) for the MoE input ``x`` [1, H]; None when the int4 kernel
    would not run them."""
    dtype, hidden = x.dtype, x.shape[-1]
    q1, s1, z1, q2, s2, z2 = (buffers.get(n) for n in INT4_BUFFERS)
    if any(t is None for t in (s1, z1, q2, s2, z2)):
        return None
    fn = _int4_entry(dtype)
    if fn is None or q2.dim() != 3:
        return None
    inner = 2 * q2.shape[2]
    groups = []
    for q, sc, z, rows, cols in ((q1, s1, z1, 2 * inner, hidden), (q2, s2, z2, hidden, inner)):
        if (q.dtype != torch.uint8 or sc.dtype != torch.float16 or z.dtype != torch.uint8 or q.dim() != 3
                or sc.dim() != 3 or q.shape != (num_experts, rows, cols // 2) or q.stride(-1) != 1
                or sc.shape != z.shape or sc.shape[:2] != q.shape[:2] or sc.stride() != z.stride()
                or sc.stride(-1) != 1 or any(t.device.type != "cpu" for t in (q, sc, z))):
            return None
        g = sc.shape[2]
        if g < 1 or cols % g or (cols // g) % 2:  # the int4 kernel's group sizes: even, whole groups per row
            return None
        groups.append(cols // g)
    qx = int(cpu_kernels_int4.int4_activations() == "int8")
    return {**_bank_fields(q1, q2, inner), "expert_format": 2, "gate_up_scale": s1.data_ptr(),
            "down_scale": s2.data_ptr(), "expert_act_int8": qx, "gate_up_zeros": z1.data_ptr(),
            "down_zeros": z2.data_ptr(), "gate_up_group_estride": s1.stride(0),
            "gate_up_group_rstride": s1.stride(1), "down_group_estride": s2.stride(0),
            "down_group_rstride": s2.stride(1), "gate_up_group_size": groups[0], "down_group_size": groups[1],
            "int4_kernel": fn}


def _int8_or_float_banks(experts: torch.nn.Module, x: torch.Tensor, num_experts: int) -> dict[str, int] | None:
    """``_expert_banks`` for experts that are not packed int4: int8 (``quantize_experts_int8``) or float."""
    dtype, hidden = x.dtype, x.shape[-1]
    buffers = experts._buffers
    if INT8_BUFFERS[0] in buffers:
        q1, s1, q2, s2 = (buffers.get(n) for n in INT8_BUFFERS)
        if any(t is None for t in (s1, q2, s2)) or q2.dim() != 3:
            return None
        inner = q2.shape[2]
        for q, sc, rows, cols in ((q1, s1, 2 * inner, hidden), (q2, s2, hidden, inner)):
            if (q.dtype != torch.int8 or q.shape != (num_experts, rows, cols) or q.stride(-1) != 1
                    or sc.dtype != dtype or sc.shape != q.shape[:2] or sc.stride(-1) != 1
                    or q.device.type != "cpu" or sc.device.type != "cpu"):
                return None
        qx = int(cpu_kernels.int8_activations() == "int8")
        return {**_bank_fields(q1, q2, inner), "expert_format": 1, "gate_up_scale": s1.data_ptr(),
                "gate_up_scale_estride": s1.stride(0), "down_scale": s2.data_ptr(), "down_scale_estride": s2.stride(0),
                "expert_act_int8": qx}
    if any(name.startswith("moekit_") for name in buffers):  # another moekit format
        return None
    w1, w2 = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if _lean_banks_check(w1, w2, x) or w1.shape[0] != num_experts:
        return None
    return _bank_fields(w1, w2, w2.shape[2])


def _kernel_linear(proj: torch.nn.Module, dtype: torch.dtype, cols: int, bias: bool = False) -> bool:
    """An nn.Linear on moekit's kernel (``use_for_linears``) with contiguous rows of ``cols`` in ``dtype``; without a
    bias, or (``bias``) with a contiguous one in ``dtype``, which the native calls add as F.linear does."""
    w = getattr(proj, "weight", None)
    b = getattr(proj, "bias", None)
    return (type(proj) is torch.nn.Linear and w.dtype == dtype and w.device.type == "cpu"
            and w.stride(1) == 1 and w.shape[1] == cols
            and (b is None or (bias and b.dtype == dtype and b.device.type == "cpu" and b.is_contiguous()
                               and b.shape == w.shape[:1]))
            and getattr(proj.__dict__.get("forward"), "__func__", None) is cpu_kernels._gemv_linear_forward)


def _biases(projs) -> ctypes.Array | None:
    """The biases' addresses of ``projs`` for ``gemv_multi`` (0: none), or None (a null pointer) when none has one."""
    if all(p.bias is None for p in projs):
        return None
    return _I64x8(*(p.bias.data_ptr() if p.bias is not None else 0 for p in projs))


def _intercepted(modules: list[torch.nn.Module], block: torch.nn.Module) -> bool:
    """Whether something may need to see a submodule's call, which a whole-layer step would bypass: a forward hook,
    or a forward set on a module instance that is not one of this module's swaps or the linears' kernel (routing
    controls and recorders, ``moekit.route`` / ``record``, wrap the router's forward or the MoE block's
    ``route_tokens_to_experts``). Then each module's own forward runs, through the hook or the wrapper."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    if "route_tokens_to_experts" in block.__dict__:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or not _own_forward(m) for m in modules)


def _own_forward(module: torch.nn.Module) -> bool:
    """The module runs its class's forward or one moekit swapped in (this module's, the linears' kernel)."""
    fwd = module.__dict__.get("forward")
    return fwd is None or getattr(fwd, "__func__", None) in _SWAPPED


def _layer_args(self, h: torch.Tensor, mask, cache, pos_emb) -> tuple | None:
    """The arguments of ``layer_step`` for this call, or None when any piece would take another path."""
    attn, mlp = self.self_attn, self.mlp
    router, experts = getattr(mlp, "gate", None), getattr(mlp, "experts", None)
    ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
    sx_name, sg_name = SHARED_EXPERT_BLOCKS.get(type(mlp).__name__, (None, None))
    shared = sx_name is not None
    sx = getattr(mlp, sx_name, None) if shared else None
    sg = getattr(mlp, sg_name, None) if sg_name is not None else None
    if (type(router).__name__ not in ROUTER_CLASSES or type(experts).__name__ not in EXPERTS_CLASSES
            or type(mlp).__name__ not in MOE_BLOCKS
            or self.training or mlp.training or pos_emb is None
            or (mask is not None and (mask.dtype != torch.bool or mask.numel() != mask.shape[-1]
                                      or mask.stride(-1) != 1 or mask.device.type != "cpu"))
            or (shared and (sx is None or (sg_name is not None and sg is None)))
            or _intercepted([attn, mlp, router, experts, ln1, ln2, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                             *((sx, *sx.children()) if shared else ()), *((sg,) if sg is not None else ())], mlp)):
        return None
    layer = _cache_layer(cache, attn.layer_idx)
    kind = type(layer).__name__
    if kind not in ("StaticLayer", "DynamicLayer") or not getattr(layer, "is_initialized", False):
        return None
    dt, Hd = h.dtype, h.shape[-1]
    D = attn.head_dim
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    if any(type(n).__name__ not in RMSNORM_CLASSES or n.weight.dtype != dt or not n.weight.is_contiguous()
           for n in (ln1, ln2, *[n for n in norms if n is not None])) or ln1.variance_epsilon != ln2.variance_epsilon:
        return None
    if (norms[0] is None) != (norms[1] is None) or (norms[0] is not None
                                                      and norms[0].variance_epsilon != norms[1].variance_epsilon):
        return None
    if getattr(attn.config, "clip_qkv", None) is not None or attn.config._attn_implementation not in ("sdpa", "eager"):
        return None
    lq, lk, lv = (_linear_weights(p, dt, Hd, bias=True) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    lo = _linear_weights(attn.o_proj, dt, lq[1].shape[0]) if lq is not None else None
    if lq is None or lk is None or lv is None or lo is None or not lq[0] == lk[0] == lv[0] == lo[0]:
        return None  # (one format for the four projections: the kernel takes q, k and v in one region)
    q, k, v, o = lq[1], lk[1], lv[1], lo[1]
    if k.stride(0) != q.stride(0) or v.stride(0) != q.stride(0) or o.shape[0] != Hd:
        return None
    H, Hkv = q.shape[0] // D, k.shape[0] // D
    if q.shape[0] != H * D or k.shape[0] != Hkv * D or v.shape[0] != Hkv * D or H % Hkv:
        return None
    qg, kg = (norms[0].weight.shape[-1], norms[1].weight.shape[-1]) if norms[0] is not None else (0, 0)
    if qg and ((H * D) % qg or (Hkv * D) % kg):
        return None
    cos, sin = pos_emb
    R = cos.numel()  # rotary on the first R values of each head (partial_rotary_factor)
    kc, vc = layer.keys, layer.values
    static = kind == "StaticLayer"
    # a static cache's mask covers its whole length; a dynamic one's the keys after this step's append (or is None)
    mask_len = kc.shape[2] if static else kc.shape[2] + 1
    if (cos.dtype != dt or R > D or R % 2 or cos.shape[-1] != R or sin.numel() != R
            or not (cos.is_contiguous() and sin.is_contiguous()) or kc.shape[0] != 1
            or kc.dtype != dt or vc.dtype != dt or kc.shape[-1] != D or kc.stride(-1) != 1 or vc.stride(-1) != 1
            or (mask is None and static) or (mask is not None and mask.shape[-1] != mask_len)
            or (static and layer.cumulative_length.dtype != torch.int64)):
        return None
    rw = router.weight
    kind = ROUTER_CLASSES[type(router).__name__]
    mixtral, sr = kind == "mixtral", None
    if kind == "sigmoid":  # DeepSeek-V3's router: fp32 weights out (as Mixtral's scores)
        sr = _sigmoid_router(router, h)
        if sr is None:
            return None
    elif rw.dtype != dt or not rw.is_contiguous() or getattr(router, "bias", None) is not None or rw.shape[1] != Hd:
        return None
    xa = _qwen2_extras(attn, sx, sg, dt, Hd) if shared or any(
        p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)) else None
    if xa is False:
        return None
    key = (router.top_k, torch.float32 if mixtral or sr is not None else dt)
    if key not in _SLOTS:  # stand-ins with the shapes and dtypes the router would hand the experts
        _SLOTS[key] = (torch.zeros(1, key[0], dtype=torch.int64), torch.zeros(1, key[0], dtype=key[1]))
    provider, bank = None, None
    x2 = h.view(1, Hd)
    banks = None if _experts_layout_refused(experts, x2, *_SLOTS[key]) else _expert_banks(experts, x2, rw.shape[0])
    if banks is None:
        provider = getattr(experts, EXPERTS_PROVIDER, None)  # offloaded: the experts are the provider's
        if provider is None:
            return None
        bank = provider.slot_bank()
        if bank is not None and (_lean_module_check(experts) or bank.table.dtype != torch.int64
                                 or not bank.table.is_contiguous() or bank.table.numel() != rw.shape[0]):
            bank = None
        banks = None
        if bank is not None and bank.int4 is not None:  # packed int4 slots: the int4 kernel on them
            banks = _int4_bank_fields(bank.int4, x2, bank.gate_up.shape[0])
        elif bank is not None and not _lean_banks_check(bank.gate_up, bank.down, h):
            banks = _bank_fields(bank.gate_up, bank.down, bank.down.shape[2])
        if banks is None:  # no slot bank: the native call stops after the router
            bank = None
            banks = _bank_fields(*(torch.empty(0, 0, 0, dtype=dt),) * 2, 0)
    a = LayerArgs(
        h=h.data_ptr(), ln1=ln1.weight.data_ptr(), ln2=ln2.weight.data_ptr(),
        wq=q.data_ptr(), wk=k.data_ptr(), wv=v.data_ptr(), wo=o.data_ptr(),
        q_norm=norms[0].weight.data_ptr() if qg else 0, k_norm=norms[1].weight.data_ptr() if qg else 0,
        q_group=qg, k_group=kg, cos=cos.data_ptr(), sin=sin.data_ptr(), k_cache=kc.data_ptr(), v_cache=vc.data_ptr(),
        k_head_stride=kc.stride(1), k_pos_stride=kc.stride(2), v_head_stride=vc.stride(1), v_pos_stride=vc.stride(2),
        cum_length=layer.cumulative_length.data_ptr() if static else 0, cache_len=kc.shape[2],
        mask=mask.data_ptr() if mask is not None else 0,
        heads=H, kv_heads=Hkv, head_dim=D, hidden=Hd, router=rw.data_ptr(), experts=rw.shape[0], top_k=router.top_k,
        norm_topk=int(mixtral or bool(router.norm_topk_prob)), scores_f32=int(mixtral or sr is not None),
        threads=torch.get_num_threads(), qkv_rstride=q.stride(0), o_rstride=o.stride(0),
        attn_format=lq[0], q_scale=lq[2], k_scale=lk[2], v_scale=lv[2], o_scale=lo[2],
        attn_act_int8=int(lq[0] == 1 and cpu_kernels.int8_activations() == "int8"), **banks,
        extras=ctypes.addressof(xa) if xa is not None else 0,
        sigmoid_router=ctypes.addressof(sr) if sr is not None else 0, rotary_dim=R,
        eps=ln1.variance_epsilon, qk_eps=norms[0].variance_epsilon if norms[0] is not None else 0.0,
        scale=attn.scaling,
    )
    ext = None
    if provider is not None:  # the router's output to these buffers (see EXPERTS_PROVIDER)
        k = router.top_k
        x2, h2 = h.new_empty(1, Hd), h.new_empty(h.shape)
        so = None
        if xa is not None and xa.sx_down:  # the shared expert's output too: the caller adds it to the engine's experts
            so = h.new_empty(1, Hd)
            xa.sx_out = so.data_ptr()
        ids, wts = torch.empty(1, k, dtype=torch.int64), torch.empty(1, k, dtype=key[1])
        e = OffloadExperts(table=bank.table.data_ptr() if bank is not None else 0, moe_in=x2.data_ptr(),
                           residual=h2.data_ptr(), ids=ids.data_ptr(), weights=wts.data_ptr(),
                           slots=bank.gate_up.shape[0] if bank is not None else 0)
        a.offload = ctypes.addressof(e)
        ext = _Offload(e, provider, bank, experts, x2, h2, ids, wts, so)
    return a, (None if static else (layer, H * D, Hkv, D)), ext, (xa, sr)


def _qwen2_extras(attn, sx, sg, dtype: torch.dtype, hidden: int) -> ctypes.Structure | bool:
    """``layer_step``'s ``Qwen2Extras`` for Qwen2-MoE (GLM4-MoE, dots1): the q/k/v biases and the shared expert (``sx``:
    gate/up/down SiLU MLP on moekit's linear kernel; ``sg``: its one-row sigmoid gate, None: ungated), or False when
    the shared expert does not fit the native step (then the per-module path)."""
    xa = Qwen2Extras(qkv_bias=(ctypes.c_int64 * 3)(
        *(p.bias.data_ptr() if p.bias is not None else 0 for p in (attn.q_proj, attn.k_proj, attn.v_proj))))
    if sx is None:
        return xa
    gp, up, dp = (getattr(sx, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if type(sx).__name__ not in SHARED_EXPERT_CLASSES or type(getattr(sx, "act_fn", None)).__name__ != "SiLUActivation":
        return False
    lg, lu, ls = (_linear_weights(p, dtype, hidden) if p is not None else None for p in (gp, up, sg))
    if lg is None or lu is None or (sg is not None and ls is None):
        return False
    inner = lg[1].shape[0]
    ld = _linear_weights(dp, dtype, inner)
    if (ld is None or not lg[0] == lu[0] == ld[0] == (ls[0] if ls is not None else lg[0])  # one format (one region)
            or lu[1].shape[0] != inner or ld[1].shape[0] != hidden or lu[1].stride(0) != lg[1].stride(0)
            or (ls is not None and (ls[1].shape[0] != 1 or ls[1].stride(0) != lg[1].stride(0)))):
        return False
    xa.sx_gate, xa.sx_up, xa.sx_down = (lw[1].data_ptr() for lw in (lg, lu, ld))
    xa.sx_gate_scalar = ls[1].data_ptr() if ls is not None else 0
    xa.sx_inner, xa.sx_rstride, xa.sx_down_rstride = inner, lg[1].stride(0), ld[1].stride(0)
    xa.sx_format = lg[0]
    xa.sx_scales = (ctypes.c_int64 * 4)(lg[2], lu[2], ls[2] if ls is not None else 0, ld[2])
    xa.sx_act_int8 = int(lg[0] == 1 and cpu_kernels.int8_activations() == "int8")
    return xa


def _call_with_slots(fn: Callable, a: ctypes.Structure, ext: _Offload | None) -> int:
    """``layer_step`` (its last phase); with an offloaded slot bank, under the bank's lock (no slot changes during the
    call) and, when it ran every expert on the slots, the provider's bookkeeping of those hits before the lock goes."""
    bank = ext.bank if ext is not None else None
    with bank.lock if bank is not None else contextlib.nullcontext():
        rc = fn(ctypes.byref(a))
        if rc == 0 and bank is not None:
            ext.provider.slot_hits(ext.ids)
    return rc


def _layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                   use_cache=False, position_embeddings=None, past_key_values=None, **kwargs):
    """A decoder layer's one-token step in one native call (``layer_step``; a dynamic cache: two, around
    transformers' append to the cache); the class's forward (with the modules' own fused ops where they apply) for
    anything else."""
    cache = cache if cache is not None else past_key_values
    if _step_ok(hidden_states) and hidden_states.dim() == 3 and cache is not None \
            and not kwargs.get("output_attentions") and not kwargs.get("output_router_logits"):
        fn = _fn("layer", hidden_states.dtype)
        args = _layer_args(self, hidden_states, attention_mask, cache, position_embeddings) if fn is not None else None
        if args is not None:
            a, dynamic, ext, _xa = args  # (_xa: a.extras' and a.sigmoid_router's structs, alive until the calls are done)
            out = torch.empty_like(hidden_states)
            a.out = out.data_ptr()
            rc = 0
            bank = ext.bank if ext is not None else None
            if dynamic is not None:  # up to rotary, transformers' append to the dynamic layer, then the rest
                layer, rq, Hkv, D = dynamic
                qkv = hidden_states.new_empty(rq + 2 * Hkv * D)
                a.qkv, a.phase = qkv.data_ptr(), 1
                rc = fn(ctypes.byref(a)) and 3  # (nothing changed yet: the class's forward then)
                if rc == 0:
                    k = qkv[rq:rq + Hkv * D].view(1, 1, Hkv, D).transpose(1, 2)
                    v = qkv[rq + Hkv * D:].view(1, 1, Hkv, D).transpose(1, 2)
                    keys, values = layer.update(k, v)
                    a.k_cache, a.v_cache, a.cache_len, a.phase = keys.data_ptr(), values.data_ptr(), keys.shape[2], 2
                    a.k_head_stride, a.k_pos_stride = keys.stride(1), keys.stride(2)
                    a.v_head_stride, a.v_pos_stride = values.stride(1), values.stride(2)
                    rc = _call_with_slots(fn, a, ext)
                    if rc not in (0, 4):
                        raise RuntimeError("fused decoder layer failed after the cache update")
            else:
                rc = _call_with_slots(fn, a, ext)
            if rc == 0 and bank is not None:
                calls["layer_slots"] += 1
                ext.provider.after_hits(ext.x2)
            if rc == 4:  # the experts are the provider's (a miss, or no slot bank): then the residual add
                moe = ext.provider.forward(ext.experts, ext.x2, ext.ids, ext.wts)
                if ext.so is not None:  # + the shared expert's output (the native call's), rounded as transformers'
                    moe = moe.view(ext.so.shape) + ext.so
                torch.add(ext.h2, moe.view(ext.h2.shape), out=out)
                calls["layer_split"] += 1
                rc = 0
            if rc == 0:
                calls["layer"] += 1
                return out
            if rc == 1:
                raise RuntimeError("fused attention attended no position")
            if rc == 5:
                raise RuntimeError("fused decoder layer failed after the cache update")
            # 2 (position past the cache) or 3 (out of memory): nothing changed; the class's forward handles it
    return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)


_SWAPPED = frozenset((_rmsnorm_forward, _attention_forward, _router_forward, _experts_forward, _rotary_forward,
                      _layer_forward, cpu_kernels._gemv_linear_forward, int8_linear_forward))
"""The forwards moekit sets on module instances for decode (a whole-layer step may stand in for them)."""


def swapped_forward(module: torch.nn.Module) -> Callable | None:
    """The module's forward when it is one of this module's swaps (``use_fused_decode``), else None: for callers that
    run a module without its hooks or wrappers (the offload engine's cross-layer prediction runs the next router)
    and want its one-token step in one call; the swap runs the class's forward for anything else."""
    fwd = module.__dict__.get("forward")
    return fwd if getattr(fwd, "__func__", None) in _SWAPPED and fwd.__func__ is not cpu_kernels._gemv_linear_forward \
        else None


def runs_whole_layers(model: torch.nn.Module) -> bool:
    """Whether ``use_fused_decode`` gave a decoder layer of ``model`` its whole-layer step, whose static-cache step
    writes the cache in place (a dynamic cache costs it transformers' append, a copy of the whole cache per step):
    ``moekit.generation``'s decoder then keeps a static cache."""
    return any(getattr(m.__dict__.get("forward"), "__func__", None) is _layer_forward for m in model.modules())


def use_fused_decode(model: torch.nn.Module, enable: bool = True) -> int:
    """Swap the forwards of ``model``'s RMSNorms, rotary embeddings, attention modules, top-k routers and experts of
    the supported classes (``RMSNORM_CLASSES``, ``ROTARY_CLASSES``, ``ATTENTION_CLASSES``, ``ROUTER_CLASSES``,
    ``EXPERTS_CLASSES``) for their fused decode step; returns how many
    modules changed (0 when ``MOEKIT_FUSED_DECODE=0`` or no compiler). ``enable=False`` restores their own forwards.
    Each swapped forward runs the module's own for anything but a one-token CPU inference step."""
    if enable and not enabled():
        return 0
    forwards = {**dict.fromkeys(RMSNORM_CLASSES, _rmsnorm_forward), **dict.fromkeys(ATTENTION_CLASSES, _attention_forward),
                **dict.fromkeys(ROUTER_CLASSES, _router_forward), **dict.fromkeys(EXPERTS_CLASSES, _experts_forward),
                **dict.fromkeys(ROTARY_CLASSES, _rotary_forward), **dict.fromkeys(LAYER_CLASSES, _layer_forward)}
    changed = 0
    for module in model.modules():
        fwd = forwards.get(type(module).__name__)
        if fwd is None:
            continue
        if enable and "forward" not in module.__dict__:
            module.forward = types.MethodType(fwd, module)
            changed += 1
        elif not enable and getattr(module.__dict__.get("forward"), "__func__", None) is fwd:
            del module.forward
            changed += 1
    return changed
