"""Timing shared by the GPU benchmarks (`pplx.bench.moe`, `pplx.bench.nvlink`): every
iteration starts with all ranks lined up (on CUDA an all-reduce, a GPU sleep that lets the
CPU queue the iteration, a second all-reduce), CUDA events (or perf_counter on CPU) around
each phase, and per iteration the slowest rank's time."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class PhaseTimer:
    """Per-iteration phase timer: CUDA events (GPU time) or perf_counter (CPU)."""

    def __init__(
        self,
        device: torch.device,
        group: dist.ProcessGroup | None,
        realign: bool = True,
        graphs: bool = True,
        kineto: int = 0,
    ):
        self.cuda = device.type == "cuda"
        self.realign = realign
        # Triton phases replayed from CUDA graphs (default) or launched eagerly: a graph
        # replay of one kernel adds the graph launch's own GPU-side latency between the
        # events, which a model's step (one graph of many kernels) pays once, not per phase.
        self.graphs = graphs
        self.kineto = kineto  # iterations timed again with CUPTI (kernel spans), CUDA only
        self.device = device
        self.group = group
        self._zero = torch.zeros(1, device=device)

    def start_iteration(self) -> None:
        if self.cuda:
            dist.all_reduce(self._zero, group=self.group)  # GPU-side rendezvous of all ranks
            # ~2 ms of GPU sleep (4e6 cycles at <= 2 GHz): the CPU queues the whole iteration
            # meanwhile, so CPU launch time (a graph replay costs ~10-20 us of CPU) does not
            # show up as gaps between the events: with a 20 us sleep, EP4 decode dispatch
            # read 70-81 us instead of 53 us (4 H100, 2026-11-27).
            torch.cuda._sleep(4_000_000)
            # A sleep of N cycles ends at different times on GPUs at different clocks: the
            # kernels' clock stamps showed ranks entering a phase up to 65 us apart (4 H100,
            # 2026-11-28), which whole-phase and receive-half rows then counted as latency.
            # A second rendezvous after the sleep (queued behind it, so it costs the CPU
            # nothing) lines the ranks up again to within one all-reduce's exit skew.
            if self.realign:
                dist.all_reduce(self._zero, group=self.group)
        else:
            dist.barrier(self.group)

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_us(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) * 1e3
        return (b - a) * 1e6

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def slowest(samples: dict[str, list[float]], group) -> dict[str, list[float]]:
    """Per iteration, the slowest rank's time (a collective ends when the last rank does)."""
    out = {}
    for name, vals in samples.items():
        t = torch.tensor(vals, dtype=torch.float64)
        gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(gathered, t, group=group)
        out[name] = torch.stack(gathered).max(0).values.tolist()
    return out
