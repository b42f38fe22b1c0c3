"""Two-batch overlap with the do_send / do_recv split: measured on the CPU path and modelled.

Two micro-batches A and B share one rank. With the split, the rank starts B's dispatch
(send half) before it waits for A's (receive half), computes A's experts while B's tokens
are in flight, and so on:

    GPU:  dispatch-send A | dispatch-send B | dispatch-recv A | compute A | combine-send A |
          dispatch-recv B | compute B | combine-send B | combine-recv A | combine-recv B
    NIC:                  [A in flight]   [B in flight]          [A back]        [B back]

`measure_two_batch_overlap` runs exactly that order with two `pplx.moe.AllToAll` objects
(one per micro-batch; torch backend, gloo, one process per rank) and records wall-clock
spans per rank;
`model_two_batch_overlap` schedules it on a modelled cluster (GPU and NIC as two
resources) and also returns the time without overlap. `plot_gantt` draws either.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from pplx.sim.cluster import Cluster
from pplx.sim.model import Workload, phase_latency
from pplx.sim.routing import Routing

GPU_ORDER = ("dsA", "dsB", "drA", "cA", "csA", "drB", "cB", "csB", "crA", "crB")
NAMES = {
    "ds": "dispatch send",
    "dr": "dispatch recv",
    "c": "compute",
    "cs": "combine send",
    "cr": "combine recv",
    "dn": "dispatch in flight",
    "cn": "combine in flight",
}


@dataclass(frozen=True)
class Span:
    """One bar of a timeline: `lane` (e.g. "rank 0" or "GPU"), `op` ("dispatch send"...),
    `batch` ("A" / "B"), start and end in microseconds from the common start."""

    lane: str
    op: str
    batch: str
    start_us: float
    end_us: float


# ------------------------------------------------------------------ measured (CPU path)


def _overlap_worker(rank: int, world_size: int, cfg: dict) -> list[tuple]:
    """One rank of the measured timeline (runs in a spawned process; see `spawn`)."""
    import torch
    import torch.distributed as dist

    from pplx.moe import AllToAll
    from pplx.moe.testing import random_group_inputs

    t, h, e, k = cfg["num_tokens"], cfg["hidden"], cfg["num_experts"], cfg["topk"]
    batches = {
        b: random_group_inputs(seed, world_size, t, h, e, k)[rank]
        for b, seed in (("A", cfg["seed"]), ("B", cfg["seed"] + 1))
    }
    # One AllToAll per micro-batch: each holds at most one pending send.
    a2a = {
        b: AllToAll(t, e, 1, h, None, torch.bfloat16, torch.bfloat16, None, k, backend="torch")
        for b in batches
    }
    outs = {b: a2a[b].alloc_dispatch_outputs() for b in batches}
    ys = {b: a2a[b].alloc_expert_y() for b in batches}
    toks = {b: a2a[b].alloc_combine_output(t) for b in batches}
    w_expert = torch.randn(h, h, generator=torch.Generator().manual_seed(rank)) / h**0.5
    spans: list[tuple] = []

    def run(op: str, b: str) -> None:
        x = batches[b]
        t0 = time.perf_counter()
        if op in ("ds", "dr"):
            o = outs[b]
            a2a[b].dispatch(
                o.expert_num_tokens, o.expert_x, o.expert_x_scale, x.x, x.x_scale,
                x.indices, x.weights, do_send=op == "ds", do_recv=op == "dr",
            )  # fmt: skip
        elif op == "c":
            rows = int(outs[b].expert_num_tokens.sum())
            for _ in range(cfg["compute_repeats"]):
                y = outs[b].expert_x[:rows].float() @ w_expert
            ys[b][:rows] = y.to(torch.bfloat16)
        else:
            a2a[b].combine(
                toks[b], x.indices, x.weights, ys[b], do_send=op == "cs", do_recv=op == "cr"
            )
        spans.append((op, b, t0, time.perf_counter()))

    dist.barrier()
    start = time.perf_counter()
    for item in GPU_ORDER:
        run(item[:-1], item[-1])
    for obj in a2a.values():
        obj.destroy()
    return [(op, b, (s - start) * 1e6, (f - start) * 1e6) for op, b, s, f in spans]


def measure_two_batch_overlap(
    world_size: int = 2,
    num_tokens: int = 64,
    hidden: int = 512,
    num_experts: int = 8,
    topk: int = 2,
    compute_repeats: int = 4,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> list[Span]:
    """Run the two-batch order on `world_size` CPU processes (gloo, torch backend) and
    return every rank's spans (lane "rank r"). Raises RuntimeError with a child's
    traceback, or after `timeout_s`."""
    from pplx.moe.testing import spawn

    cfg = dict(
        num_tokens=num_tokens,
        hidden=hidden,
        num_experts=num_experts,
        topk=topk,
        compute_repeats=compute_repeats,
        seed=seed,
    )
    per_rank = spawn(_overlap_worker, world_size, (cfg,), timeout_s=timeout_s)
    return [
        Span(f"rank {r}", NAMES[op], b, s, f)
        for r, spans in enumerate(per_rank)
        for op, b, s, f in spans
    ]


# ------------------------------------------------------------------ modelled


@dataclass(frozen=True)
class OverlapModel:
    """Modelled timeline: spans (lanes "GPU" and "network"), the overlapped total, and the
    total of the same two batches run one after the other without the split."""

    spans: list[Span]
    total_us: float
    sequential_us: float


def _split(b, fixed_us: float) -> tuple[float, float, float]:
    """(send kernel, in flight, recv kernel) microseconds of one modelled phase: the fixed
    kernel cost and the pack/unpack copies split evenly between the two kernels."""
    send = recv = fixed_us / 2 + b.pack_us / 2
    return send, max(0.0, b.total_us - send - recv), recv


def model_two_batch_overlap(
    cluster: Cluster, routing: Routing, workload: Workload, compute_us: float
) -> OverlapModel:
    """Schedule the two-batch order on a GPU and a network resource; each micro-batch has
    `routing` and `workload` (e.g. half the tokens of the full batch) and `compute_us` of
    expert work. In-flight intervals of different batches share the NIC in order."""
    d = phase_latency(cluster, routing, workload, "dispatch")
    c = phase_latency(cluster, routing, workload, "combine")
    ds, dn, dr = _split(d, cluster.kernel_fixed_us)
    cs, cn, cr = _split(c, cluster.kernel_fixed_us)
    dur = {"ds": ds, "dr": dr, "c": compute_us, "cs": cs, "cr": cr}
    flight = {"ds": ("dn", dn), "cs": ("cn", cn)}
    needs = {"dr": "dn", "cr": "cn"}
    gpu_t = net_t = 0.0
    done: dict[str, float] = {}
    spans = []
    for item in GPU_ORDER:
        op, b = item[:-1], item[-1]
        start = max(gpu_t, done.get(needs.get(op, "") + b, 0.0))
        gpu_t = start + dur[op]
        spans.append(Span("GPU", NAMES[op], b, start, gpu_t))
        if op in flight:
            net_op, net_dur = flight[op]
            net_start = max(gpu_t, net_t)
            net_t = net_start + net_dur
            done[net_op + b] = net_t
            spans.append(Span("network", NAMES[net_op], b, net_start, net_t))
    sequential = 2 * (d.total_us + c.total_us + compute_us)
    return OverlapModel(spans, gpu_t, sequential)


# ------------------------------------------------------------------ plotting

COLORS = {
    "dispatch send": "tab:blue",
    "dispatch in flight": "lightsteelblue",
    "dispatch recv": "tab:cyan",
    "compute": "tab:green",
    "combine send": "tab:orange",
    "combine in flight": "navajowhite",
    "combine recv": "tab:red",
}


def plot_gantt(spans: Sequence[Span], ax, title: str = "") -> None:
    """Draw spans as horizontal bars, one row per lane, batch B hatched."""
    lanes = list(dict.fromkeys(s.lane for s in spans))
    for i, lane in enumerate(lanes):
        for s in (s for s in spans if s.lane == lane):
            ax.barh(
                i,
                s.end_us - s.start_us,
                left=s.start_us,
                color=COLORS.get(s.op, "gray"),
                edgecolor="k",
                lw=0.4,
                hatch="//" if s.batch == "B" else None,
            )
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (us)")
    if title:
        ax.set_title(title)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=o) for o, c in COLORS.items() if any(s.op == o for s in spans)]
    handles.append(Patch(facecolor="white", edgecolor="k", hatch="//", label="batch B"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
