"""HostProxy: the C thread posting writes from a ring of work items (native/src/proxy.c).

Two engines in one process (each its own progress thread), shm and tcp, fault injection on
for the counting tests. Destinations are poisoned (0x7F) first; data is compared
bit-exactly and everything outside the written ranges must still be poison.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pplx.fabric import FaultInjection, InvalidArgument, TransferEngine, TransferFailed
from pplx.fabric.proxy import OP_IMM, OP_NOP, OP_WRITE, HostProxy, bench_echo, ticket_tag

PROVIDERS = ["shm", "tcp"]
POISON = 0x7F
T = 20.0


def make(provider: str, **kw) -> TransferEngine:
    return TransferEngine(provider, node="127.0.0.1" if provider == "tcp" else None, **kw)


def rand_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.fixture(params=PROVIDERS)
def pair(request):
    a = make(request.param)
    b = make(request.param, fault_injection=FaultInjection(window=8, max_delay_us=100, seed=5))
    yield a, b
    a.close()
    b.close()


MODES = {"plain": {}, "tagged": {"tagged": True}, "drive": {"drive_progress": True}}
MODES["tagged+drive"] = {"tagged": True, "drive_progress": True}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("producer", ["c", "python"])
def test_proxy_writes_land_and_count(pair, producer, mode):
    a, b = pair
    size = 1 << 16
    src = rand_bytes(size, 1)
    dst = torch.full((size,), POISON, dtype=torch.uint8)
    src_mr, _ = a.register_tensor(src)
    _, dst_desc = b.register_tensor(dst)
    # Ring of 8 slots, 300 items: the producer laps the ring many times (slot reuse).
    with HostProxy(
        a, src_mr, [None, dst_desc], num_slots=8, idle_sleep_us=0, **MODES[mode]
    ) as proxy:
        rng = np.random.default_rng(3)
        expect = torch.full((size,), POISON, dtype=torch.uint8)
        n_items = 300
        for i in range(n_items):
            n = int(rng.integers(1, 200))
            so, do = int(rng.integers(0, size - n)), (i * 211) % (size - 256)
            kw = dict(src_offset=so, dst_offset=do, nbytes=n, imm=10 + i % 4)
            if producer == "c":
                proxy.submit(1, **kw)
            else:
                while True:
                    try:
                        proxy.put(1, **kw)
                        break
                    except InvalidArgument:  # ring full: the proxy catches up
                        pass
            # Writes may complete out of order: destination ranges are disjoint (starts
            # 211 bytes apart, at most 199 bytes long, 300 * 211 < size - 256: no wrap).
            expect[do : do + n] = src[so : so + n]
        proxy.wait(timeout=T)
        assert proxy.completed == n_items and proxy.failed == 0
        for imm in range(10, 14):
            b.imm_counter(imm).wait(n_items // 4, timeout=T)
            assert b.imm_counter(imm).count == n_items // 4
        assert torch.equal(dst, expect), (dst != expect).nonzero()[:5].tolist()


def test_proxy_imm_nop_trigger_and_errors(pair):
    a, b = pair
    src = rand_bytes(4096, 2)
    src_mr, _ = a.register_tensor(src)
    dst = torch.full((4096,), POISON, dtype=torch.uint8)
    _, dst_desc = b.register_tensor(dst)
    flag = torch.zeros(1, dtype=torch.int64)
    with HostProxy(a, src_mr, [dst_desc, None], num_slots=4) as proxy:
        exp = b.set_imm_count_expected(3, 5, flag=flag, value=42)
        proxy.submit(0, op=OP_NOP)
        for _ in range(5):
            proxy.submit(0, imm=3, op=OP_IMM)
        exp.wait(T)
        assert int(flag[0]) == 42 and b.imm_counter(3).count == 0  # consumed by the trigger
        proxy.wait(6, timeout=T)
        assert (dst == POISON).all()  # immediates carry no data
        # A missing descriptor and an out-of-bounds write fail their items, not the proxy.
        proxy.submit(1, nbytes=8, imm=1)
        with pytest.raises(TransferFailed, match="1 items failed"):
            proxy.wait(timeout=T)
    with HostProxy(a, src_mr, [dst_desc], num_slots=4) as proxy:
        proxy.submit(0, dst_offset=4090, nbytes=64)
        with pytest.raises(TransferFailed):
            proxy.wait(timeout=T)
        assert (dst == POISON).all()
    with pytest.raises(InvalidArgument, match="power of two"):
        HostProxy(a, src_mr, [dst_desc], num_slots=6)


def test_proxy_on_caller_ring_and_roundtrip():
    a = make("shm")
    b = make("shm")
    try:
        src = rand_bytes(4096, 4)
        src_mr, _ = a.register_tensor(src)
        dst = torch.full((4096,), POISON, dtype=torch.uint8)
        _, dst_desc = b.register_tensor(dst)
        ring = torch.zeros(16 * 8, dtype=torch.int64)
        with HostProxy(a, src_mr, [dst_desc], num_slots=16, ring=ring, idle_sleep_us=0) as proxy:
            assert proxy.ring_ptr == ring.data_ptr()
            ns = proxy.roundtrip_ns(b, 0, 8, imm=9, iters=200)
            # Speed is the benchmark's business (pplx.bench.moe_internode); here every one of
            # the 200 round trips must have completed and been timed.
            assert ns.shape == (200,) and (ns > 0).all(), ns
            assert torch.equal(dst[:8], src[:8]) and (dst[8:] == POISON).all()
            # The ring holds the last items with their tickets: seq of slot t % 16 is t + 1.
            assert int(ring.view(16, 8)[199 % 16, 0]) == 200
        bad = torch.ones(16 * 8, dtype=torch.int64)
        with pytest.raises(InvalidArgument, match="zero the ring"):
            HostProxy(a, src_mr, [dst_desc], num_slots=16, ring=bad)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("drive", [False, True])
def test_tagged_ring_waits_for_every_word(drive):
    """A tagged item is taken only once seq AND words 1..5 carry the ticket's tag, whatever
    order they landed in (a GPU stores them with no fence); a stale word holds it back."""
    a, b = make("shm"), make("shm")
    try:
        src = rand_bytes(256, 6)
        src_mr, _ = a.register_tensor(src)
        dst = torch.full((256,), POISON, dtype=torch.uint8)
        _, d = b.register_tensor(dst)
        ring = torch.zeros(4 * 8, dtype=torch.int64)
        with HostProxy(
            a, src_mr, [d], num_slots=4, ring=ring, tagged=True, drive_progress=drive
        ) as p:
            rows = ring.view(4, 8)
            for t in range(6):  # laps the 4-slot ring: stale words of the last lap are there
                tag = ticket_tag(t, 4)
                words = [OP_WRITE, 16 * t, 32 * t, 16, 7 | (1 << 32)]
                tagged = (np.array(words, dtype=np.uint64) | np.uint64(tag)).view(np.int64)
                row = rows[t % 4].numpy()
                row[0] = t + 1  # seq first
                row[1:5] = tagged[:4]  # word 5 is still last lap's (or zero)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 0.05:
                    assert p.consumed == t, (t, p.consumed)
                row[5] = tagged[4]
                p.submitted += 1
                p.wait(t + 1, timeout=T)
                b.imm_counter(7).wait(t + 1, timeout=T)
                assert torch.equal(dst[32 * t : 32 * t + 16], src[16 * t : 16 * t + 16])
            # Python's put on a tagged ring tags the words (and the C submit does too).
            p._put_ticket = 6
            p.put(0, src_offset=0, dst_offset=240, nbytes=16, imm=7)
            p.wait(7, timeout=T)
            b.imm_counter(7).wait(7, timeout=T)  # sender completion is not arrival
            assert torch.equal(dst[240:], src[:16])
            with pytest.raises(InvalidArgument, match="2\\^24"):
                p.put(1 << 24, nbytes=8)
    finally:
        a.close()
        b.close()


def test_bench_echo_answers_every_ping():
    ping = torch.zeros(8, dtype=torch.int64)
    pong = torch.zeros(8, dtype=torch.int64)
    th = threading.Thread(target=bench_echo, args=(ping, pong, 5, 50, 20.0))
    th.start()
    for v in range(5, 55):
        ping[0] = v
        t0 = time.monotonic()
        while int(pong[0]) != v:
            assert time.monotonic() - t0 < T
    th.join(T)
    assert not th.is_alive() and int(pong[0]) == 54
    with pytest.raises(Exception, match="echo"):
        bench_echo(ping, pong, 100, 1, timeout=0.01)


def test_dropped_proxy_stops_before_engine_closes():
    import gc

    a, b = make("shm"), make("shm")
    src_mr, _ = a.register_tensor(rand_bytes(64, 5))
    dst = torch.full((64,), POISON, dtype=torch.uint8)
    _, d = b.register_tensor(dst)
    p = HostProxy(a, src_mr, [d], num_slots=4)
    p.submit(0, nbytes=8, imm=2)
    p.wait(timeout=T)
    del p
    gc.collect()  # the finalizer joined the thread: closing the engine now is safe
    a.close()
    b.imm_counter(2).wait(1, timeout=T)
    b.close()
