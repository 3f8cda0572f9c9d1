"""Packed int4 experts (moekit.nn.int4_experts, the int4 decode kernel in moekit.nn.cpu_kernels_int4): the kernel
equals an fp64 product with the dequantized weights within fp32 accumulation error and one output rounding, on
every loop it has; the torch fallback agrees with it; models with int4 experts equal eager on the dequantized
weights; a quantized int4 checkpoint loaded with packed experts gives the dequantized load's logits and holds
3.8x fewer expert bytes than bf16."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import moekit
from cli_helpers import one_error, run_cli
from moekit.compress.quantize import quantize
from moekit.errors import MoekitError
from moekit.formats.quantized import INT4_BUFFERS, quantize_matrix
from moekit.nn import cpu_kernels, cpu_kernels_int4, int4_expert_bytes, quantize_experts_int4
from moekit.nn.int4_experts import dequantize_int4
from moekit.testing import save_tiny_checkpoint, tiny_model

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernel falls back to torch's ops")

E, ROWS = 5, 13  # 13 rows: three blocks of 4 and a tail block of 1


def _bank(group_size: int, cols: int, seed: int = 0, rows: int = ROWS):
    """A random int4 bank [E, rows, cols] in the format's codec, and its fp64 dequantized weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, rows, cols, generator=g)
    w[1, 2] += 3.0  # a skewed row: a zero point far from 8
    qts = [quantize_matrix(w[e], 4, group_size) for e in range(E)]
    q, s, z = (torch.stack([getattr(t, k) for t in qts]) for k in ("qweight", "scales", "zeros"))
    deq = torch.stack([dequantize_int4(q[e], s[e], z[e], torch.float64) for e in range(E)])
    return q, s, z, deq


def _reference(x: torch.Tensor, deq: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 products per slot (zero for ids outside [0, E)) and the bound on fp32 accumulation error: 2e-5 ×
    Σ s·(|q − z| + 128 + 15)·|x| (the bf16 dot-product loop adds 128 to every code and takes it off at the end)."""
    out = torch.zeros(*ids.shape, deq.shape[1], dtype=torch.float64)
    scale = torch.zeros_like(out)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < deq.shape[0]:
                xv = (x[t, j] if x.dim() == 3 else x[t]).double()
                out[t, j] = deq[e] @ xv
                scale[t, j] = (deq[e].abs() + 300 * deq[e].abs().amax(-1, keepdim=True) / 15) @ xv.abs()
    return out, 2e-5 * scale


CASES = [(16, 48), (32, 64), (64, 192), (128, 256)]  # group size, columns: every loop of the kernel


@needs_kernel
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group_size", "cols"), CASES)
def test_int4_kernel_equals_fp64_on_dequantized_weights(group_size: int, cols: int, dtype: torch.dtype,
                                                        per_slot: bool) -> None:
    """Exact codes: the only differences are fp32 accumulation order and one rounding to the output dtype."""
    q, s, z, deq = _bank(group_size, cols)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, cols, generator=g) if per_slot else torch.randn(2, cols, generator=g)).to(dtype)
    ids = torch.tensor([[4, E, 0], [-1, 1, 1]])  # a "no expert" sentinel, a negative id, a repeated expert
    got = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations="float")
    assert got is not None and got.dtype == dtype and got.shape == (2, 3, ROWS)
    ref, acc_err = _reference(x, deq, ids)
    half_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    err = (got.double() - ref).abs()
    assert torch.all(err <= half_ulp * ref.abs() * 1.0001 + acc_err)
    assert torch.all(got[0, 1] == 0) and torch.all(got[1, 0] == 0)
    assert ref.abs().max() > 1.0


@needs_kernel
def test_int4_kernel_takes_each_loop(monkeypatch) -> None:
    """Which loop runs: scalar for groups of 16, AVX-512 fp32 for 32, the bf16 dot products for bf16 inputs
    (where the CPU has AVX512-BF16) with float activations; int8 activations (the default, and
    MOEKIT_INT8_ACTIVATIONS unset) take the VNNI loop for groups of 64k where the CPU has AVX512-VNNI."""
    path = cpu_kernels_int4.kernel_path
    for acts in ("float", "int8"):
        assert path(16, torch.float32, acts) == "scalar"
    if path(32, torch.float32, "float") == "avx512-fp32":
        assert path(32, torch.bfloat16, "int8") in ("avx512-fp32", "avx512-bf16-dot-64")  # 32: no VNNI loop
        assert path(128, torch.float16, "float") == "avx512-fp32"
        assert path(64, torch.bfloat16, "float") in ("avx512-fp32", "avx512-bf16-dot-64")
        assert path(128, torch.bfloat16, "float") in ("avx512-fp32", "avx512-bf16-dot-128")
    if cpu_kernels.has_vnni():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for gs in (64, 128, 192, 256):
                assert path(gs, dtype, "int8") == "avx512-vnni-int8"
        monkeypatch.delenv("MOEKIT_INT8_ACTIVATIONS", raising=False)
        assert path(128, torch.bfloat16) == "avx512-vnni-int8"
        monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
        assert path(128, torch.bfloat16) != "avx512-vnni-int8"


@needs_kernel
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_int4_page_order_gives_each_row_its_own_blocks_sum(activations: str) -> None:
    """Rows of 512 B of codes (1024 columns) are read in page order where rows go side by side (a block's four rows
    a 4 KiB page apart): each row gets exactly the sum it gets in a 4-row slice of the bank (no page order there), at
    1 and 2 threads, and the fp64 product within the accumulation bound."""
    rows, cols = 64, 1024
    q, s, z, deq = _bank(128, cols, rows=rows)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cols, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[4, E, 0], [-1, 1, 1]])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            whole = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations)
            assert whole is not None
            for r in range(0, rows, 4):
                part = cpu_kernels_int4.expert_gemv_int4(x, q[:, r:r + 4], s[:, r:r + 4], z[:, r:r + 4], ids,
                                                         activations)
                assert torch.equal(whole[..., r:r + 4], part), (threads, r)
    finally:
        torch.set_num_threads(before)
    if activations == "float":
        ref, acc_err = _reference(x, deq, ids)
        assert torch.all((whole.double() - ref).abs() <= torch.finfo(torch.bfloat16).eps / 2 * ref.abs() * 1.0001
                         + acc_err)


@needs_kernel
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_int4_kernel_is_independent_of_threads(activations: str) -> None:
    q, s, z, _ = _bank(128, 256)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ids = torch.tensor([[0, 3, 4]])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations)
        torch.set_num_threads(2)
        two = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_op_kernel_equals_torch_fallback(monkeypatch, dtype: torch.dtype) -> None:
    """moekit::int4_expert_gemv with the kernel, and with it switched off (each expert dequantized to fp32, fp32
    products): the same numbers up to fp32 accumulation order and the output rounding."""
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")  # the fallback keeps x as it is; so does the kernel here
    q, s, z, _ = _bank(64, 128)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    ids = torch.tensor([[2, 0, E], [4, 4, 1]])
    fast = torch.ops.moekit.int4_expert_gemv(x, q, s, z, ids)
    monkeypatch.setattr(cpu_kernels, "_state", {cpu_kernels_int4.STEM: None})  # as with MOEKIT_CPU_KERNELS=0
    assert not cpu_kernels_int4.available()
    slow = torch.ops.moekit.int4_expert_gemv(x, q, s, z, ids)
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(fast, slow, atol=tol * float(slow.abs().max()), rtol=tol)
    assert torch.all(slow[0, 2] == 0)


def _quantized_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the VNNI loop sees it, in fp64: per block of 64 values d = max|x| / 127, x_q = round(x · 127 / max|x|)
    (fp32, half to even, as the kernel computes them), value x_q · d (exact in fp64)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv).double() * (amax / 127).double()).reshape(x.shape)


VNNI_CASES = [(64, 192), (128, 256), (192, 384), (256, 512)]  # a 64-column tail chunk; groups of 128k; 64·odd; 2 chunks
needs_vnni = pytest.mark.skipif(not (HAS_COMPILER and cpu_kernels.has_vnni()), reason="no AVX512-VNNI on this CPU")


@needs_vnni
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group_size", "cols"), VNNI_CASES)
def test_int4_vnni_path_equals_the_block_quantized_formula(group_size: int, cols: int, dtype: torch.dtype,
                                                          per_slot: bool) -> None:
    """int8 activations (default with AVX512-VNNI, groups of 64k): the integer part is exact, so the result equals an
    fp64 product of the dequantized weights with the block-quantized input within fp32 accumulation and one output
    rounding; against the float-activation result it differs by at most the input rounding, Σ_b (max|x_b| / 254) ·
    Σ_{c in b} |w_c| per output."""
    q, s, z, deq = _bank(group_size, cols)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, cols, generator=g) if per_slot else torch.randn(2, cols, generator=g)
    x[0, ..., 70] = 40.0  # an outlier: only its block's resolution suffers
    x[1, ..., :64] = 0.0  # an all-zero block (scale 0)
    x = x.to(dtype)
    ids = torch.tensor([[4, E, 0], [-1, 1, 1]])
    assert cpu_kernels_int4.kernel_path(group_size, dtype, "int8") == "avx512-vnni-int8"
    got = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations="int8")
    assert got is not None and got.dtype == dtype and got.shape == (2, 3, ROWS)
    assert torch.all(got[0, 1] == 0) and torch.all(got[1, 0] == 0)
    ref, acc_err = _reference(_quantized_input(x), deq, ids)
    half_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    assert torch.all((got.double() - ref).abs() <= half_ulp * ref.abs() * 1.0001 + acc_err), "not the block formula"
    float_ref, float_err = _reference(x, deq, ids)
    amax = x.double().abs().reshape(*x.shape[:-1], -1, 64).amax(-1)  # [T, (k,) B]
    for t in range(2):
        for j in range(3):
            e = int(ids[t, j])
            if 0 <= e < E:
                wabs = deq[e].abs().reshape(ROWS, -1, 64).sum(-1)  # [rows, B]
                bound = wabs @ (amax[t, j] if per_slot else amax[t]) / 254
                err = (got[t, j].double() - float_ref[t, j]).abs()
                assert torch.all(err <= bound + half_ulp * float_ref[t, j].abs() * 1.0001 + acc_err[t, j] + float_err[t, j])
    float_path = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations="float")
    assert not torch.equal(got, float_path)  # the input really was quantized


@needs_vnni
def test_int4_activations_switch(monkeypatch) -> None:
    """MOEKIT_INT8_ACTIVATIONS=float (int8's switch) makes the default int4 call the float-activation one, bit for
    bit; unset, the int8-activation one; MOEKIT_INT4_ACTIVATIONS, when set, decides for int4 alone."""
    q, s, z, _ = _bank(128, 256)
    x, ids = torch.randn(1, 256, generator=torch.Generator().manual_seed(12)).bfloat16(), torch.tensor([[1, 3]])
    as_float = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations="float")
    as_int8 = cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids, activations="int8")
    assert not torch.equal(as_float, as_int8)
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    assert torch.equal(cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids), as_float)
    assert torch.equal(torch.ops.moekit.int4_expert_gemv(x, q, s, z, ids), as_float)
    monkeypatch.delenv("MOEKIT_INT8_ACTIVATIONS")
    assert torch.equal(cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids), as_int8)
    assert torch.equal(torch.ops.moekit.int4_expert_gemv(x, q, s, z, ids), as_int8)
    rows = torch.cat([x, x])  # a prefill's small group (two rows of expert 1): float activations, whatever the setting
    offsets = torch.tensor([0, 2, 2, 2, 2], dtype=torch.int32)
    grouped = torch.ops.moekit.int4_grouped_mm(rows, q, s, z, offsets)
    assert torch.equal(grouped, torch.cat([as_float[:, 0], as_float[:, 0]]))
    monkeypatch.setenv("MOEKIT_INT4_ACTIVATIONS", "float")  # int4 only: int8 weights keep int8 activations
    assert cpu_kernels_int4.int4_activations() == "float" and cpu_kernels.int8_activations() == "int8"
    assert torch.equal(cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids), as_float)
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    monkeypatch.setenv("MOEKIT_INT4_ACTIVATIONS", "int8")  # int4's own setting wins
    assert torch.equal(cpu_kernels_int4.expert_gemv_int4(x, q, s, z, ids), as_int8)


def test_int4_ops_pass_opcheck() -> None:
    """Schema and fake implementations (torch.compile traces through them) agree with the real ops."""
    q, s, z, deq = _bank(32, 64)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[4, 0, E]])
    torch.library.opcheck(torch.ops.moekit.int4_expert_gemv.default, (x, q, s, z, ids),
                          test_utils=("test_schema", "test_faketensor"))
    rows = torch.randn(20, 64, generator=torch.Generator().manual_seed(5))
    offsets = torch.tensor([17, 17, 18, 18, 19], dtype=torch.int32)  # a dequantized group, kernel rows, a tail row
    torch.library.opcheck(torch.ops.moekit.int4_grouped_mm.default, (rows, q, s, z, offsets),
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.moekit.int4_grouped_mm(rows, q, s, z, offsets)
    ref = torch.cat([rows[:17].double() @ deq[0].T, rows[17:18].double() @ deq[2].T, rows[18:19].double() @ deq[4].T,
                     torch.zeros(1, ROWS, dtype=torch.float64)])
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


@pytest.mark.parametrize(("arch", "overrides", "group_size"), [
    ("qwen3_moe", {"moe_intermediate_size": 32}, 32),
    ("qwen3_moe", {}, 16),
    ("gpt_oss", {"intermediate_size": 32}, 32),  # transposed banks, biases, its own gate
])
def test_int4_experts_equal_eager_on_dequantized_weights(arch: str, overrides: dict, group_size: int) -> None:
    """After quantize_experts_int4, "moekit" runs the packed experts; its logits equal eager's on the dequantized
    weights for an 80-token prefill (dequantized groups), a 6-token one (the int4 kernel on sorted rows) and a
    one-token step (the per-slot kernel)."""
    model = tiny_model(arch, **overrides)
    ref_model = tiny_model(arch, **overrides)
    assert quantize_experts_int4(model, group_size=group_size, keep_float=False) == len(_experts_modules(ref_model))
    with torch.no_grad():
        for mod, ref in zip(_experts_modules(model), _experts_modules(ref_model), strict=True):
            transposed = getattr(ref, "is_transposed", False)
            for names, pname in ((INT4_BUFFERS[:3], "gate_up_proj" if ref.has_gate else "up_proj"),
                                 (INT4_BUFFERS[3:], "down_proj")):
                q, s, z = (getattr(mod, n) for n in names)
                deq = torch.stack([dequantize_int4(q[e], s[e], z[e], torch.float32) for e in range(q.shape[0])])
                getattr(ref, pname).copy_(deq.transpose(1, 2) if transposed else deq)
            assert mod.down_proj.numel() == 0
    model.set_experts_implementation("moekit")
    ref_model.set_experts_implementation("eager")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), torch.profiler.profile() as prof:
        for inp in (ids, ids[:, :3], ids[:1, :1]):
            ref = ref_model(inp).logits
            torch.testing.assert_close(model(inp).logits, ref, atol=1e-4, rtol=1e-4)
    names = [e.name for e in prof.events()]
    assert "moekit::int4_grouped_mm" in names and "moekit::int4_expert_gemv" in names


def test_quantize_experts_int4_rejects_a_group_size_that_does_not_divide() -> None:
    model = tiny_model("qwen3_moe")  # expert inputs 32 (gate/up) and 16 (down)
    with pytest.raises(MoekitError, match="not a multiple of the group size 32"):
        quantize_experts_int4(model, group_size=32)
    assert not any(hasattr(m, INT4_BUFFERS[0]) for m in model.modules())  # nothing half-converted
    with pytest.raises(MoekitError, match="even number"):
        quantize_experts_int4(model, group_size=7)


def test_packed_int4_checkpoint_equals_dequantized_load_with_3_8x_fewer_bytes(tmp_path, monkeypatch) -> None:
    """moekit quantize --bits 4 --group-size 128, loaded twice: dequantized (float experts) and with packed experts
    (moekit's int4 kernel). Logits agree (prefill and a cached decode step; float activations: the int8 ones are
    tested on the kernel, test_int4_vnni_path_equals_the_block_quantized_formula) and the packed experts hold 0.5 + 3/128 bytes per weight: 3.82x fewer than the
    same experts in bf16."""
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False, hidden_size=128,
                               moe_intermediate_size=128)
    quantize(moekit.load(src, with_tokenizer=False), bits=4, group_size=128, out=tmp_path / "q4")
    deq = moekit.load(tmp_path / "q4", with_tokenizer=False).model
    packed = moekit.load(tmp_path / "q4", with_tokenizer=False, packed_experts=True).model
    assert packed.config._experts_implementation == "moekit"
    deq.set_experts_implementation("eager")
    expert_weights = sum(p.numel() for n, p in deq.named_parameters() if ".experts." in n and p.dim() == 3)
    mods = _experts_modules(packed)
    assert len(mods) == len(_experts_modules(deq)) > 0 and all(hasattr(m, INT4_BUFFERS[5]) for m in mods)
    groups = expert_weights // 128
    assert int4_expert_bytes(packed) == expert_weights // 2 + 3 * groups
    assert 2 * expert_weights / int4_expert_bytes(packed) == pytest.approx(2 / (0.5 + 3 / 128))
    assert sum(p.numel() for n, p in packed.named_parameters() if ".experts." in n) == 0  # no float copy
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = deq(ids[:, :6], use_cache=True), packed(ids[:, :6], use_cache=True)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        a2 = deq(ids[:, 6:], cache=a.cache).logits
        b2 = packed(ids[:, 6:], cache=b.cache).logits
        torch.testing.assert_close(b2, a2, atol=1e-4, rtol=1e-4)


def test_packed_experts_need_a_quantized_checkpoint(tmp_path) -> None:
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False)
    with pytest.raises(MoekitError, match="packed experts need a moekit quantized checkpoint"):
        moekit.load(src, with_tokenizer=False, packed_experts=True)


def test_packed_experts_refuse_a_checkpoint_with_nothing_to_pack(tmp_path) -> None:
    """Experts whose inputs are not a whole number of groups (down: 16 inputs, groups of 32) cannot stay packed;
    asking for packed experts when no module can be is a one-line error, not a silent dequantized load."""
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False)
    quantize(moekit.load(src, with_tokenizer=False), bits=4, group_size=32, out=tmp_path / "q4")
    with pytest.raises(MoekitError, match=r"no experts module can stay packed.*group size \(32\)"):
        moekit.load(tmp_path / "q4", with_tokenizer=False, packed_experts=True)
    assert moekit.load(tmp_path / "q4", with_tokenizer=False).model is not None  # the plain load still works


@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_expert_forward_int4_ignores_sentinel_ids(num_tokens: int) -> None:
    """ids ≥ E ("no expert") add exactly nothing, on the per-slot decode path (1 token), the kernel groups (5) and
    the dequantized groups (40): the same result as expert_forward on the dequantized weights."""
    from moekit.nn import expert_forward, expert_forward_int4

    g = torch.Generator().manual_seed(11)
    hidden, inter, num_experts = 64, 32, 4
    w1 = torch.randn(num_experts, 2 * inter, hidden, generator=g)
    w2 = torch.randn(num_experts, hidden, inter, generator=g)
    banks, deq = [], []
    for w in (w1, w2):
        qts = [quantize_matrix(w[e], 4, 32) for e in range(num_experts)]
        q, s, z = (torch.stack([getattr(t, k) for t in qts]) for k in ("qweight", "scales", "zeros"))
        banks += [q, s, z]
        deq.append(torch.stack([dequantize_int4(q[e], s[e], z[e], torch.float32) for e in range(num_experts)]))
    x = torch.randn(num_tokens, hidden, generator=g)
    ids = torch.randint(0, num_experts, (num_tokens, 2), generator=g)
    ids[0, 1] = num_experts  # a sentinel in the first token
    weights = torch.rand(num_tokens, 2, generator=g)
    got = expert_forward_int4(x, ids, weights, tuple(banks))
    ref = expert_forward(x, ids, weights, deq[0], deq[1], backend="loop")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    only_first = expert_forward_int4(x[:1], ids[:1, :1], weights[:1, :1], tuple(banks))
    torch.testing.assert_close(got[:1], only_first, atol=1e-4, rtol=1e-4)  # the sentinel slot added nothing


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_int4_experts_compile_fullgraph_and_equal_eager() -> None:
    """A model with packed int4 experts compiles with fullgraph=True (the int4 custom ops' fake implementations);
    a prefill and a one-token step equal the uncompiled model."""
    torch._dynamo.reset()
    model = tiny_model("olmoe", num_hidden_layers=1, intermediate_size=32)
    quantize_experts_int4(model, group_size=32, keep_float=False)
    model.set_experts_implementation("moekit")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for inp in (ids, ids[:1, :1]):
            ref = model(inp).logits
            torch.testing.assert_close(compiled(inp).logits, ref, atol=1e-5, rtol=1e-5)


def test_cli_generate_with_packed_experts_gives_the_dequantized_tokens(tmp_path) -> None:
    """`moekit generate Q4 --packed-experts` decodes with the int4 kernel and gives the greedy tokens of the
    dequantized load; packed experts of a float checkpoint are a one-line error, in memory or offloaded."""
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", hidden_size=128, moe_intermediate_size=128)
    quantize(moekit.load(src), bits=4, group_size=128, out=tmp_path / "q4")
    args = ["generate", tmp_path / "q4", "--prompt", "The river", "--max-tokens", "6", "--json"]
    code, out, err = run_cli([*args, "--packed-experts"])
    assert code == 0, err
    code2, out2, err2 = run_cli(args)
    assert code2 == 0, err2
    packed, plain = json.loads(out), json.loads(out2)
    assert len(packed["token_ids"]) == 6 and packed["token_ids"] == plain["token_ids"]
    one_error(*run_cli(["generate", src, "--prompt", "x", "--packed-experts"])[::2], "packed experts need")
    one_error(*run_cli(["generate", src, "--prompt", "x", "--packed-experts", "--offload"])[::2], "packed experts need")


@pytest.mark.slow
def test_serve_with_packed_experts_answers_the_dequantized_greedy_text(tmp_path) -> None:
    """`moekit serve Q4 --packed-experts` (a real uvicorn process, the official openai client) keeps the experts
    packed and answers with the greedy continuation of the dequantized load; bad combinations are one-line errors."""
    import signal

    import httpx
    import openai

    from moekit.generation import generate
    from moekit.serve.server import resident_weights
    from serve_helpers import start_server

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", hidden_size=128, moe_intermediate_size=128)
    quantize(moekit.load(src), bits=4, group_size=128, out=tmp_path / "q4")
    srv = start_server(tmp_path / "q4", tmp_path, "--packed-experts")
    try:
        client = openai.OpenAI(base_url=srv["base"] + "/v1", api_key="unused", timeout=300, max_retries=0)
        r = client.completions.create(model="tiny", prompt="The river", max_tokens=8, temperature=0)
        weights = httpx.get(srv["base"] + "/metrics", timeout=60).json()["weights"]
    finally:
        srv["proc"].send_signal(signal.SIGTERM)
        srv["proc"].wait(timeout=120)
    dequantized = moekit.load(tmp_path / "q4")
    ref = generate(dequantized, "The river", max_new_tokens=8)  # float experts
    packed = moekit.load(tmp_path / "q4", packed_experts=True)
    assert weights == resident_weights(packed.model)  # the server holds the packed model's bytes
    assert 0 < weights["packed_int4_expert_bytes"] == int4_expert_bytes(packed.model)
    assert weights["resident_bytes"] < resident_weights(dequantized.model)["resident_bytes"]
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids) == 8
    srv["log"].seek(0)
    assert "Traceback" not in srv["log"].read()
    one_error(*run_cli(["serve", src, "--packed-experts", "--offload"])[::2], "packed experts need")


def test_read_int4_banks_equals_the_stacked_per_expert_codes(tmp_path) -> None:
    """read_int4_banks (pread into the stacked banks, what a packed load uses) gives stack_int4 of the per-expert
    QTensors bit for bit; a bank that is not all-int4 is refused."""
    from moekit.formats.quantized import read_int4_banks, read_quant_meta, read_quantized, stack_int4

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False, hidden_size=128,
                               moe_intermediate_size=128)
    quantize(moekit.load(src, with_tokenizer=False), bits=4, group_size=128, out=tmp_path / "q4")
    _, _, packed = read_quantized(tmp_path / "q4", torch.float32, keep_packed=True)
    assert packed
    banks = read_int4_banks(tmp_path / "q4", sorted(packed))
    assert sorted(banks) == sorted(packed)
    for name, qts in packed.items():
        for a, b in zip(banks[name], stack_int4(qts), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    quantize(moekit.load(src, with_tokenizer=False), bits=8, group_size=32, out=tmp_path / "q8")
    name = next(iter(read_quant_meta(tmp_path / "q8")["tensors"]))
    with pytest.raises(MoekitError, match="not an all-int4 bank"):
        read_int4_banks(tmp_path / "q8", [name])
