"""A shm peer process that dies while holding a libfabric shm region lock.

libfabric 1.17's shm provider guards each endpoint's command queue with a process-shared
spinlock inside its region (/dev/shm/<name>); a process killed while one of its threads holds
one (its own, in a progress pass; a peer's, while posting to it) leaves it held for ever, and
whoever posts to that region next spins inside libfabric with its engine lock held: the
intermittent hang of the killed-peer test. Here the dying rank takes such a lock on purpose
(pthread_spin_lock on the real lock word) and exits; the survivor must get PeerDead within a
bound and keep working. native/src/peers.c says how the engine recovers.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time

import pytest
import torch
import torch.distributed as dist

from pplx._ffi import PeerDead
from pplx.fabric import FabricTimeout, TransferEngine
from pplx.fabric.bootstrap import exchange_addresses, exchange_descriptors
from pplx.spawn import spawn

SMR_LOCK_OFF = 24  # struct smr_region.lock in libfabric 1.17 (peers.c checks the layout)


def _region_names(addr: bytes) -> list[str]:
    """The shm region names in a main address: [0x50][n] then per domain [u16 len][name]."""
    names, pos = [], 2
    for _ in range(addr[1]):
        (n,) = struct.unpack_from("<H", addr, pos)
        names.append(addr[pos + 2 : pos + 2 + n].rstrip(b"\0").decode())
        pos += 2 + n
    return names


def _lock_region_and_die(name: str) -> None:
    """Take the spinlock of /dev/shm/<name> as libfabric does, then exit holding it."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    word = ctypes.c_int.from_buffer(mm, SMR_LOCK_OFF)
    libc = ctypes.CDLL(None)
    assert libc.pthread_spin_lock(ctypes.byref(word)) == 0
    os._exit(0)  # no fi_close, lock held


def _worker(rank: int, world: int, whose: str) -> dict:
    eng = TransferEngine("shm")
    if eng.peer_watch < 2:
        return {"skip": f"peer_watch={eng.peer_watch}: shm layout not recognised"}
    n = 1 << 16
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    dst = torch.full((n,), 0x7F, dtype=torch.uint8)
    mr, _ = eng.register_tensor(buf)
    _, ddesc = eng.register_tensor(dst)
    descs = exchange_descriptors(ddesc)
    addrs = exchange_addresses(eng)
    # Both sides have imported each other (the survivor watches the dying rank from here).
    eng.submit_write(mr, descs[1 - rank], 8, imm=1).wait(30)
    eng.imm_counter(1).wait(1, timeout=30)
    dist.barrier()
    if rank == 1:
        # "peer": our own region's lock (as if killed in a progress pass);
        # "own": the survivor's region lock (as if killed while posting to it).
        _lock_region_and_die(_region_names(addrs[0 if whose == "own" else 1])[0])
    t0 = time.monotonic()
    outcome = None
    while outcome is None and time.monotonic() - t0 < 30:
        try:
            eng.submit_write(mr, descs[1], 4096, imm=2).wait(timeout=2.0)
        except (PeerDead, FabricTimeout) as exc:
            outcome = type(exc).__name__
    elapsed = time.monotonic() - t0
    # The engine still works: a write to itself, bit-exact.
    eng.submit_write(mr, descs[0], n, imm=3).wait(10)
    eng.imm_counter(3).wait(1, timeout=10)
    assert torch.equal(dst, buf)
    stats = eng.stats()
    t1 = time.monotonic()
    eng.close()
    return {
        "outcome": outcome,
        "elapsed": elapsed,
        "close_s": time.monotonic() - t1,
        "dead": stats["peers_dead"],
        "recovered": stats["locks_recovered"],
    }


@pytest.mark.parametrize("whose", ["peer", "own"])
def test_peer_dies_holding_a_shm_region_lock(whose):
    out = spawn(_worker, 2, args=(whose,), timeout_s=120, may_exit=[1])[0]
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["outcome"] == "PeerDead", out
    assert out["dead"] == 1 and out["recovered"] >= 1, out
    assert out["elapsed"] < 10 and out["close_s"] < 5, out
