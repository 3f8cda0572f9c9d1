"""moekit's compiled CPU decode kernel (moekit.nn.cpu_kernels): builds here, equals an fp64 reference within one
rounding of the output dtype, is independent of the thread count, and switches off cleanly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.nn import cpu_kernels
from moekit.nn.dispatch import expert_forward
from moekit.nn.int8_experts import quantize_rows_int8

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernel falls back to torch's ops")

E, ROWS, COLS, T, K = 5, 13, 37, 2, 3  # 13 rows: a tail block of 1 after three blocks of 4


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _reference(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 ``x @ w[e].T`` per slot (× row scale), zero for ids outside [0, E)."""
    out = torch.zeros(*ids.shape, w.shape[1], dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < w.shape[0]:
                xv = x[t, j] if x.dim() == 3 else x[t]
                out[t, j] = w[e].double() @ xv.double()
                if scale is not None:
                    out[t, j] *= scale[e].double()
    return out


def _inputs(dtype: torch.dtype, per_slot: bool, cols: int = COLS):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, ROWS, cols, generator=g).to(dtype)
    x = torch.randn(T, K, cols, generator=g) if per_slot else torch.randn(T, cols, generator=g)
    ids = torch.tensor([[4, E, 0], [-1, 2, 2]])  # a "no expert" sentinel, a negative id, a repeated expert
    return x.to(dtype), w, ids


def test_kernel_builds_in_its_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOEKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_state", {})  # a fresh process's view: nothing loaded yet
    assert cpu_kernels.available()
    assert len(list(tmp_path.glob("moekit_gemv_*.so"))) == 1
    assert not list(tmp_path.glob("tmp*"))  # the build folder is gone


@pytest.mark.parametrize("cols", [COLS, 213])  # 213: whole 64- and 128-column steps, a 16 / 32 step and a tail
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_equals_fp64_reference(dtype: torch.dtype, per_slot: bool, cols: int) -> None:
    """fp32 accumulation, one rounding to the output dtype: within one ulp of the fp64 result (fp32: 1e-5)."""
    x, w, ids = _inputs(dtype, per_slot, cols)
    got = cpu_kernels.expert_gemv(x, w, ids)
    assert got is not None and got.dtype == dtype and got.shape == (T, K, ROWS)
    ref = _reference(x, w, ids)
    assert torch.all(got[0, 1] == 0) and torch.all(got[1, 0] == 0)  # sentinel slots are exactly zero
    tol = 1e-5 if dtype == torch.float32 else _ulp(dtype)
    err = (got.double() - ref).abs()
    assert torch.all(err <= tol * ref.abs() + 1e-6), float(err.max())
    assert torch.equal(got[1, 1], got[1, 2]) == (not per_slot)  # same expert, same input ⇒ same row


def test_rows_together_follows_the_cpu_unless_set(monkeypatch) -> None:
    """``MOEKIT_ROWS_TOGETHER`` (1 or 4) decides; unset or invalid: 1 on AMD CPUs, 4 elsewhere."""
    monkeypatch.setenv("MOEKIT_ROWS_TOGETHER", "1")
    assert cpu_kernels.rows_together() == 1
    monkeypatch.setenv("MOEKIT_ROWS_TOGETHER", "4")
    assert cpu_kernels.rows_together() == 4
    try:
        amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amd = False
    for value in ("", "3", "many"):
        monkeypatch.setenv("MOEKIT_ROWS_TOGETHER", value)
        assert cpu_kernels.rows_together() == (1 if amd else 4)


def test_the_other_row_order_passes_the_kernel_tests(tmp_path) -> None:
    """Both row orders of the kernels (rows side by side, rows one after the other: ``rows_together``) are built
    and checked on every machine: this file's kernel tests and the int4 kernel's, in a process whose kernels read
    rows in the order this CPU does not default to."""
    other = 4 if cpu_kernels.rows_together() == 1 else 1
    env = {**os.environ, "MOEKIT_ROWS_TOGETHER": str(other), "MOEKIT_KERNEL_CACHE": str(tmp_path)}
    here = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(here / "test_nn_cpu_kernels.py"),
         str(here / "test_nn_int4_experts.py"), "-k", "not other_row_order and (gemv or combine or vnni or "
         "int4_kernel or half_precision or threads)"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 30 and " failed" not in proc.stdout, proc.stdout[-1000:]
    built = [p.name for p in tmp_path.glob("*.so")]
    assert any(n.startswith("moekit_gemv_") for n in built) and any(n.startswith("moekit_gemv_int4_") for n in built)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_gemv_equals_fp64_reference(dtype: torch.dtype) -> None:
    x, w, ids = _inputs(torch.float32, per_slot=False)
    q, s = quantize_rows_int8(w.to(dtype))
    got = cpu_kernels.expert_gemv(x.to(dtype), q, ids, s)
    assert got is not None and got.dtype == dtype
    ref = _reference(x.to(dtype), q, ids, s)
    tol = 1e-5 if dtype == torch.float32 else _ulp(dtype)
    assert torch.all((got.double() - ref).abs() <= tol * ref.abs() + 1e-6)


@pytest.mark.parametrize("dtype,cols", [(torch.bfloat16, 1024), (torch.bfloat16, 512), (torch.float32, 512),
                                        (torch.float16, 256), ("int8", 1024), ("int8", 2048)])
def test_page_order_gives_each_row_its_own_blocks_sum(dtype, cols: int) -> None:
    """Rows shorter than a 4 KiB page are read side by side in page order (a block's four rows a page apart, where
    rows go side by side): each row still gets exactly the sum it gets in a block of four rows of its own (a 4-row
    slice of the bank, which has no page order), and the fp64 reference within one rounding, at 1 and 2 threads."""
    g = torch.Generator().manual_seed(5)
    rows = 64
    w = torch.randn(E, rows, cols, generator=g)
    x = torch.randn(T, cols, generator=g)
    ids = torch.tensor([[4, E, 0], [-1, 2, 2]])
    if dtype == "int8":
        q, s = quantize_rows_int8(w.bfloat16())
        x = x.bfloat16()
    else:
        q, s, x = w.to(dtype), None, x.to(dtype)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            whole = cpu_kernels.expert_gemv(x, q, ids, s)
            assert whole is not None
            for r in range(0, rows, 4):
                block = cpu_kernels.expert_gemv(x, q[:, r:r + 4], ids, None if s is None else s[:, r:r + 4])
                assert torch.equal(whole[..., r:r + 4], block), (threads, r)
    finally:
        torch.set_num_threads(before)
    # the page order follows the rows' stride, not their length: the first columns of a bank twice as wide
    wide = torch.zeros(E, rows, 2 * cols, dtype=q.dtype)
    wide[..., :cols] = q
    assert torch.equal(cpu_kernels.expert_gemv(x, wide[..., :cols], ids, s), whole)
    ref = _reference(x, q, ids, s)
    tol = 1e-5 if x.dtype == torch.float32 else _ulp(x.dtype)
    if dtype == "int8" and cpu_kernels.int8_activations() == "int8":
        tol = 0.05  # the input quantized per 64-block (test_int8_vnni_path_quantizes_the_input_per_block is exact)
    assert torch.all((whole.double() - ref).abs() <= tol * ref.abs() + tol * 1e-1 * ref.abs().max())


def test_result_does_not_depend_on_threads() -> None:
    """Every output row is summed by one thread in one order: bit-identical at 1 and 2 threads."""
    x, w, ids = _inputs(torch.bfloat16, per_slot=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.expert_gemv(x, w, ids)
        torch.set_num_threads(2)
        two = cpu_kernels.expert_gemv(x, w, ids)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_unsupported_layouts_fall_back() -> None:
    """Rows that are not contiguous (a transposed bank), mixed dtypes or int8 without scales: None (torch's ops)."""
    x, w, ids = _inputs(torch.float32, per_slot=False)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major rows
    assert cpu_kernels.expert_gemv(x, wt, ids) is None
    assert cpu_kernels.expert_gemv(x.bfloat16(), w, ids) is None
    assert cpu_kernels.expert_gemv(x, w.to(torch.int8), ids) is None


def test_switched_off_decode_equals_kernel_decode(monkeypatch) -> None:
    """MOEKIT_CPU_KERNELS=0: the decode step runs torch.mv per slot and gives the kernel's result (fp32, 1e-5)."""
    g = torch.Generator().manual_seed(3)
    H, inter = 64, 48
    x = torch.randn(1, H, generator=g)
    w1, w2 = torch.randn(6, 2 * inter, H, generator=g), torch.randn(6, H, inter, generator=g)
    ids, weights = torch.tensor([[1, 5, 6]]), torch.rand(1, 3, generator=g)
    with torch.no_grad():
        fast = expert_forward(x, ids, weights, w1, w2)
        monkeypatch.setenv("MOEKIT_CPU_KERNELS", "0")
        monkeypatch.setattr(cpu_kernels, "_state", {})
        assert not cpu_kernels.available() and cpu_kernels.expert_gemv(x, w1, ids) is None
        slow = expert_forward(x, ids, weights, w1, w2)
    torch.testing.assert_close(fast, slow, atol=1e-5 * float(slow.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_half_precision_weight_converts_exactly(dtype: torch.dtype) -> None:
    """All 65536 bit patterns as weights against a one-hot input: each output is that weight (NaN stays NaN,
    infinities and subnormals exact), through the vector loop (16 columns) of 4-row blocks."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    w = torch.zeros(1, bits.numel(), 16, dtype=dtype)
    w[0, :, 0] = bits.view(dtype)
    x = torch.zeros(1, 16, dtype=dtype)
    x[0, 0] = 1.0
    got = cpu_kernels.expert_gemv(x, w, torch.zeros(1, 1, dtype=torch.long))
    assert got is not None
    torch.testing.assert_close(got[0, 0], w[0, :, 0], rtol=0, atol=0, equal_nan=True)


def test_use_for_linears_decode_step() -> None:
    """use_for_linears: a one-token step's logits match F.linear's within bf16 rounding, prefill is bit-identical
    (it keeps F.linear), and enable=False restores every module."""
    from moekit.testing import tiny_model

    model = tiny_model("olmoe", hidden_size=256, intermediate_size=128).to(torch.bfloat16).eval()
    lm_head = torch.nn.Linear(256, 1000, bias=True, dtype=torch.bfloat16)  # a bias, and rows not a multiple of 4
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    with torch.no_grad():
        ref_prefill, ref_step, ref_lin = model(ids).logits, model(ids[:, :1]).logits, lm_head(x)
        assert cpu_kernels.use_for_linears(model) == linears > 0 and cpu_kernels.use_for_linears(lm_head) == 1
        prefill, step, lin = model(ids).logits, model(ids[:, :1]).logits, lm_head(x)
        assert cpu_kernels.use_for_linears(model, enable=False) == linears
        assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(prefill, ref_prefill)
    exact = x.double() @ lm_head.weight.double().T + lm_head.bias.double()
    assert (lin.double() - exact).abs().max() <= 2 * (ref_lin.double() - exact).abs().max()
    assert not torch.equal(lin, ref_lin)  # the kernel ran (its rounding differs from oneDNN's somewhere)
    torch.testing.assert_close(step.float(), ref_step.float(), atol=0.02 * float(ref_step.abs().max()), rtol=0)


def _quantized_input_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp64 value of what the VNNI path computes: x quantized per 64-block (scale max|x|/127, round half to even,
    in fp32 like the kernel), exact integer block dots, times the block scales and the row scales."""
    xf = x.float().reshape(x.shape[0], -1, 64)
    amax = xf.abs().amax(-1, keepdim=True)
    xq = torch.round(xf * torch.where(amax > 0, 127.0 / amax, 0.0)).double()  # [T, B, 64]
    d = (amax / 127.0).double()  # [T, B, 1]
    out = torch.zeros(*ids.shape, q.shape[1], dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < q.shape[0]:
                blocks = q[e].double().reshape(q.shape[1], -1, 64)  # [rows, B, 64]
                out[t, j] = ((blocks * xq[t]).sum(-1) * d[t, :, 0]).sum(-1) * s[e].double()
    return out


@pytest.mark.skipif(not (HAS_COMPILER and cpu_kernels.has_vnni()), reason="no AVX512-VNNI on this CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_vnni_path_quantizes_the_input_per_block(dtype: torch.dtype) -> None:
    """int8 activations (the default with VNNI, columns a multiple of 64): equals the fp64 value of the block-
    quantized formula within fp32 summation and one output rounding, and differs from the float-activation
    result by at most the input quantization error: Σ_blocks (max|x_b| / 254) · Σ_b |w|."""
    g = torch.Generator().manual_seed(5)
    rows, cols = 13, 320  # five 64-blocks (a group of four, one more); 13 rows: a tail row after three 4-row blocks
    w = torch.randn(E, rows, cols, generator=g).to(dtype)
    x = torch.randn(T, cols, generator=g)
    x[0, 70] = 50.0  # an outlier in one block: only that block's resolution suffers
    x[1, :64] = 0.0  # an all-zero block (scale 0)
    x = x.to(dtype)
    ids = torch.tensor([[4, E, 0], [-1, 2, 2]])
    q, s = quantize_rows_int8(w)
    got = cpu_kernels.expert_gemv(x, q, ids, s, activations="int8")
    exact = cpu_kernels.expert_gemv(x, q, ids, s, activations="float")
    assert got is not None and exact is not None and got.dtype == dtype
    assert torch.all(got[0, 1] == 0) and torch.all(got[1, 0] == 0)
    ref = _quantized_input_reference(x, q, s, ids)
    tol = 1e-5 if dtype == torch.float32 else _ulp(dtype)
    assert torch.all((got.double() - ref).abs() <= tol * ref.abs() + 1e-4 * ref.abs().max()), "not the block formula"
    float_ref = _reference(x, q, ids, s)
    amax = x.double().abs().reshape(T, -1, 64).amax(-1)  # [T, B]
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < E:
                continue
            wabs = (q[e].double() * s[e].double()[:, None]).abs().reshape(rows, -1, 64).sum(-1)  # [rows, B]
            bound = (wabs * amax[t] / 254).sum(-1) + tol * float_ref[t, j].abs() + 1e-6
            assert torch.all((got[t, j].double() - float_ref[t, j]).abs() <= bound)
    assert not torch.equal(got, exact)  # the input really was quantized
    assert torch.equal(cpu_kernels.expert_gemv(x, q, ids, s), got)  # int8 activations are the default


@pytest.mark.skipif(not (HAS_COMPILER and cpu_kernels.has_vnni()), reason="no AVX512-VNNI on this CPU")
def test_int8_activations_switch(monkeypatch) -> None:
    """MOEKIT_INT8_ACTIVATIONS=float makes the default call the float-activation one, bit for bit; unset, int8."""
    g = torch.Generator().manual_seed(11)
    q, s = quantize_rows_int8(torch.randn(E, 8, 128, generator=g))
    x, ids = torch.randn(1, 128, generator=g), torch.tensor([[1, 3]])
    as_float = cpu_kernels.expert_gemv(x, q, ids, s, activations="float")
    as_int8 = cpu_kernels.expert_gemv(x, q, ids, s, activations="int8")
    assert not torch.equal(as_float, as_int8)
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    assert cpu_kernels.int8_activations() == "float"
    assert torch.equal(cpu_kernels.expert_gemv(x, q, ids, s), as_float)
    monkeypatch.delenv("MOEKIT_INT8_ACTIVATIONS")
    assert cpu_kernels.int8_activations() == "int8"
    assert torch.equal(cpu_kernels.expert_gemv(x, q, ids, s), as_int8)


def test_int8_linears_decode_on_their_codes(monkeypatch) -> None:
    """quantize_linears_int8: a one-row step runs on the int8 codes (= F.linear on the dequantized codes within
    one bf16 rounding, with float activations), multi-row inputs keep the float weight (bit-identical) or, when it
    was freed, use the dequantized codes; a tied lm_head keeps its shared weight; dequantize restores the model."""
    from moekit.nn import dequantize_linears_int8, quantize_linears_int8
    from moekit.testing import tiny_model

    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(128, 77, bias=True, dtype=torch.bfloat16)
    x1, x3 = torch.randn(1, 128, generator=g).bfloat16(), torch.randn(3, 128, generator=g).bfloat16()
    with torch.no_grad():
        ref3 = lin(x3)
        assert quantize_linears_int8(lin) == 1
        deq = lin.moekit_int8_weight.double() * lin.moekit_int8_weight_scale.double()[:, None]
        product = x1.double() @ deq.T
        exact = product + lin.bias.double()
        got1 = lin(x1)  # two roundings: the kernel's output, then the bias add
        assert torch.all((got1.double() - exact).abs() <= _ulp(torch.bfloat16) * (product.abs() + exact.abs()) + 1e-6)
        assert torch.equal(lin(x3), ref3)  # the float weight was kept: prefill unchanged
        assert dequantize_linears_int8(lin) == 1 and not hasattr(lin, "moekit_int8_weight")
        assert torch.equal(lin(x3), ref3) and "forward" not in lin.__dict__

        model = tiny_model("olmoe", hidden_size=128, intermediate_size=64, tie_word_embeddings=True).bfloat16().eval()
        linears = sum(type(m) is torch.nn.Linear for m in model.modules())
        ids = torch.randint(3, 100, (1, 5), generator=g)
        ref_step = model(ids[:, :1]).logits
        assert quantize_linears_int8(model, keep_float=False) == linears
        assert model.lm_head.weight.numel() > 0 and model.lm_head.weight is model.model.embed_tokens.weight  # tied
        assert model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # freed
        step, prefill = model(ids[:, :1]).logits, model(ids).logits
        q = model.model.layers[0].self_attn.q_proj
        hidden = torch.randn(2, 128, generator=g).bfloat16()
        assert torch.equal(q(hidden), hidden @ (q.moekit_int8_weight.bfloat16() * q.moekit_int8_weight_scale[:, None]).T)
    assert torch.isfinite(prefill).all()
    torch.testing.assert_close(step.float(), ref_step.float(), atol=0.05 * float(ref_step.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
def test_combine_equals_weighted_sum_of_products(dtype: torch.dtype, int8: bool) -> None:
    """expert_gemv_combine = Σ_j g[t, j] · (h[t, j] @ w[ids[t, j]].T) in fp64, within fp32 summation and one rounding
    of the output (int8: against the same products from expert_gemv, which quantizes its input the same way);
    ids outside [0, E) add nothing, a row count that is not a multiple of the 32-row chunks included."""
    g = torch.Generator().manual_seed(7)
    rows, cols = 45, 128
    w = torch.randn(E, rows, cols, generator=g).to(dtype)
    h = torch.randn(T, K, cols, generator=g).to(dtype)
    ids = torch.tensor([[4, E, 0], [-1, 2, 2]])
    gates = torch.rand(T, K, generator=g)
    q, s = quantize_rows_int8(w) if int8 else (w, None)
    got = cpu_kernels.expert_gemv_combine(h, q, ids, gates, s)
    assert got is not None and got.dtype == dtype and got.shape == (T, rows)
    per_slot = cpu_kernels.expert_gemv(h.float(), q if int8 else w.float(), ids, None if s is None else s.float())
    if int8:  # fp32 products of the same (quantized) input, exact enough to be the reference
        ref = (gates.double()[..., None] * per_slot.double()).sum(1)
    else:
        ref = (gates.double()[..., None] * _reference(h, w, ids)).sum(1)
    scale = (gates.double()[..., None] * _reference(h, q, ids, s).abs()).sum(1)  # no cancellation credit
    tol = 1e-5 if dtype == torch.float32 else _ulp(dtype)
    assert torch.all((got.double() - ref).abs() <= tol * ref.abs() + 1e-5 * scale + 1e-6)
    # the repeated expert 2 in token 1 counts twice, the sentinels nothing
    only = cpu_kernels.expert_gemv_combine(h, q, torch.tensor([[E, E, E], [-1, -1, -1]]), gates, s)
    assert torch.all(only == 0)


def test_combine_over_two_banks_equals_one_bank_bit_for_bit() -> None:
    """combine_banks: experts taken from two banks (as the offload engine's slots and scratch) give exactly the
    one-bank result, since one call sums every slot in the same order."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(E, 40, 64, generator=g).bfloat16()
    h = torch.randn(T, K, 64, generator=g).bfloat16()
    ids = torch.tensor([[4, 1, 0], [3, 2, E]])
    gates = torch.rand(T, K, generator=g)
    one = cpu_kernels.expert_gemv_combine(h, w, ids, gates)
    first, second = w[[0, 1]].clone(), w[[2, 3, 4]].clone()  # banks elsewhere in memory
    ids_a = torch.where(ids < 2, ids, -1)
    ids_b = torch.where((ids >= 2) & (ids < E), ids - 2, -1)
    two = cpu_kernels.combine_banks(h, [(ids_a, first, None), (ids_b, second, None)], gates)
    assert one is not None and torch.equal(one, two)
    assert cpu_kernels.combine_banks(h, [(ids_a, first, None), (ids_b, second.float(), None)], gates) is None


@pytest.mark.parametrize("rows,cols", [(4099, 64), (4112, 1024)])
@pytest.mark.parametrize("int8", [False, True])
def test_one_token_combine_equals_the_multi_token_path_bit_for_bit(int8: bool, rows: int, cols: int) -> None:
    """A decode step's combine (one token: each thread streams its rows of every slot in turn, in tiles of 4096 rows)
    sums each row over the same slots in the same order as the multi-token path: the same bits, at 1 and 2 threads
    (4099 rows: two tiles at 1 thread and a tail block of 3; a slot without an expert). 1024 columns: rows of 1-2 KB,
    which the one-token path reads in page order where rows go side by side (``page_rows`` in the kernel source)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(E, rows, cols, generator=g).bfloat16()
    h = torch.randn(2, K, cols, generator=g).bfloat16()
    ids = torch.tensor([[3, E, 1], [0, 2, 4]])
    gates = torch.rand(2, K, generator=g)
    q, s = quantize_rows_int8(w) if int8 else (w, None)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            both = cpu_kernels.expert_gemv_combine(h, q, ids, gates, s)
            one = cpu_kernels.expert_gemv_combine(h[:1], q, ids[:1], gates[:1], s)
            assert one is not None and both is not None and torch.equal(one[0], both[0])
    finally:
        torch.set_num_threads(before)
