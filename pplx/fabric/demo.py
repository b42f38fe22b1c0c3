"""Two-process TransferEngine demo (`make demo-fabric`): latency and bandwidth on one host.

    python -m pplx.fabric.demo [--provider shm|tcp] [--csv out.csv]

Rank 0 and rank 1 are spawned processes joined by gloo, which only exchanges descriptors.
- lat: 8-byte write with immediate, ping-pong; one-way time = round trip / 2; once as a
  Python loop, once as a C loop over the same engine (`measure_pingpong`).
- bw: `n` writes of each size (4 KiB .. 16 MiB) with one immediate each, at most `window`
  in flight; the receiver counts the n arrivals and acks with an immediate. GB/s = bytes /
  (time to the ack). The last write of each size is checked bit-exactly.
Times are from Python (`time.perf_counter`), so they include the Python call overhead
(several microseconds per call); `python -m pplx.bench fabric` compares with raw libfabric.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from pplx.bench.common import Row, emit, percentiles
from pplx.fabric.bootstrap import exchange_descriptors
from pplx.fabric.engine import TransferEngine
from pplx.spawn import spawn

IMM_PING, IMM_PONG, IMM_DATA, IMM_ACK = 1, 2, 3, 4
SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20)
BUF_BYTES = 32 << 20
TIMEOUT = 30.0


def _writes_for(size: int) -> int:
    # About 64 MiB per repetition, at least 8 writes: long enough to time, short for a demo.
    return max(8, (64 << 20) // size)


def _rank(rank: int, world: int, provider: str, iters: int, reps: int, window: int) -> list:
    peer = 1 - rank
    node = "127.0.0.1" if provider == "tcp" else None
    # spin_us: waits and the progress thread spin 1 ms before napping (latency first).
    with TransferEngine(provider, node=node, spin_us=1000) as eng:
        g = torch.Generator().manual_seed(rank)
        buf = torch.randint(0, 256, (BUF_BYTES,), dtype=torch.uint8, generator=g)
        recv = torch.full((BUF_BYTES,), 0x7F, dtype=torch.uint8)
        src_mr, _ = eng.register_tensor(buf)
        _, recv_desc = eng.register_tensor(recv)
        peer_desc = exchange_descriptors(recv_desc)[peer]
        counts = {IMM_PING: 0, IMM_PONG: 0, IMM_DATA: 0, IMM_ACK: 0}

        def wait(imm: int, n: int = 1) -> None:
            counts[imm] += n
            eng.imm_counter(imm).wait(counts[imm], timeout=TIMEOUT)

        rows: list[Row] = []
        lat = []
        for i in range(iters + 20):  # 20 warm-up round trips
            if rank == 0:
                t0 = time.perf_counter()
                eng.submit_write(src_mr, peer_desc, 8, imm=IMM_PING)
                wait(IMM_PONG)
                if i >= 20:
                    lat.append((time.perf_counter() - t0) * 1e6 / 2)
            else:
                wait(IMM_PING)
                eng.submit_write(src_mr, peer_desc, 8, imm=IMM_PONG)
        if rank == 0:
            rows.append(_row("lat", 8, lat, provider, "Python loop, one-way = RTT / 2"))
        # The same ping-pong as a C loop over the engine API: the engine's own cost.
        c_lat = eng.measure_pingpong(
            src_mr, peer_desc, iters, initiator=rank == 0, length=8, timeout=TIMEOUT
        )
        if rank == 0:
            rows.append(_row("lat", 8, c_lat, provider, "C loop, one-way = RTT / 2"))
        for size in SIZES:
            n = _writes_for(size)
            slots = BUF_BYTES // size
            times = []
            for _ in range(reps + 1):  # one warm-up repetition
                if rank == 1:
                    wait(IMM_DATA, n)
                    eng.submit_write(src_mr, peer_desc, 8, imm=IMM_ACK).wait(TIMEOUT)
                    continue
                t0 = time.perf_counter()
                inflight = []
                for k in range(n):
                    if len(inflight) >= window:
                        inflight.pop(0).wait(TIMEOUT)
                    off = (k % slots) * size
                    inflight.append(
                        eng.submit_write(
                            src_mr, peer_desc, size, src_offset=off, dst_offset=off, imm=IMM_DATA
                        )
                    )
                wait(IMM_ACK)
                times.append((time.perf_counter() - t0) * 1e6)
                for r in inflight:
                    r.wait(TIMEOUT)
            if rank == 1:
                last = ((n - 1) % slots) * size
                want = torch.randint(
                    0,
                    256,
                    (BUF_BYTES,),
                    dtype=torch.uint8,
                    generator=torch.Generator().manual_seed(peer),
                )
                if not torch.equal(recv[last : last + size], want[last : last + size]):
                    raise AssertionError(f"bw {size} B: the last write arrived corrupted")
            else:
                rows.append(
                    _row("bw", size, times[1:], provider, f"{n} writes, window {window}", n=n)
                )
        return rows


def _row(
    case: str, size: int, samples: Sequence[float], provider: str, notes: str, n: int = 1
) -> Row:
    p50, p20, p80 = percentiles(samples)
    return Row(
        bench="fabric-demo",
        case=case,
        impl="pplx TransferEngine (Python)",
        p50_us=p50,
        p20_us=p20,
        p80_us=p80,
        provider=provider,
        ranks=2,
        shape=_fmt_size(size),
        dtype="uint8",
        bytes=size * n,
        gbps_fabric=size * n / (p50 * 1e3) if case == "bw" else 0.0,
        notes=notes,
    )


def _fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="shm", choices=["shm", "tcp"])
    ap.add_argument("--iters", type=int, default=2000, help="latency round trips")
    ap.add_argument("--reps", type=int, default=5, help="bandwidth repetitions per size")
    ap.add_argument("--window", type=int, default=16, help="writes in flight")
    ap.add_argument("--csv", default=None, help="append the rows to this CSV")
    args = ap.parse_args(argv)
    out = spawn(_rank, 2, (args.provider, args.iters, args.reps, args.window), timeout_s=300)
    emit(
        out[0],
        args.csv,
        columns=("case", "provider", "shape", "p50_us", "p20_us", "p80_us", "gbps_fabric", "notes"),
    )


if __name__ == "__main__":
    main()
