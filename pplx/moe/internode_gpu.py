"""The GPU side of the host proxy: a Triton kernel that writes work items into the proxy's
ring and polls the ImmCounter table, both in host-mapped memory.

    GPU kernel                     C proxy thread              C progress thread
    ----------                     --------------              -----------------
    wait ring slot free (consumed)
    store item words 1..5
    atomic_xchg(seq, t + 1)  ----> sees seq == t + 1
      (release, system scope)      pplx_write(..., imm) -----> completion: imm_table[imm]++
    poll imm_table[imm] >= i + 1 <------------------------------ (release store)

One launch runs `iters` round trips back to back (one program), so the launch overhead is
paid once; the host divides the kernel's time by `iters`. Under TRITON_INTERPRET=1 the same
kernel runs on the CPU against the same memory (what the CPU tests exercise).

Memory: the ring is a pinned host tensor given to `HostProxy(ring=...)`; the ImmCounter
table is engine-allocated page-aligned memory, registered with `cudaHostRegister` so that
the GPU can read it (`register_host_memory`). With UVA (every 64-bit CUDA platform) the
device address of both equals the host address.

Warning: the polling loops are bounded by MAX_SPINS; a kernel that gives up stores -1 to
`status_ptr` (no hang on a lost peer).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from pplx.fabric.engine import TransferEngine
from pplx.fabric.proxy import CONSUMED, HostProxy

# Polls before the kernel gives up: a poll of host memory over PCIe takes about 1 us, so
# 2^24 polls is ~17 s: far above a round trip, short enough that a lost proxy ends a run.
MAX_SPINS = 1 << 24


@triton.jit
def _proxy_roundtrip_kernel(
    ring_ptr,  # [num_slots * 8] int64: the proxy's ring
    counters_ptr,  # [8] int64: the proxy's counters (CONSUMED at 0)
    imm_table_ptr,  # [imm_table_size] int64: arrivals per immediate at the receiver
    status_ptr,  # [1] int64: round trips done, or -1 - i if round trip i timed out
    num_slots,
    ticket0,
    count0,  # imm_table[imm] before the launch
    iters,
    dst,
    nbytes,
    imm,
    MAX_SPINS: tl.constexpr,
):
    failed = 0
    done = 0
    op_dst = (tl.cast(dst, tl.int64) << 32) | 1  # op WRITE (pplx.fabric.proxy.OP_WRITE = 1)
    imm_word = tl.cast(imm, tl.int64) | (1 << 32)  # imm | has_imm << 32
    for i in range(iters):
        if failed == 0:
            t = ticket0 + i
            # A free slot: the proxy has consumed ticket t - num_slots.
            spins = 0
            consumed = tl.load(counters_ptr, volatile=True)
            while (t - consumed >= num_slots) & (spins < MAX_SPINS):
                consumed = tl.load(counters_ptr, volatile=True)
                spins += 1
            slot = ring_ptr + (t % num_slots) * 8
            tl.store(slot + 1, op_dst)
            tl.store(slot + 2, tl.cast(0, tl.int64))  # src_offset
            tl.store(slot + 3, tl.cast(0, tl.int64))  # dst_offset
            tl.store(slot + 4, tl.cast(nbytes, tl.int64))
            tl.store(slot + 5, imm_word)
            # seq last, release at system scope: the proxy (a CPU thread) sees words 1..5.
            tl.atomic_xchg(slot, tl.cast(t + 1, tl.int64), sem="release", scope="sys")
            want = count0 + i + 1
            spins = 0
            got = tl.load(imm_table_ptr + imm, volatile=True)
            while (got < want) & (spins < MAX_SPINS):
                got = tl.load(imm_table_ptr + imm, volatile=True)
                spins += 1
            if got < want:
                failed = -1 - i
            else:
                done = i + 1
    tl.store(status_ptr, tl.where(failed != 0, failed, done))


def register_host_memory(t: torch.Tensor) -> None:
    """`cudaHostRegister` a host tensor (mapped, portable) so that kernels can access it."""
    cudart = torch.cuda.cudart()
    # 3 = cudaHostRegisterPortable | cudaHostRegisterMapped
    torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 3))


def unregister_host_memory(t: torch.Tensor) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))


def proxy_roundtrip_triton(
    proxy: HostProxy,
    receiver: TransferEngine,
    dst: int,
    imm: int,
    iters: int,
    *,
    nbytes: int = 8,
    device: torch.device | str = "cpu",
    max_spins: int = MAX_SPINS,
) -> float:
    """Mean microseconds of one kernel -> proxy -> write -> imm -> kernel round trip.

    `proxy` must be built on a zeroed ring tensor (`HostProxy(ring=...)`, pinned on CUDA)
    and have had no other producer; `receiver` owns `proxy`'s descriptor `dst`.
    Raises TimeoutError if the kernel's polling gave up.
    """
    device = torch.device(device)
    ring = proxy._ring_owner
    if ring is None:
        raise ValueError("proxy_roundtrip_triton: build the HostProxy on a ring tensor")
    table = receiver.imm_table()
    counters = proxy.counters
    cuda = device.type == "cuda"
    if cuda:
        register_host_memory(table)
        register_host_memory(counters)
    status = torch.zeros(1, dtype=torch.int64, pin_memory=cuda)
    try:
        count0 = int(table[imm])
        ticket0 = proxy.submitted
        args = (ring, counters, table, status, proxy.num_slots, ticket0, count0, iters, dst)
        t0 = time.perf_counter()
        _proxy_roundtrip_kernel[(1,)](*args, nbytes, imm, MAX_SPINS=max_spins)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    finally:
        if cuda:
            unregister_host_memory(table)
            unregister_host_memory(counters)
    proxy.submitted += iters
    got = int(status[0])
    if got != iters:
        raise TimeoutError(
            f"proxy round trip {-got - 1 if got < 0 else got} of {iters}: the kernel gave up "
            f"polling after {max_spins} spins (consumed {int(counters[CONSUMED])})"
        )
    return elapsed / iters * 1e6
