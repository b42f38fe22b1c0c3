"""The GPU producer of the host proxy (`pplx.moe.internode_gpu`), checked on the CPU.

1. Under TRITON_INTERPRET=1 the round-trip kernel writes items into a real proxy's ring and
   polls the receiver's ImmCounter table: every write lands (bytes compared), every
   immediate is counted, the proxy counts every item completed; for every variant (plain
   and tagged rings, spinning and progress-driving proxies), and for the parts (NOP items
   polling the proxy's counter; the PCIe ping-pong against the C echo thread).
2. Without the interpreter, every variant compiles for sm_90 (H100), so that errors in the
   GPU-only path (the inline PTX: vector relaxed stores, st.release.sys, the pipelined poll
   loop) show in CI; the SASS of the tagged variant has no memory barrier.
3. On a GPU (`gpu`): every variant's round trips, with the same checks.
The first two run in subprocesses: TRITON_INTERPRET must be set before Triton decorates
kernels.
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
    from pplx.moe import internode_gpu as gpu
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
    # Every variant, on a plain or tagged ring as it needs, spinning or driving proxy; 12
    # items on an 8-slot ring from ticket 0 (tags of laps 0 and 1), then NOP items.
    for v in gpu.VARIANTS:
        for drive in (False, True):
            ring = torch.zeros(8 * 8, dtype=torch.int64)
            dst.fill_(0x7F)
            with HostProxy(
                a, mr, [None, d], num_slots=8, ring=ring, tagged=v.tagged, drive_progress=drive
            ) as p:
                n0 = b.imm_counter(5).count
                gpu.proxy_roundtrip_stats(p, b, 1, 5, 12, nbytes=100, variant=v)
                p.wait(12, timeout=20)
                assert b.imm_counter(5).count == n0 + 12, (v, drive)
                assert torch.equal(dst[:100], src[:100]) and (dst[100:] == 0x7F).all()
                gpu.proxy_roundtrip_stats(p, None, 0, 0, 5, variant=v)  # NOP items
                assert p.completed == 17 and p.failed == 0
        assert gpu.pcie_pingpong_stats(5, variant=v).mean_us > 0
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

    from pplx.moe import internode_gpu as g

    sig = {"ring_ptr": "*i64", "counters_ptr": "*i64", "flag_ptr": "*i64",
           "status_ptr": "*i64", "times_ptr": "*i64", "num_slots": "i32", "ticket0": "i64",
           "flag0": "i64", "iters": "i32", "word1": "i64", "nbytes": "i32", "word5": "i64",
           "stagger": "i64"}
    ce = ("ITEM", "PUBLISH", "DEPTH", "CACHE_CONSUMED", "ASM", "MAX_SPINS")
    sig.update({k: "constexpr" for k in ce})
    for v in g.VARIANTS:
        for item in (True, False):
            cst = dict(ITEM=item, PUBLISH=v.publish, DEPTH=v.depth,
                       CACHE_CONSUMED=v.cache_consumed, ASM=True, MAX_SPINS=g.MAX_SPINS)
            c = triton.compile(ASTSource(g._roundtrip_kernel, sig, cst),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": v.num_warps})
            assert c.asm["cubin"]
            ptx = c.asm["ptx"]
            if v.publish == g.PUB_XCHG:
                assert "atom" in ptx and ".sys" in ptx, "expected a system-scope atomic"
            elif v.publish == g.PUB_RELEASE:
                assert "st.release.sys" in ptx
            else:
                assert "st.relaxed.sys.global.v2.b64" in ptx or not item
                assert "fence" not in ptx and "membar" not in ptx, "tagged: no fence"
            if v.depth > 1:
                assert ptx.count("ld.relaxed.sys.global.b64") >= 2 * v.depth
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


_GPU = """
import torch
from pplx.fabric import TransferEngine
from pplx.fabric.proxy import HostProxy
from pplx.moe import internode_gpu as g

a, b = TransferEngine("shm"), TransferEngine("shm")
g_ = torch.Generator().manual_seed(7)
src = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g_)
dst = torch.full((4096,), 0x7F, dtype=torch.uint8)
mr, _ = a.register_tensor(src)
_, d = b.register_tensor(dst)
for v in g.VARIANTS:
    for drive in (False, True):
        ring = torch.zeros(16 * 8, dtype=torch.int64, pin_memory=True)
        dst.fill_(0x7F)
        with HostProxy(a, mr, [d], num_slots=16, ring=ring, tagged=v.tagged,
                       drive_progress=drive, idle_sleep_us=0) as p:
            n0 = b.imm_counter(3).count
            rt = g.proxy_roundtrip_stats(p, b, 0, 3, 300, nbytes=100, device="cuda",
                                         variant=v, max_spins=1 << 22)
            p.wait(300, timeout=20)
            assert b.imm_counter(3).count == n0 + 300 and p.failed == 0, (v, drive)
            assert torch.equal(dst[:100], src[:100]) and (dst[100:] == 0x7F).all()
            assert rt.us is not None and (rt.us > 0).all(), v
            g.proxy_roundtrip_stats(p, None, 0, 0, 50, device="cuda", variant=v)
            assert p.completed == 350
    rt = g.pcie_pingpong_stats(300, device="cuda", variant=v)
    assert (rt.us > 0).all()
    print(v.name, round(float(rt.mean_us), 2))
a.close()
b.close()
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_producer_every_variant_on_gpu():
    assert "ok" in _run(_GPU, False)
