"""Run a function on R processes joined by a torch.distributed group: tests, demos, benches.

`spawn(fn, world_size, args)` runs `fn(rank, world_size, *args)` in fresh processes (the
'spawn' start method), each in a `backend` group (gloo, or nccl on GPUs) on a free
127.0.0.1 port, and returns the per-rank results. A child's exception becomes a
RuntimeError here with its traceback; ranks still running after `timeout_s` get their
stacks dumped (faulthandler), are killed and named, so a hang is a failure, not a hang.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Collection
from typing import Any


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to 127.0.0.1:0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, backend, args, results, timeout_s) -> None:
    import torch
    import torch.distributed as dist

    # One intra-op thread per rank: R ranks share the machine's cores (2 in CI), and
    # oversubscribed torch thread pools turned millisecond steps into seconds.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    # The parent sends SIGUSR1 to a rank that is still running at the deadline: every
    # thread's Python stack goes to stderr before the kill, so a hang shows where it is.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    may_exit: Collection[int] = (),
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return their results.

    `fn` must be importable (a module-level function); results must be picklable. Ranks in
    `may_exit` may die without a result (fault tests kill them on purpose); their result
    is None.

    Raises:
        RuntimeError: with the child's traceback if any rank raised, naming ranks that
            exited without a result, or naming the ranks still running after `timeout_s`
            seconds (their stacks are dumped to stderr, then they are killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, port, backend, args, results, timeout_s),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {r: None for r in may_exit}
    got: set[int] = set()
    errors: list[str] = []

    def record(rank: int, ok: bool, value: Any) -> None:
        got.add(rank)
        if ok:
            values[rank] = value
        else:
            errors.append(f"--- rank {rank} raised:\n{value}")

    try:
        while len(got) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                lost = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode is not None and r not in got and r not in may_exit
                ]
                if lost:
                    time.sleep(0.5)  # its last message may still be in the pipe
                    while True:
                        try:
                            rank, ok, value = results.get_nowait()
                        except queue.Empty:
                            break
                        record(rank, ok, value)
                    lost = [r for r in lost if r not in got]
                    if lost:
                        errors.append(
                            f"rank(s) {lost} exited with codes "
                            f"{[procs[r].exitcode for r in lost]} without a result"
                        )
                        break
                dead_ok = [r for r in may_exit if procs[r].exitcode is not None]
                if len(got | set(dead_ok)) == world_size:
                    break
                continue
            record(rank, ok, value)
            if not ok:
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in stuck:
            try:
                os.kill(procs[r].pid, signal.SIGUSR1)
            except OSError:
                pass
        if stuck:
            time.sleep(1.0)  # let faulthandler write the stacks
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("\n".join(errors))
    missing = [r for r in range(world_size) if r not in got and r not in may_exit]
    if missing:
        raise RuntimeError(
            f"rank(s) {missing} did not finish within {timeout_s} s (stuck: {stuck})"
        )
    return [values.get(r) for r in range(world_size)]
