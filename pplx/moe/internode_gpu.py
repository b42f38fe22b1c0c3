"""The GPU side of the host proxy: a Triton kernel that writes work items into the proxy's
ring and polls the ImmCounter table, both in host-mapped memory, and the measurements that
split its round trip into parts.

    GPU kernel                     C proxy thread              receiver's progress
    ----------                     --------------              -------------------
    slot free? (cached `consumed`)
    store item words 1..5, seq  -> sees seq == t + 1 (and, in a
      (tagged ring: any order,      tagged ring, every word's tag)
       no fence; else seq last,    pplx_write(..., imm) -----> completion: imm_table[imm]++
       system-scope release)
    poll imm_table[imm] >= i + 1 <------------------------------ (release store)

One launch runs `iters` round trips back to back (one program), so the launch overhead is
paid once; the host divides the kernel's time by `iters`, and on CUDA the kernel also
times every round trip with the SM clock (`RoundTrip.us`, converted with %globaltimer).
Under TRITON_INTERPRET=1 the same kernels run on the CPU against the same memory (what the
CPU tests exercise); the inline PTX then has a plain Triton fallback.

Variants (`Variant`; the parts are measured by `pplx.bench.moe_internode --proxy`):
- publish: `PUB_XCHG` (words with plain stores, seq by `atomic_xchg(release, sys)`: a
  fence plus a non-posted atomic over PCIe), `PUB_RELEASE` (one thread: words as vector
  stores, seq by `st.release.sys`: a fence plus a posted store), `PUB_TAGGED` (tagged ring,
  `HostProxy(tagged=True)`: every word, seq included, by `st.relaxed.sys` vector stores,
  no fence at all; the proxy checks each word's tag);
- poll: `depth` 0 is `tl.load(volatile=True)` in a Triton loop; depth k >= 1 is one inline
  PTX loop that keeps k `ld.relaxed.sys` loads of the flag in flight, issued `stagger`
  cycles apart, so that a flag write is seen after about L/2 + L/(2k) instead of L
  (L: one load's round trip over PCIe). The poll has no acquire fence: this benchmark
  reads nothing that the flag guards (a consumer that does adds `fence.acq_rel.sys`).
- `cache_consumed`: read the proxy's `consumed` counter (host memory, one PCIe round trip)
  only when the ring might be full, not before every item.
- `num_warps`: 1. The first version ran Triton's default 4 warps: every warp stored the item
  and polled, and the scalar atomic went through a CTA barrier (publish 3.0 us, not 0.65).

`DEFAULT` (tagged ring, one poll in flight), with `HostProxy(tagged=True,
drive_progress=True)`, was the fastest on an H100 (PERFORMANCE.md, "Proxy round trip on
the H100 machine"): 2.97 us p50 for the whole path, 10.9-12.1 us before. More polls in
flight were slower (loads of one address from one SM do not overlap: each added ~1 us).

Memory: the ring is a pinned host tensor given to `HostProxy(ring=...)`; the ImmCounter
table (engine-allocated, page-aligned) and the proxy's counters (their own page) are
registered with `cudaHostRegister` so that the GPU can read them. With UVA (every 64-bit
CUDA platform) the device address of each equals the host address.

Warning: every polling loop is bounded by MAX_SPINS; a kernel that gives up stores -1 - i
to its status (no hang on a lost peer), and the host raises TimeoutError.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch
import triton
import triton.language as tl

from pplx.fabric.engine import TransferEngine
from pplx.fabric.proxy import (
    COMPLETED,
    OP_NOP,
    OP_WRITE,
    TAG_SHIFT,
    HostProxy,
    bench_echo,
)

# Polls before the kernel gives up: a poll of host memory over PCIe takes about 1 us, so
# 2^24 polls is ~17 s: far above a round trip, short enough that a lost proxy ends a run.
MAX_SPINS = 1 << 24

PUB_XCHG, PUB_RELEASE, PUB_TAGGED = 0, 1, 2
# The same constants for the kernels (Triton reads only constexpr globals).
_XCHG = tl.constexpr(PUB_XCHG)
_RELEASE = tl.constexpr(PUB_RELEASE)
_TAGGED = tl.constexpr(PUB_TAGGED)
_TAG_SHIFT = tl.constexpr(TAG_SHIFT)
STATUS_WORDS = 8  # [done or -1 - i, clock0, clock1, globaltimer0, globaltimer1, ...]
TIME_WORDS = 4  # per round trip: [cycles to publish, cycles in total, polls, 0]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way for the kernel to publish an item and to poll for the answer."""

    name: str
    publish: int = PUB_TAGGED
    depth: int = 1
    stagger: int = 0  # cycles between the first `depth` polls (0: L / depth, measured)
    cache_consumed: bool = True
    num_warps: int = 1

    @property
    def tagged(self) -> bool:
        return self.publish == PUB_TAGGED


# As measured before this module had variants (PERFORMANCE.md: 10.9 us on an H100).
BEFORE = Variant("xchg + volatile polls, 4 warps (before)", PUB_XCHG, 0, 0, False, 4)
VARIANTS = (
    BEFORE,
    Variant("xchg + volatile polls", PUB_XCHG, 0),
    Variant("st.release.sys + 1 poll in flight", PUB_RELEASE, 1),
    Variant("tagged, no fence + 1 poll in flight", PUB_TAGGED, 1),
    Variant("tagged, no fence + 2 polls in flight", PUB_TAGGED, 2),
    Variant("tagged, no fence + 4 polls in flight", PUB_TAGGED, 4),
)
DEFAULT = VARIANTS[3]


# ---- inline PTX ----------------------------------------------------------------------
def _poll_asm(depth: int) -> str:
    """$0 = last value seen, $1 = rounds; $2 = address, $3 = wanted value (signed >=),
    $4 = max rounds, $5 = stagger (cycles between the first `depth` loads)."""
    regs = ", ".join(f"%v{j}" for j in range(depth))
    lines = [
        "{",
        ".reg .pred %pp;",
        f".reg .b64 {regs}, %c0, %c1;",
        ".reg .b32 %n;",
        "mov.u32 %n, 0;",
        "ld.relaxed.sys.global.b64 %v0, [$2];",
    ]
    for j in range(1, depth):  # prime: loads j = 1 .. depth-1, `stagger` cycles apart
        lines += [
            "mov.u64 %c0, %clock64;",
            f"D{j}_${{:uid}}:",
            "mov.u64 %c1, %clock64;",
            "sub.s64 %c1, %c1, %c0;",
            "setp.lt.s64 %pp, %c1, $5;",
            f"@%pp bra D{j}_${{:uid}};",
            f"ld.relaxed.sys.global.b64 %v{j}, [$2];",
        ]
    lines.append("L_${:uid}:")
    for j in range(depth):  # wait for the oldest load, test it, reissue it
        lines += [
            f"mov.b64 $0, %v{j};",
            f"setp.ge.s64 %pp, %v{j}, $3;",
            "@%pp bra E_${:uid};",
            f"ld.relaxed.sys.global.b64 %v{j}, [$2];",
        ]
    lines += [
        "add.u32 %n, %n, 1;",
        "setp.lt.u32 %pp, %n, $4;",
        "@%pp bra L_${:uid};",
        "E_${:uid}:",
        "mov.u32 $1, %n;",
        "}",
    ]
    return "\n".join(lines)


_POLL1 = tl.constexpr(_poll_asm(1))
_POLL2 = tl.constexpr(_poll_asm(2))
_POLL4 = tl.constexpr(_poll_asm(4))


def _thread0_asm(body: str) -> str:
    """PTX: `body` (stores of operands $1...) by thread 0 of the program only, then $0 =
    the clock after."""
    return (
        "{\n.reg .pred %p;\n.reg .b32 %t;\nmov.u32 %t, %tid.x;\nsetp.eq.u32 %p, %t, 0;\n"
        + "".join(f"@%p {line}\n" for line in body.strip().splitlines())
        + "mov.u64 $0, %clock64;\n}"
    )


# One thread stores the item: word 1, words 2-3 and 4-5 as 16-byte vectors, then seq with a
# system-scope release (orders this thread's earlier stores for the CPU).
_PUB_RELEASE_ITEM = tl.constexpr(
    _thread0_asm(
        """
st.global.b64 [$1+8], $2;
st.global.v2.b64 [$1+16], {$3, $4};
st.global.v2.b64 [$1+32], {$5, $6};
st.release.sys.global.b64 [$1], $7;
"""
    )
)
# Tagged ring: every word carries the ticket's tag, so three relaxed 16-byte stores in any
# order, no fence ({seq, word 1}, {2, 3}, {4, 5}).
_PUB_TAGGED_ITEM = tl.constexpr(
    _thread0_asm(
        """
st.relaxed.sys.global.v2.b64 [$1], {$7, $2};
st.relaxed.sys.global.v2.b64 [$1+16], {$3, $4};
st.relaxed.sys.global.v2.b64 [$1+32], {$5, $6};
"""
    )
)
_PUB_RELEASE_WORD = tl.constexpr(_thread0_asm("st.release.sys.global.b64 [$1], $2;"))
_PUB_RELAXED_WORD = tl.constexpr(_thread0_asm("st.relaxed.sys.global.b64 [$1], $2;"))


@triton.jit
def _clock(ASM: tl.constexpr):
    if ASM:
        c = tl.inline_asm_elementwise(
            "mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
    else:
        c = tl.cast(0, tl.int64)
    return c


@triton.jit
def _globaltimer(ASM: tl.constexpr):
    if ASM:
        c = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
    else:
        c = tl.cast(0, tl.int64)
    return c


@triton.jit
def _publish(ptr, w1, w2, w3, w4, w5, seq, ITEM: tl.constexpr, PUBLISH: tl.constexpr,
             ASM: tl.constexpr):  # fmt: skip
    """Store an item (ITEM) or one word `seq` at `ptr`; returns the clock after."""
    if ASM and PUBLISH != _XCHG:
        # (Triton cannot hold a string in a variable: one call per asm text.)
        if ITEM:
            words = [ptr, w1, w2, w3, w4, w5, seq]
            if PUBLISH == _RELEASE:
                c = tl.inline_asm_elementwise(
                    _PUB_RELEASE_ITEM, "=l,l,l,l,l,l,l,l", words, dtype=tl.int64,
                    is_pure=False, pack=1,
                )  # fmt: skip
            else:
                c = tl.inline_asm_elementwise(
                    _PUB_TAGGED_ITEM, "=l,l,l,l,l,l,l,l", words, dtype=tl.int64,
                    is_pure=False, pack=1,
                )  # fmt: skip
        else:
            if PUBLISH == _RELEASE:
                c = tl.inline_asm_elementwise(
                    _PUB_RELEASE_WORD, "=l,l,l", [ptr, seq], dtype=tl.int64, is_pure=False,
                    pack=1,
                )  # fmt: skip
            else:
                c = tl.inline_asm_elementwise(
                    _PUB_RELAXED_WORD, "=l,l,l", [ptr, seq], dtype=tl.int64, is_pure=False,
                    pack=1,
                )  # fmt: skip
    else:
        # PUB_XCHG, and every variant under the interpreter (a tagged item's words may go
        # in any order; this order is one of them).
        if ITEM:
            tl.store(ptr + 1, w1)
            tl.store(ptr + 2, w2)
            tl.store(ptr + 3, w3)
            tl.store(ptr + 4, w4)
            tl.store(ptr + 5, w5)
        tl.atomic_xchg(ptr, seq, sem="release", scope="sys")
        c = _clock(ASM)
    return c


@triton.jit
def _poll(flag_ptr, want, stagger, DEPTH: tl.constexpr, ASM: tl.constexpr,
          MAX_SPINS: tl.constexpr):  # fmt: skip
    """Poll `*flag_ptr` until it is >= want (or MAX_SPINS rounds); returns (value, rounds)."""
    if ASM and DEPTH > 0:
        args = [flag_ptr, want, tl.cast(MAX_SPINS, tl.int32), stagger]
        if DEPTH == 1:
            got, n = tl.inline_asm_elementwise(
                _POLL1, "=l,=r,l,l,r,l", args, dtype=(tl.int64, tl.int32), is_pure=False,
                pack=1,
            )  # fmt: skip
        elif DEPTH == 2:
            got, n = tl.inline_asm_elementwise(
                _POLL2, "=l,=r,l,l,r,l", args, dtype=(tl.int64, tl.int32), is_pure=False,
                pack=1,
            )  # fmt: skip
        else:
            got, n = tl.inline_asm_elementwise(
                _POLL4, "=l,=r,l,l,r,l", args, dtype=(tl.int64, tl.int32), is_pure=False,
                pack=1,
            )  # fmt: skip
        rounds = n.to(tl.int64)
    else:
        rounds = tl.cast(0, tl.int64)
        got = tl.load(flag_ptr, volatile=True)
        while (got < want) & (rounds < MAX_SPINS):
            got = tl.load(flag_ptr, volatile=True)
            rounds += 1
    return got, rounds


@triton.jit
def _wait_slot(counters_ptr, t, num_slots, consumed, CACHE_CONSUMED: tl.constexpr,
               MAX_SPINS: tl.constexpr):  # fmt: skip
    """Wait until ticket t's slot is free (the proxy consumed ticket t - num_slots); with
    CACHE_CONSUMED, read the counter (a PCIe round trip) only when the ring may be full."""
    if CACHE_CONSUMED:
        if t - consumed >= num_slots:
            consumed = tl.load(counters_ptr, volatile=True)
    else:
        consumed = tl.load(counters_ptr, volatile=True)
    spins = 0
    while (t - consumed >= num_slots) & (spins < MAX_SPINS):
        consumed = tl.load(counters_ptr, volatile=True)
        spins += 1
    return consumed


# Tickets and counts change every launch: specialising on them (divisibility by 16, == 1)
# recompiled the kernel inside a timed launch (host mean 55 us per round trip on the H100).
@triton.jit(
    do_not_specialize=[
        "num_slots", "ticket0", "flag0", "iters", "word1", "nbytes", "word5", "stagger"
    ]
)  # fmt: skip
def _roundtrip_kernel(
    ring_ptr,  # [num_slots * 8] int64: the proxy's ring (ITEM), else the ping word
    counters_ptr,  # [8] int64: the proxy's counters (CONSUMED at 0); unused without ITEM
    flag_ptr,  # the word to poll: imm_table[imm], counters[COMPLETED], or the pong word
    status_ptr,  # [STATUS_WORDS] int64
    times_ptr,  # [iters * TIME_WORDS] int64 (device memory)
    num_slots,
    ticket0,
    flag0,  # *flag_ptr before the launch; round trip i waits for flag0 + i + 1
    iters,
    word1,  # op | dst << 32
    nbytes,
    word5,  # imm | has_imm << 32
    stagger,
    ITEM: tl.constexpr,
    PUBLISH: tl.constexpr,
    DEPTH: tl.constexpr,
    CACHE_CONSUMED: tl.constexpr,
    ASM: tl.constexpr,
    MAX_SPINS: tl.constexpr,
):
    failed = 0
    done = 0
    num_slots = tl.cast(num_slots, tl.int64)
    ticket0 = tl.cast(ticket0, tl.int64)
    flag0 = tl.cast(flag0, tl.int64)
    stagger = tl.cast(stagger, tl.int64)
    consumed = tl.load(counters_ptr, volatile=True)
    # Round trip i's times are stored during round trip i + 1's poll, so that no store to
    # device memory is outstanding when a publish fences.
    d_pub = tl.cast(0, tl.int64)
    d_all = tl.cast(0, tl.int64)
    d_polls = tl.cast(0, tl.int64)
    g0 = _globaltimer(ASM)
    k0 = _clock(ASM)
    for i in range(iters):
        if failed == 0:
            t = ticket0 + i
            c0 = _clock(ASM)
            if ITEM:
                consumed = _wait_slot(
                    counters_ptr, t, num_slots, consumed, CACHE_CONSUMED, MAX_SPINS
                )
                slot = ring_ptr + (t % num_slots) * 8
                if PUBLISH == _TAGGED:
                    tag = ((t // num_slots) % 255 + 1) << _TAG_SHIFT
                else:
                    tag = tl.cast(0, tl.int64)
                c1 = _publish(
                    slot,
                    tl.cast(word1, tl.int64) | tag,
                    tag,  # src_offset 0
                    tag,  # dst_offset 0
                    tl.cast(nbytes, tl.int64) | tag,
                    tl.cast(word5, tl.int64) | tag,
                    t + 1,
                    True,
                    PUBLISH,
                    ASM,
                )
            else:
                c1 = _publish(ring_ptr, 0, 0, 0, 0, 0, t + 1, False, PUBLISH, ASM)
            if i > 0:
                tl.store(times_ptr + (i - 1) * 4, d_pub)
                tl.store(times_ptr + (i - 1) * 4 + 1, d_all)
                tl.store(times_ptr + (i - 1) * 4 + 2, d_polls)
            want = flag0 + i + 1
            got, polls = _poll(flag_ptr, want, stagger, DEPTH, ASM, MAX_SPINS)
            c2 = _clock(ASM)
            d_pub = c1 - c0
            d_all = c2 - c0
            d_polls = polls
            if got < want:
                failed = -1 - i
            else:
                done = i + 1
    k1 = _clock(ASM)
    g1 = _globaltimer(ASM)
    if done > 0:
        tl.store(times_ptr + (done - 1) * 4, d_pub)
        tl.store(times_ptr + (done - 1) * 4 + 1, d_all)
        tl.store(times_ptr + (done - 1) * 4 + 2, d_polls)
    tl.store(status_ptr, tl.where(failed != 0, failed, done))
    tl.store(status_ptr + 1, k0)
    tl.store(status_ptr + 2, k1)
    tl.store(status_ptr + 3, g0)
    tl.store(status_ptr + 4, g1)


# ---- host side -------------------------------------------------------------------------
def register_host_memory(t: torch.Tensor) -> None:
    """`cudaHostRegister` a host tensor (mapped, portable) so that kernels can access it."""
    cudart = torch.cuda.cudart()
    # 3 = cudaHostRegisterPortable | cudaHostRegisterMapped
    torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 3))


def unregister_host_memory(t: torch.Tensor) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))


@dataclasses.dataclass
class RoundTrip:
    """One launch of `iters` round trips. `mean_us` is host time / iters (launch included);
    on CUDA `us` (per round trip, SM clock converted with %globaltimer), `publish_us` (slot
    check and item stores, fence included) and `polls` (poll rounds) come from the kernel."""

    mean_us: float
    us: np.ndarray | None = None
    publish_us: np.ndarray | None = None
    polls: np.ndarray | None = None

    def p50(self) -> float:
        return float(np.median(self.us)) if self.us is not None else self.mean_us


def _launch(
    ring: torch.Tensor,
    counters: torch.Tensor,
    flag: torch.Tensor,
    flag_index: int,
    ticket0: int,
    iters: int,
    word1: int,
    nbytes: int,
    word5: int,
    num_slots: int,
    item: bool,
    variant: Variant,
    device: torch.device,
    max_spins: int,
    stagger: int,
    partner=None,
) -> RoundTrip:
    """Run the kernel once; `partner()` (if any) runs on a host thread meanwhile."""
    cuda = device.type == "cuda"
    status = torch.zeros(STATUS_WORDS, dtype=torch.int64, device=device)
    times = torch.zeros(max(iters, 1) * TIME_WORDS, dtype=torch.int64, device=device)
    flag0 = int(flag[flag_index])
    th = err = None
    if partner is not None:
        err = []

        def run():
            try:
                partner()
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                err.append(e)

        th = threading.Thread(target=run, daemon=True)
        th.start()
    flag_ptr = flag[flag_index:]
    t0 = time.perf_counter()
    _roundtrip_kernel[(1,)](
        ring,
        counters,
        flag_ptr,
        status,
        times,
        num_slots,
        ticket0,
        flag0,
        iters,
        word1,
        nbytes,
        word5,
        stagger,
        ITEM=item,
        PUBLISH=variant.publish,
        DEPTH=variant.depth,
        CACHE_CONSUMED=variant.cache_consumed,
        ASM=cuda,
        MAX_SPINS=max_spins,
        num_warps=variant.num_warps,
    )
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    st = status.cpu().numpy()
    got = int(st[0])
    if th is not None and got == iters:  # (after a failure the partner times out alone)
        th.join(60.0)
        if err:
            raise err[0]
    if got != iters:
        raise TimeoutError(
            f"GPU round trip {-got - 1 if got < 0 else got} of {iters} ({variant.name}): the "
            f"kernel gave up polling after {max_spins} spins (flag {int(flag[flag_index])}, "
            f"wanted {flag0 + (-got if got < 0 else got) + 1})"
        )
    rt = RoundTrip(mean_us=elapsed / iters * 1e6)
    if cuda and st[4] > st[3] and st[2] > st[1]:
        ns_per_cycle = (st[4] - st[3]) / (st[2] - st[1])
        tw = times.view(iters, TIME_WORDS).cpu().numpy()
        rt.us = tw[:, 1] * ns_per_cycle / 1e3
        rt.publish_us = tw[:, 0] * ns_per_cycle / 1e3
        rt.polls = tw[:, 2].copy()
    return rt


_POLL_CYCLES: dict[int, float] = {}


def _stagger(variant: Variant, device: torch.device, stagger: int) -> int:
    """Cycles between the first polls: given, the variant's, or L / depth (L measured once
    per device by `poll_cycles`)."""
    if stagger or variant.stagger or variant.depth <= 1 or device.type != "cuda":
        return stagger or variant.stagger
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _POLL_CYCLES:
        _POLL_CYCLES[idx] = poll_cycles(device=torch.device("cuda", idx))[0]
    return int(_POLL_CYCLES[idx] / variant.depth)


def _check(variant: Variant, proxy: HostProxy | None = None) -> None:
    if variant.depth not in (0, 1, 2, 4):
        raise ValueError(f"{variant.name}: depth must be 0, 1, 2 or 4, got {variant.depth}")
    if variant.publish not in (PUB_XCHG, PUB_RELEASE, PUB_TAGGED):
        raise ValueError(f"{variant.name}: unknown publish {variant.publish}")
    if proxy is not None and variant.tagged != proxy.tagged:
        raise ValueError(
            f"{variant.name}: the proxy's ring must be {'tagged' if variant.tagged else 'plain'}"
            " (HostProxy(tagged=...))"
        )


def _ring_of(proxy: HostProxy) -> torch.Tensor:
    ring = proxy._ring_owner
    if ring is None:
        raise ValueError("build the HostProxy on a ring tensor (HostProxy(ring=...))")
    return ring


def proxy_roundtrip_stats(
    proxy: HostProxy,
    receiver: TransferEngine | None,
    dst: int,
    imm: int,
    iters: int,
    *,
    nbytes: int = 8,
    device: torch.device | str = "cpu",
    variant: Variant = DEFAULT,
    max_spins: int = MAX_SPINS,
    stagger: int = 0,
) -> RoundTrip:
    """`iters` kernel -> ring -> proxy -> write with imm -> receiver's ImmCounter -> kernel
    round trips in one launch.

    `proxy` must be built on a zeroed ring tensor (`HostProxy(ring=...)`, pinned on CUDA,
    `tagged=variant.tagged`) and have had no other producer; `receiver` owns `proxy`'s
    descriptor `dst`. With `receiver=None` the items are NOPs and the kernel polls the
    proxy's `completed` counter instead (ring and proxy thread, no fabric).
    Raises TimeoutError if the kernel's polling gave up.
    """
    _check(variant, proxy)
    device = torch.device(device)
    ring = _ring_of(proxy)
    counters = proxy.counters
    if receiver is None:
        flag, index, word1, word5, nbytes = counters, COMPLETED, OP_NOP, 0, 0
    else:
        flag, index = receiver.imm_table(), imm
        word1, word5 = OP_WRITE | (dst << 32), imm | (1 << 32)
    cuda = device.type == "cuda"
    regs = [counters] if receiver is None else [flag, counters]
    if cuda:
        for t in regs:
            register_host_memory(t)
    try:
        rt = _launch(
            ring,
            counters,
            flag,
            index,
            proxy.submitted,
            iters,
            word1,
            nbytes,
            word5,
            proxy.num_slots,
            True,
            variant,
            device,
            max_spins,
            _stagger(variant, device, stagger),
        )
    finally:
        proxy.submitted += iters  # the items are in the ring, whatever the kernel saw
        if cuda:
            for t in regs:
                unregister_host_memory(t)
    return rt


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
    variant: Variant | None = None,
) -> float:
    """Mean microseconds of one kernel -> proxy -> write -> imm -> kernel round trip
    (`proxy_roundtrip_stats`; the variant follows the proxy's ring: `DEFAULT` on a tagged
    ring, `PUB_RELEASE` with one poll in flight on a plain one)."""
    if variant is None:
        variant = DEFAULT if proxy.tagged else VARIANTS[2]
    return proxy_roundtrip_stats(
        proxy,
        receiver,
        dst,
        imm,
        iters,
        nbytes=nbytes,
        device=device,
        variant=variant,
        max_spins=max_spins,
    ).mean_us


def pcie_pingpong_stats(
    iters: int,
    *,
    device: torch.device | str = "cpu",
    variant: Variant = DEFAULT,
    max_spins: int = MAX_SPINS,
    stagger: int = 0,
    timeout: float = 60.0,
) -> RoundTrip:
    """GPU -> host word -> C thread (`bench_echo`) -> host word -> GPU, `iters` times in one
    launch: the PCIe part of the round trip alone (no ring, no proxy, no fabric). The
    kernel stores the ping with the variant's publish (tagged: a relaxed store)."""
    _check(variant)
    device = torch.device(device)
    cuda = device.type == "cuda"
    # ping at word 0, pong at word 16: different cache lines (and 128-byte sectors).
    words = torch.zeros(32, dtype=torch.int64, pin_memory=cuda)
    ping, pong = words[0:1], words[16:17]
    return _launch(
        words,
        words,  # unused without ITEM
        words,
        16,
        0,
        iters,
        0,
        0,
        0,
        1,
        False,
        variant,
        device,
        max_spins,
        _stagger(variant, device, stagger),
        partner=lambda: bench_echo(ping, pong, 1, iters, timeout),
    )


def poll_cycles(*, device: torch.device | str = "cuda", polls: int = 256) -> tuple[float, float]:
    """(SM cycles, ns) of one poll of host memory (a load's round trip over PCIe): `polls`
    polls of a word that never reaches the wanted value, in one asm loop (CUDA only)."""
    device = torch.device(device)
    word = torch.zeros(32, dtype=torch.int64, pin_memory=True)
    status = torch.zeros(STATUS_WORDS, dtype=torch.int64, device=device)
    times = torch.zeros(TIME_WORDS, dtype=torch.int64, device=device)
    # One "round trip" that never completes: the kernel gives up after `polls` rounds.
    _roundtrip_kernel[(1,)](
        word, word, word[16:], status, times, 1, 0, 1 << 40, 1, 0, 0, 0, 0,
        ITEM=False, PUBLISH=PUB_TAGGED, DEPTH=1, CACHE_CONSUMED=True, ASM=True,
        MAX_SPINS=polls, num_warps=1,
    )  # fmt: skip
    torch.cuda.synchronize(device)
    st = status.cpu().numpy()
    if int(st[0]) != -1:
        raise RuntimeError(f"poll probe: expected one failed round trip, got status {st[0]}")
    return float(st[2] - st[1]) / polls, float(st[4] - st[3]) / polls
