"""Compile every Triton all-to-all kernel for sm_90 (H100) on a CPU machine, so that errors
in GPU-only code paths (pointer casts, atomics with scopes, cache modifiers) show in CI.

The kernels are launched through `TritonAllToAll._launch`, here replaced by a recorder that
keeps the arguments of each launch; each recorded launch is then compiled with
`triton.compile` for `GPUTarget("cuda", 90, 32)` (Triton's bundled ptxas makes the cubin).
The inline-PTX polls (`ld.acquire.sys`, CUDA only) and clock stamps are switched on as on
a GPU; both signalling protocols ("v1", "v2") and both launch modes (fused or not) are
compiled.
Runs in a subprocess without TRITON_INTERPRET, since decorated kernels are interpreted
functions when that variable was set at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pplx.moe import layout as L
    from pplx.moe.kernels.triton_all_to_all import TritonAllToAll

    TY = {torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8",
          torch.float32: "fp32", torch.bfloat16: "bf16"}

    def record(in_dtype, world_size, tokens, hidden, experts, topk, sync, fused, prof):
        at = TritonAllToAll.__new__(TritonAllToAll)
        at.device, at.rank, at.group = torch.device("cpu"), 1, None
        scales = L.hidden_dim_scale(hidden) if in_dtype.itemsize == 1 else 0
        at._configure(world_size=world_size, max_num_tokens=tokens, num_experts=experts,
                      expert_padding=16, hidden_dim=hidden, hidden_dim_scale=scales,
                      in_dtype=in_dtype, out_dtype=torch.bfloat16,
                      num_experts_per_token=topk, timeout_s=1.0, block_tokens=None,
                      sync=sync, fused=fused)
        at.prof_on = prof  # the clock stamps are CUDA-only (inline PTX)
        at.num_warps = 8
        at.asm = True  # as on CUDA: the inline-PTX acquire polls
        at._alloc_private(torch.device("cpu"))
        at.buffers = SimpleNamespace(ptrs=torch.zeros(world_size, dtype=torch.int64))
        launches = []
        at._launch = lambda k, grid, *a, **kw: launches.append((k, a, kw))
        at._after_launch = lambda: None
        rows = L.max_recv_tokens(tokens, world_size, topk, experts // world_size, 16)
        x = torch.zeros(tokens, hidden, dtype=in_dtype)
        xs = torch.zeros(tokens, scales) if scales else None
        idx = torch.zeros(tokens, topk, dtype=torch.int64)
        w = torch.zeros(tokens, topk)
        ex = torch.zeros(rows, hidden, dtype=in_dtype)
        exs = torch.zeros(rows, scales) if scales else None
        ent = torch.zeros(experts // world_size, dtype=torch.int32)
        at.dispatch(ent, ex, exs, x, xs, idx, w, bound_m=torch.ones(1, dtype=torch.int32))
        y = torch.zeros(rows, hidden, dtype=torch.bfloat16)
        out = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
        at.combine(out, idx, w, y, accumulate=True)
        return launches

    def compile_one(kernel, args, kwargs):
        num_warps = kwargs.pop("num_warps")
        sig, consts = {}, {}
        names = kernel.arg_names
        for name, v in list(zip(names, args)) + list(kwargs.items()):
            p = kernel.params[names.index(name)]
            if p.is_constexpr:
                sig[name], consts[name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + TY[v.dtype]
            else:
                sig[name] = "i64" if abs(int(v)) >= 2**31 else "i32"
        src = ASTSource(kernel, sig, consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert k.asm["cubin"], kernel.fn.__name__
        return kernel.fn.__name__

    done = []
    # Decode shapes of the benchmark (fp8 with scales; rows in one tile) with both
    # signalling protocols, one launch per phase (fused) or per half, with and without
    # clock stamps, and a bf16 prefill-like T=1024, hidden 2880 (rows in several tiles).
    for cfg in [(torch.float8_e4m3fn, 4, 128, 7168, 256, 8, "v2", True, False),
                (torch.float8_e4m3fn, 4, 128, 7168, 256, 8, "v2", False, True),
                (torch.float8_e4m3fn, 4, 128, 7168, 256, 8, "v1", False, False),
                (torch.bfloat16, 2, 1024, 2880, 64, 4, "v2", True, True)]:
        for kernel, args, kwargs in record(*cfg):
            done.append(compile_one(kernel, args, kwargs))
    print(" ".join(done))
    """
)


def _cuda_backend_available() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton has no NVIDIA backend")
def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = proc.stdout.split()
    # Per config: dispatch and combine as one launch each (fused) or two.
    want = ["_dispatch_kernel", "_combine_kernel"] * 1
    want += ["_dispatch_kernel", "_dispatch_kernel", "_combine_kernel", "_combine_kernel"] * 2
    want += ["_dispatch_kernel", "_combine_kernel"]
    assert names == want, names
