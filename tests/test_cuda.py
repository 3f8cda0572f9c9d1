"""moekit on a CUDA device: the experts implementation against transformers' eager experts (forward and
gradients, every backend), the same logits as on the CPU, fullgraph compile and static-cache decoding, a model
loaded with ``device="cuda"``, and a NCCL job through ``moekit.distributed``.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
import moekit.nn  # noqa: F401  (registers "moekit" with transformers)
from moekit.testing import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
ARCHS = ("olmoe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe")
_INDUCTOR_JIT_WARNING = "ignore:.*torch.jit.*:DeprecationWarning"


def _run(model: torch.nn.Module, ids: torch.Tensor, impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.set_experts_implementation(impl)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                         if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["auto", "loop", "padded", "grouped_mm"])
def test_forward_backward_equals_eager_on_cuda(arch: str, backend: str) -> None:
    """float32 on the GPU: moekit's logits and every gradient equal transformers' eager experts'."""
    model = tiny_model(arch).to(CUDA)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1)).to(CUDA)
    ref_logits, ref_grads = _run(model, ids, "eager")
    moekit.nn.set_backend(backend)
    try:
        logits, grads = _run(model, ids, "moekit")
    finally:
        moekit.nn.set_backend("auto")
    assert logits.abs().max() > 0.1
    # TF32 is off by default for matmuls in torch; keep tolerances of the CPU test, a little looser for cuBLAS order
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and any(".experts." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_on_cuda_close_to_eager(arch: str) -> None:
    """bf16 weights on the GPU (grouped_mm where the GPU has it): within bf16's rounding of eager."""
    model = tiny_model(arch, dtype=torch.bfloat16).to(CUDA)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2)).to(CUDA)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        ref = model(ids).logits.float()
        model.set_experts_implementation("moekit")
        out = model(ids).logits.float()
    scale = float(ref.abs().max())
    assert scale > 0.1
    torch.testing.assert_close(out, ref, atol=3e-2 * scale, rtol=3e-2)


@pytest.mark.parametrize("backend", ["auto", "loop", "grouped_mm"])
@pytest.mark.parametrize("sentinels", [None, True])
def test_no_expert_ids_on_cuda(backend: str, sentinels: bool | None) -> None:
    """ids ≥ E ("no expert", as expert parallelism routes) add exactly nothing on the GPU, forward and backward,
    whatever the grouped GEMM leaves in the rows it skips; the result equals the CPU's."""
    from moekit.nn.dispatch import expert_forward

    g = torch.Generator().manual_seed(7)
    T, H, Inter, E, k = 64, 64, 32, 8, 2
    x = torch.randn(T, H, generator=g)
    w1, w2 = torch.randn(E, 2 * Inter, H, generator=g) / 8, torch.randn(E, H, Inter, generator=g) / 8
    ids = torch.randint(0, E + 2, (T, k), generator=g)  # about a fifth are ids E, E+1
    weights = torch.rand(T, k, generator=g)
    cpu = expert_forward(x, ids, weights, w1, w2, backend="loop")
    xg = x.to(CUDA).requires_grad_()
    w1g = w1.to(CUDA).requires_grad_()
    out = expert_forward(xg, ids.to(CUDA), weights.to(CUDA), w1g, w2.to(CUDA), backend=backend, sentinels=sentinels)
    out.sum().backward()
    torch.testing.assert_close(out.detach().cpu(), cpu, atol=1e-4, rtol=1e-4)
    only_none = (ids >= E).all(dim=1)
    assert only_none.any() and torch.equal(out.detach().cpu()[only_none], torch.zeros(int(only_none.sum()), H))
    assert torch.isfinite(xg.grad).all() and torch.isfinite(w1g.grad).all()
    assert torch.equal(xg.grad.cpu()[only_none], torch.zeros(int(only_none.sum()), H))


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "gpt_oss"])
def test_cuda_logits_equal_cpu_logits(arch: str) -> None:
    """The same float32 model gives the same logits on the CPU (moekit's CPU kernels) and on the GPU."""
    model = tiny_model(arch)
    model.set_experts_implementation("moekit")
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.to(CUDA)(ids.to(CUDA)).logits.cpu()
        step_cpu = model.cpu()(ids[:1, :1]).logits  # a one-token step: the CPU's GEMV decode kernel
        step_gpu = model.to(CUDA)(ids[:1, :1].to(CUDA)).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_gpu, step_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings(_INDUCTOR_JIT_WARNING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_fullgraph_equals_eager_on_cuda(dtype: torch.dtype) -> None:
    """torch.compile(fullgraph=True) of a moekit model on the GPU: no graph break, eager's numbers."""
    torch._dynamo.reset()
    model = tiny_model("olmoe", dtype=dtype, num_hidden_layers=1).to(CUDA)
    model.set_experts_implementation("moekit")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0)).to(CUDA)
    compiled = torch.compile(model, fullgraph=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        for inp in (ids, ids[:1, :1]):
            ref = model(inp).logits.float()
            out = compiled(inp).logits.float()
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(out, ref, atol=tol * float(ref.abs().max()), rtol=tol)


@pytest.mark.filterwarnings(_INDUCTOR_JIT_WARNING)
def test_static_cache_compiled_generate_on_cuda_without_recompiles() -> None:
    """transformers' compiled static-cache decoding on the GPU gives eager's greedy tokens; a prompt of another
    length reuses the compiled step."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("qwen3_moe", num_hidden_layers=1).to(CUDA)
    model.set_experts_implementation("moekit")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (1, n), generator=g).to(CUDA) for n in (7, 4)]
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static", max_length=16)
    eager = [model.generate(p, **common, disable_compile=True) for p in prompts]
    config = CompileConfig(fullgraph=True, mode="default")
    compiled = [model.generate(prompts[0], **common, compile_config=config)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.append(model.generate(prompts[1], **common, compile_config=config))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)


def test_load_on_cuda_generates_the_cpu_tokens() -> None:
    """``moekit.load(..., device="cuda")`` of the bundled model: its greedy continuation equals the CPU's."""
    cpu = moekit.load("moekit:tiny", dtype="float32")
    gpu = moekit.load("moekit:tiny", dtype="float32", device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    ids = cpu.tokenizer("The history of the expert", return_tensors="pt").input_ids
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    a = cpu.model.generate(ids, **common)
    b = gpu.model.generate(ids.to("cuda"), **common).cpu()
    assert a.shape[1] == ids.shape[1] + 12
    assert torch.equal(a, b)


def test_nccl_job_through_moekit_distributed(tmp_path: Path) -> None:
    """A torchrun job on the GPUs, NCCL: moekit's collectives (``moekit.distributed.runtime``) gather across ranks.

    With one GPU the job has one rank (NCCL takes one rank per GPU), joined directly since ``runtime.init`` joins
    only jobs of several ranks; with two or more GPUs, two ranks joined by ``runtime.init``."""
    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    script = tmp_path / "job.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from moekit.distributed import runtime\n"
        "world = runtime.init()\n"
        "if world is None:\n"
        "    torch.cuda.set_device(0)\n"
        "    torch.distributed.init_process_group('nccl', rank=0, world_size=1)\n"
        "    world = runtime.current()\n"
        "if world.rank:\n"
        "    sys.stdout = open(os.devnull, 'w')\n"
        "t = torch.arange(4, dtype=torch.float32, device=world.device)\n"
        "torch.distributed.all_reduce(t)\n"
        "blobs = runtime.all_gather_bytes(b'moekit' * (world.rank + 1), world)\n"
        "print(json.dumps({'backend': torch.distributed.get_backend(), 'device': str(world.device),\n"
        "                  'sum': t.sum().item(), 'blobs': [b.decode() for b in blobs]}))\n"
        "runtime.shutdown()\n")
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MOEKIT_DIST_TIMEOUT="60")
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(script)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"backend": "nccl", "device": "cuda:0", "sum": 6.0 * nproc,
                   "blobs": ["moekit" * (r + 1) for r in range(nproc)]}
