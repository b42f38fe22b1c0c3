"""The GPU producer of the host proxy (`pplx.moe.internode_gpu`), checked on the CPU.

1. Under TRITON_INTERPRET=1 the round-trip kernel writes items into a real proxy's ring and
   polls the receiver's ImmCounter table: every write lands (bytes compared), every
   immediate is counted, the proxy counts every item completed.
2. Without the interpreter, the same kernel compiles for sm_90 (H100), so that errors in
   the GPU-only path (system-scope atomics, volatile loads, int64 casts) show in CI.
Both run in subprocesses: TRITON_INTERPRET must be set before Triton decorates kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_INTERPRET = textwrap.dedent(
    """
    import torch
    from pplx.fabric import FaultInjection, TransferEngine
    from pplx.fabric.proxy import HostProxy
    from pplx.moe.internode_gpu import proxy_roundtrip_triton

    a = TransferEngine("shm")
    b = TransferEngine("shm", fault_injection=FaultInjection(window=4, max_delay_us=50))
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    dst = torch.full((4096,), 0x7F, dtype=torch.uint8)
    mr, _ = a.register_tensor(src)
    _, d = b.register_tensor(dst)
    ring = torch.zeros(8 * 8, dtype=torch.int64)
    with HostProxy(a, mr, [None, d], num_slots=8, ring=ring) as p:
        b.imm_counter(5).wait(0)
        us = proxy_roundtrip_triton(p, b, 1, imm=5, iters=12, nbytes=100)
        p.wait(12, timeout=20)
        assert p.completed == 12 and p.failed == 0, (p.completed, p.failed)
        assert b.imm_counter(5).count == 12
        assert torch.equal(dst[:100], src[:100]) and (dst[100:] == 0x7F).all()
        assert int(ring.view(8, 8)[11 % 8, 0]) == 12  # seq of ticket 11
        # Second launch continues the tickets (the ring laps: 12 + 12 > 8 slots).
        proxy_roundtrip_triton(p, b, 1, imm=5, iters=12, nbytes=100)
        p.wait(24, timeout=20)
        assert b.imm_counter(5).count == 24
    print("ok", us)
    a.close()
    b.close()
    """
)

_COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pplx.moe.internode_gpu import MAX_SPINS, _proxy_roundtrip_kernel as k

    sig = {"ring_ptr": "*i64", "counters_ptr": "*i64", "imm_table_ptr": "*i64",
           "status_ptr": "*i64", "num_slots": "i32", "ticket0": "i64", "count0": "i64",
           "iters": "i32", "dst": "i32", "nbytes": "i64", "imm": "i32",
           "MAX_SPINS": "constexpr"}
    src = ASTSource(k, sig, {"MAX_SPINS": MAX_SPINS})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    assert c.asm["cubin"]
    ptx = c.asm["ptx"]
    assert "atom" in ptx and ".sys" in ptx, "expected a system-scope atomic for seq"
    print("ok")
    """
)


def _run(script: str, interpret: bool) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    return r.stdout


def test_triton_producer_round_trips_under_interpreter():
    assert _run(_INTERPRET, True).startswith("ok")


def _cuda_backend_available() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton without its CUDA backend")
def test_triton_producer_compiles_for_sm90():
    assert _run(_COMPILE, False).startswith("ok")
