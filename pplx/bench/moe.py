"""MoE dispatch/combine benchmark inside one node: `python -m pplx.bench moe`.

Usage:
    torchrun --nproc-per-node 4 -m pplx.bench moe            # one process per GPU
    python -m pplx.bench moe --ranks 4                        # spawns the ranks itself
    python -m pplx.bench moe --ranks 2 --quick                # CPU: gloo, tiny shapes

Cases (DESIGN.md, "The bar to beat"): decode T=128 tokens per rank, H=7168, K=8, E=256,
fp8 dispatch with 56 f32 scales per token, bf16 combine; prefill T=4096, same model.

Implementations timed in the same run, per phase (dispatch, combine) and per half
(send, recv) where the implementation splits:
- `triton`: `pplx.moe.kernels.TritonAllToAll` (CUDA: each phase/half captured in a CUDA
  graph; CPU: Triton's interpreter);
- `torch` (CPU only): `AllToAll(backend="torch")`, the reference over gloo;
- `baseline`: `pplx.moe.baseline`, the all_to_all_single dispatch/combine a user writes;
- `payload`: one `all_to_all_single` of the payload alone (every (t, k) row once, bytes);
- `floor`: remote bytes / peer-copy bandwidth measured in this run, for the per-slot
  layout (`floor`) and for the layout the Triton kernels move (`floor-dedup`);
- `peer-copy`: one-way copy bandwidth to the next rank, all ranks at once (CUDA).

Before any Triton variant is timed, one round of it with fresh inputs is checked against
`pplx.moe.reference` (decode sizes: dispatch bit-exact, combine within its bound, whole and
in do_send / do_recv halves); a variant that fails gets no rows and the run exits 1.

Timing: every iteration starts with a barrier (on CUDA an all-reduce followed by a short
GPU sleep so that all ranks start together and the CPU queues the work ahead), CUDA events
around each phase; a phase's time is the slowest rank's in that iteration; p50/p20/p80
over iterations. On CUDA, `--kineto N` more iterations under torch.profiler give the
`dispatch-kernels` / `combine-kernels` rows: the phase's kernels alone (CUPTI), without the
event and launch latency the event rows include. Rows go to a table and CSV through
`pplx.bench.common.emit`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pplx.bench.common import Row, emit, percentiles, rank_device
from pplx.bench.timing import PhaseTimer, slowest
from pplx.moe.kernels.tuning import Tuning

FP8 = torch.float8_e4m3fn
DEFAULT_CSV = "experiments/results/moe/moe.csv"


@dataclass
class Shape:
    name: str
    tokens: int
    hidden: int
    topk: int
    experts: int

    def label(self) -> str:
        return f"T{self.tokens} H{self.hidden} K{self.topk} E{self.experts}"


def _shapes(quick: bool, cases: list[str]) -> list[Shape]:
    if quick:
        table = {
            "decode": Shape("decode", 8, 256, 2, 8),
            "prefill": Shape("prefill", 32, 256, 2, 8),
        }
    else:
        table = {
            "decode": Shape("decode", 128, 7168, 8, 256),
            "prefill": Shape("prefill", 4096, 7168, 8, 256),
        }
    return [table[c] for c in cases]


# ------------------------------------------------------------------------------- inputs


def _inputs(shape: Shape, rank: int, world_size: int, device: torch.device, seed: int):
    from pplx.moe import testing as mt

    ins = mt.random_group_inputs(
        seed, world_size, shape.tokens, shape.hidden, shape.experts, shape.topk, FP8
    )
    me = ins[rank]
    return me.x.to(device), me.x_scale.to(device), me.indices.to(device), me.weights.to(device)


def _remote_bytes(indices: torch.Tensor, rank: int, e_local: int, row_bytes: int, world_size: int):
    """(per-slot bytes, per-(token, rank) bytes) this rank sends to other ranks."""
    dst = (indices.long() // e_local).cpu()
    slots = int((dst != rank).sum())
    hit = torch.zeros(indices.shape[0], world_size, dtype=torch.bool)
    hit.scatter_(1, dst, True)
    hit[:, rank] = False
    return slots * row_bytes, int(hit.sum()) * row_bytes


# ------------------------------------------------------------------------------- impls


def _bench_triton(
    shape, rank, world_size, device, group, iters, warmup, timer, tuning=None, label="triton"
):
    from pplx.moe import layout as L
    from pplx.moe.kernels import TritonAllToAll

    x, xs, idx, w = _inputs(shape, rank, world_size, device, seed=1)
    S = L.hidden_dim_scale(shape.hidden)
    at = TritonAllToAll(
        max_num_tokens=shape.tokens,
        num_experts=shape.experts,
        expert_padding=1,
        hidden_dim=shape.hidden,
        hidden_dim_scale=S,
        in_dtype=FP8,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32,
        num_experts_per_token=shape.topk,
        group=group,
        device=device,
        tuning=tuning,
    )
    rows = at.max_recv_tokens
    e_local = shape.experts // world_size
    ent = torch.zeros(e_local, dtype=torch.int32, device=device)
    ex = torch.zeros(rows, shape.hidden, dtype=FP8, device=device)
    exs = torch.zeros(rows, S, device=device)
    y = torch.randn(rows, shape.hidden, device=device).to(torch.bfloat16)
    out = torch.zeros(shape.tokens, shape.hidden, dtype=torch.bfloat16, device=device)

    def ds():
        at.dispatch(ent, ex, exs, x, xs, idx, w, do_send=True, do_recv=False)

    def dr():
        at.dispatch(ent, ex, exs, x, xs, idx, w, do_send=False, do_recv=True)

    def cs():
        at.combine(out, idx, w, y, do_send=True, do_recv=False)

    def cr():
        at.combine(out, idx, w, y, do_send=False, do_recv=True)

    def disp():  # one call doing both halves (one launch per phase with PPLX_MOE_FUSED)
        at.dispatch(ent, ex, exs, x, xs, idx, w)

    def comb():
        at.combine(out, idx, w, y)

    fns = {"ds": ds, "dr": dr, "cs": cs, "cr": cr, "disp": disp, "comb": comb}
    for _ in range(2):  # compile + warm
        disp()
        comb()
    if not _check_against_reference(at, shape, rank, world_size, device, group, label):
        at.destroy()
        return None
    if timer.cuda and timer.graphs:
        torch.cuda.synchronize(device)
        graphs = {}
        for name, fn in fns.items():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graphs[name] = g
        torch.cuda.synchronize(device)
        run = {name: g.replay for name, g in graphs.items()}
    else:
        run = fns
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        # Pass 1: halves (send, recv of each phase).
        timer.start_iteration()
        m = [timer.mark()]
        for name in ("ds", "dr", "cs", "cr"):
            run[name]()
            m.append(timer.mark())
        # Pass 2: whole phases.
        timer.start_iteration()
        n = [timer.mark()]
        for name in ("disp", "comb"):
            run[name]()
            n.append(timer.mark())
        timer.finish()
        if i >= warmup:
            for j, name in enumerate(("ds", "dr", "cs", "cr")):
                samples[name].append(timer.elapsed_us(m[j], m[j + 1]))
            samples["disp"].append(timer.elapsed_us(n[0], n[1]))
            samples["comb"].append(timer.elapsed_us(n[1], n[2]))
    if timer.cuda and timer.kineto > 0:
        samples.update(_kernel_spans(run, timer, at))
    if getattr(at, "prof_on", False):
        # One more whole-phase pass with the kernels' clock stamps (PPLX_MOE_PROF=1).
        timer.start_iteration()
        run["disp"]()
        run["comb"]()
        timer.finish()
        _print_profile(at.profile(), rank, label)
    at.check()
    at.destroy()
    return samples


# Largest T whose reference the benchmark computes on the CPU before timing (decode sizes;
# prefill's reference would take minutes and tens of GB per process).
_CHECK_MAX_TOKENS = 512


def _check_against_reference(at, shape, rank, world_size, device, group, label) -> bool:
    """One round with fresh inputs checked against `pplx.moe.reference` (dispatch
    bit-exact, combine within the bound), whole and in halves (do_send / do_recv), so that
    no variant is timed unless it is right. False (on every rank) if any rank's check
    failed; the failing ranks print why."""
    from pplx.moe import testing as mt

    if shape.tokens > _CHECK_MAX_TOKENS:
        if rank == 0:
            print(f"# {label}: not checked against the reference (T > {_CHECK_MAX_TOKENS})")
        return True
    errors: list[str] = []
    for split in (False, True):
        case = mt.Case(
            f"bench {label} {shape.name}{' split' if split else ''}",
            shape.tokens,
            shape.hidden,
            shape.experts,
            shape.topk,
            FP8,
            split=split,
        )
        mt.run_case(at, case, 11 + split, rank, world_size, device, errors=errors)
    err = "; ".join(errors)
    bad = torch.tensor([1.0 if err else 0.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if err:
        print(f"# {label}: WRONG on rank {rank}, not timed: {err[:400]}")
    elif rank == 0:
        ok = "checked against the reference (dispatch bit-exact, combine in bound)"
        print(f"# {label}: " + ("WRONG on another rank, not timed" if bad.item() else ok))
    return not bad.item()


def _kernel_spans(run, timer, at) -> dict[str, list[float]]:
    """GPU time of each phase's kernels alone (CUPTI through torch.profiler): per iteration,
    first kernel start to last kernel end of the phase (one or two launches), without the
    event and launch latency around them that the event rows include."""
    from torch.profiler import ProfilerActivity, profile

    n_disp = 1 if at.fused_disp else 2
    n_comb = 1 if at.fused_comb else 2
    nan = {k: [float("nan")] * timer.kineto for k in ("disp-gpu", "comb-gpu")}
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(timer.kineto):
                timer.start_iteration()
                run["disp"]()
                run["comb"]()
            timer.finish()
    except RuntimeError as e:  # no CUPTI on this machine: the event rows still stand
        timer.finish()
        print(f"# kernel spans unavailable (torch.profiler): {e}")
        return nan
    kern = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.name.startswith(("_dispatch_kernel", "_combine_kernel"))
    )
    per = n_disp + n_comb
    out: dict[str, list[float]] = {"disp-gpu": [], "comb-gpu": []}
    if len(kern) != per * timer.kineto:
        # Same keys on every rank (the rows are gathered): NaN marks a failed count.
        print(f"# kernel spans: {len(kern)} kernels seen, {per * timer.kineto} expected")
        return nan
    for i in range(timer.kineto):
        k = kern[i * per : (i + 1) * per]
        out["disp-gpu"].append(float(k[n_disp - 1][1] - k[0][0]))
        out["comb-gpu"].append(float(k[-1][1] - k[n_disp][0]))
    return out


def _print_profile(stamps: dict[str, torch.Tensor], rank: int, label: str) -> None:
    """Per half: when each stamp of its programs fell, in us after the phase's first
    program started (this GPU's clock), median / max over programs."""
    for phase in ("dispatch", "combine"):
        halves = {k: v for k, v in stamps.items() if k.startswith(phase)}
        t0 = min(int(v[:, 0][v[:, 0] > 0].min()) for v in halves.values() if bool((v > 0).any()))
        for name, v in halves.items():
            parts = []
            for i in range(v.shape[1]):
                col = v[:, i]
                col = col[col > 0]
                if col.numel() == 0:
                    continue
                rel = (col - t0).double() / 1e3
                parts.append(f"s{i} {rel.median().item():6.1f}/{rel.max().item():6.1f}")
            print(f"# prof {label} rank{rank} {name:16s} n={v.shape[0]:4d} " + "  ".join(parts))


def _bench_baseline(shape, rank, world_size, device, group, iters, warmup, timer):
    from pplx.moe import baseline as B
    from pplx.moe import layout as L

    x, xs, idx, w = _inputs(shape, rank, world_size, device, seed=1)
    S = L.hidden_dim_scale(shape.hidden)
    e_local = shape.experts // world_size
    rows = L.max_recv_tokens(shape.tokens, world_size, shape.topk, e_local, 1)
    ent = torch.zeros(e_local, dtype=torch.int32, device=device)
    ex = torch.zeros(rows, shape.hidden, dtype=FP8, device=device)
    exs = torch.zeros(rows, S, device=device)
    y = torch.randn(rows, shape.hidden, device=device).to(torch.bfloat16)
    out = torch.zeros(shape.tokens, shape.hidden, dtype=torch.bfloat16, device=device)
    samples: dict[str, list[float]] = {"disp": [], "comb": []}
    for i in range(warmup + iters):
        timer.start_iteration()
        a = timer.mark()
        plan = B.baseline_dispatch(ent, ex, exs, x, xs, idx, shape.experts, 1, group=group)
        b = timer.mark()
        B.baseline_combine(out, w, y, plan, group=group)
        c = timer.mark()
        timer.finish()
        if i >= warmup:
            samples["disp"].append(timer.elapsed_us(a, b))
            samples["comb"].append(timer.elapsed_us(b, c))
    return samples


def _bench_torch_backend(shape, rank, world_size, device, group, iters, warmup, timer):
    from pplx.moe import AllToAll

    x, xs, idx, w = _inputs(shape, rank, world_size, device, seed=1)
    a2a = AllToAll(
        shape.tokens,
        shape.experts,
        1,
        shape.hidden,
        xs.shape[1],
        FP8,
        torch.bfloat16,
        torch.float32,
        shape.topk,
        group=group,
        device=device,
        backend="torch",
    )
    outs = a2a.alloc_dispatch_outputs()
    y = a2a.alloc_expert_y().normal_()
    out = a2a.alloc_combine_output()
    samples: dict[str, list[float]] = {"disp": [], "comb": []}
    for i in range(warmup + iters):
        timer.start_iteration()
        a = timer.mark()
        a2a.dispatch(outs.expert_num_tokens, outs.expert_x, outs.expert_x_scale, x, xs, idx, w)
        b = timer.mark()
        a2a.combine(out, idx, w, y)
        c = timer.mark()
        timer.finish()
        if i >= warmup:
            samples["disp"].append(timer.elapsed_us(a, b))
            samples["comb"].append(timer.elapsed_us(b, c))
    a2a.destroy()
    return samples


def _bench_payload(shape, rank, world_size, device, group, iters, warmup, timer):
    """all_to_all_single of the payload alone: T*K rows split evenly over ranks."""
    from pplx.moe import layout as L

    S = L.hidden_dim_scale(shape.hidden)
    n = shape.tokens * shape.topk
    n -= n % world_size
    d_bytes = shape.hidden + 4 * S  # fp8 row + f32 scales
    send_d = torch.randint(0, 255, (n, d_bytes), dtype=torch.uint8, device=device)
    recv_d = torch.empty_like(send_d)
    send_c = torch.randn(n, shape.hidden, device=device).to(torch.bfloat16)
    recv_c = torch.empty_like(send_c)
    samples: dict[str, list[float]] = {"disp": [], "comb": []}
    for i in range(warmup + iters):
        timer.start_iteration()
        a = timer.mark()
        dist.all_to_all_single(recv_d, send_d, group=group)
        b = timer.mark()
        dist.all_to_all_single(recv_c, send_c, group=group)
        c = timer.mark()
        timer.finish()
        if i >= warmup:
            samples["disp"].append(timer.elapsed_us(a, b))
            samples["comb"].append(timer.elapsed_us(b, c))
    return samples


def _peer_copy_gbps(rank, world_size, device, iters: int) -> float:
    """One-way copy bandwidth to the next rank (all ranks copy at once), GB/s."""
    if device.type != "cuda" or world_size < 2:
        return float("nan")
    peer = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
    nbytes = 256 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=peer)
    best = []
    for i in range(iters + 2):
        dist.barrier()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        torch.cuda.synchronize(device)
        if i >= 2:
            best.append(nbytes / (a.elapsed_time(b) * 1e-3) / 1e9)
    del dst
    return float(torch.tensor(best).median())


# ------------------------------------------------------------------------------- driver


def _rank_main(
    rank: int, world_size: int, args: argparse.Namespace
) -> tuple[list[Row], list[str]] | None:
    """One rank's run; rank 0 returns the rows and the variants that failed the check."""
    device = rank_device(rank, args.cpu)
    cuda = device.type == "cuda"
    group = None
    timer = PhaseTimer(
        device,
        group,
        realign=args.start == "realign",
        graphs=args.launch == "graph",
        kineto=args.kineto,
    )
    provider = "nvlink" if cuda else "shm"
    gbps = _peer_copy_gbps(rank, world_size, device, 5)
    gb = torch.tensor([gbps], dtype=torch.float64, device=device)
    dist.all_reduce(gb, op=dist.ReduceOp.MIN)  # the slowest link bounds the all-to-all
    gbps = float(gb.item())
    rows: list[Row] = []
    wrong: list[str] = []  # implementations / variants that failed the reference check
    impls = ["triton", "baseline", "payload"] + ([] if cuda else ["torch"])
    impls = [i for i in impls if i in args.impls]
    for shape in _shapes(args.quick, args.cases):
        from pplx.moe import layout as L

        S = L.hidden_dim_scale(shape.hidden)
        _, _, idx, _ = _inputs(shape, rank, world_size, torch.device("cpu"), seed=1)
        e_local = shape.experts // world_size
        d_row = shape.hidden + 4 * S
        d_slot, d_tok = _remote_bytes(idx, rank, e_local, d_row, world_size)
        c_slot, c_tok = _remote_bytes(idx, rank, e_local, 2 * shape.hidden, world_size)
        d_tok += d_tok // d_row * 12 * shape.topk  # + the (expert, q, weight) records
        byt = torch.tensor([d_slot, d_tok, c_slot, c_tok], dtype=torch.float64, device=device)
        dist.all_reduce(byt, op=dist.ReduceOp.MAX)  # the busiest rank bounds the phase
        d_slot, d_tok, c_slot, c_tok = (int(v) for v in byt.tolist())
        results: dict[str, dict[str, list[float]]] = {}
        bench = {
            "triton": _bench_triton,
            "baseline": _bench_baseline,
            "payload": _bench_payload,
            "torch": _bench_torch_backend,
        }
        for impl in impls:
            if impl == "triton" and args.variant:
                # One row set per variant (its PPLX_MOE_* settings over the environment's,
                # as a Tuning at construction), same run.
                for name, env in args.variant:
                    s = _bench_triton(
                        shape,
                        rank,
                        world_size,
                        device,
                        group,
                        args.iters,
                        args.warmup,
                        timer,
                        tuning=Tuning.from_env({**os.environ, **env}),
                        label=f"triton-{name}",
                    )
                    if s is None:
                        wrong.append(f"{shape.name} triton-{name}")
                    else:
                        results[f"triton-{name}"] = slowest(s, group)
                continue
            s = bench[impl](shape, rank, world_size, device, group, args.iters, args.warmup, timer)
            if s is None:
                wrong.append(f"{shape.name} {impl}")
            else:
                results[impl] = slowest(s, group)
        if rank != 0:
            continue
        base = results.get("baseline", {})
        base_p50 = {k: percentiles(v)[0] for k, v in base.items()}
        common = dict(
            bench="moe",
            case=shape.name,
            provider=provider,
            ranks=world_size,
            ranks_per_node=world_size,
            shape=shape.label(),
        )
        phase_bytes = {
            "disp": d_tok,
            "ds": d_tok,
            "dr": d_tok,
            "comb": c_tok,
            "cs": c_tok,
            "cr": c_tok,
            "disp-gpu": d_tok,
            "comb-gpu": c_tok,
        }
        names = {
            "disp": "dispatch",
            "ds": "dispatch-send",
            "dr": "dispatch-recv",
            "comb": "combine",
            "cs": "combine-send",
            "cr": "combine-recv",
            "disp-gpu": "dispatch-kernels",
            "comb-gpu": "combine-kernels",
        }
        for impl, samples in results.items():
            for key, vals in samples.items():
                p50, p20, p80 = percentiles(vals)
                phase = "disp" if key in ("disp", "ds", "dr", "disp-gpu") else "comb"
                nbytes = (
                    phase_bytes[key]
                    if impl.startswith("triton")
                    else (d_slot if phase == "disp" else c_slot)
                )
                rows.append(
                    Row(
                        impl=f"{impl}:{names[key]}",
                        p50_us=p50,
                        p20_us=p20,
                        p80_us=p80,
                        dtype="fp8" if phase == "disp" else "bf16",
                        bytes=nbytes,
                        gbps_nvlink=nbytes / (p50 * 1e-6) / 1e9 if cuda and p50 > 0 else 0.0,
                        baseline="baseline" if base_p50 else "",
                        ratio=base_p50[phase] / p50 if base_p50 and p50 > 0 else float("nan"),
                        notes=f"iters={args.iters} start={args.start}"
                        + ("" if args.launch == "graph" else f" launch={args.launch}"),
                        **common,
                    )
                )
        if cuda and gbps == gbps:
            for label, d_b, c_b in (("floor", d_slot, c_slot), ("floor-dedup", d_tok, c_tok)):
                for phase, b in (("dispatch", d_b), ("combine", c_b)):
                    us = b / (gbps * 1e9) * 1e6
                    rows.append(
                        Row(
                            impl=f"{label}:{phase}",
                            p50_us=us,
                            p20_us=us,
                            p80_us=us,
                            bytes=b,
                            gbps_nvlink=gbps,
                            notes="remote bytes / peer-copy",
                            dtype="fp8" if phase == "dispatch" else "bf16",
                            **common,
                        )
                    )
            rows.append(
                Row(
                    impl="peer-copy",
                    p50_us=(256 << 20) / (gbps * 1e9) * 1e6,
                    p20_us=float("nan"),
                    p80_us=float("nan"),
                    bytes=256 << 20,
                    gbps_nvlink=gbps,
                    notes="one-way, all ranks at once",
                    **common,
                )
            )
    return (rows, wrong) if rank == 0 else None


def _spawned(rank: int, world_size: int, args: argparse.Namespace):
    return _rank_main(rank, world_size, args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pplx.bench moe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ranks", type=int, default=None, help="spawn this many ranks")
    p.add_argument("--cases", default="decode,prefill", help="comma list: decode,prefill")
    p.add_argument("--impls", default="triton,baseline,payload,torch")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--cpu", action="store_true", help="force CPU (gloo, interpreter)")
    p.add_argument("--csv", default=DEFAULT_CSV, help="CSV to append to ('' for none)")
    p.add_argument(
        "--start",
        choices=("realign", "sleep"),
        default="realign",
        help="CUDA iteration start: all-reduce, 2 ms GPU sleep, then a second all-reduce "
        "that lines the ranks up again (realign, default), or without it (sleep: the "
        "rows of 2026-11-27 and before; ranks entered a phase up to 65 us apart)",
    )
    p.add_argument(
        "--launch",
        choices=("graph", "eager"),
        default="graph",
        help="CUDA: each Triton phase replayed from its own CUDA graph (default) or "
        "launched eagerly (the 2 ms GPU sleep keeps the CPU ahead either way)",
    )
    p.add_argument(
        "--kineto",
        type=int,
        default=10,
        metavar="N",
        help="CUDA: N more iterations under torch.profiler (CUPTI) give rows "
        "'<impl>:dispatch-kernels' / 'combine-kernels': the phase's kernel time alone, "
        "first kernel start to last kernel end (0: off)",
    )
    p.add_argument(
        "--sync",
        default="",
        help="comma list of Triton signalling protocols to time side by side (v1,v2): "
        "a variant 'SYNC:PPLX_MOE_SYNC=SYNC' each, rows triton-<sync>; default: one "
        "'triton' row set, default protocol",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VAL[ KEY=VAL...]",
        help="a Triton variant timed in the same run, its PPLX_MOE_* environment at "
        "construction (e.g. 'fused:PPLX_MOE_FUSED=1 PPLX_MOE_TILES=4,2,2,1'); repeat for "
        "several; rows are named triton-<NAME>, and the defaults are timed too (triton-default) "
        "unless a variant with an empty list names them. "
        "PPLX_MOE_PROF=1 also prints the kernels' clock stamps",
    )
    args = p.parse_args(argv)
    variants = []
    for spec in args.variant:
        name, _, env = spec.partition(":")
        pairs = [kv.split("=", 1) for kv in env.split()]
        if not name or any(len(kv) != 2 or not kv[0].startswith("PPLX_MOE_") for kv in pairs):
            p.error(f"--variant {spec!r}: want NAME:PPLX_MOE_KEY=VAL[ ...]")
        variants.append((name, dict(pairs)))
    if variants and all(env for _, env in variants):
        # Always time the defaults beside the variants (rows triton-default): a variant is
        # only worth reading against them, in the same processes.
        variants.insert(0, ("default", {}))
    args.variant = variants
    args.cases = [c for c in args.cases.split(",") if c]
    args.impls = [c for c in args.impls.split(",") if c]
    # --sync v1,v2 is a variant per protocol (rows triton-v1, triton-v2, no default rows).
    for sync in (c for c in args.sync.split(",") if c):
        args.variant.append((sync, {"PPLX_MOE_SYNC": sync}))
    for name, env in args.variant:
        try:
            Tuning.from_env({**os.environ, **env})
        except ValueError as e:
            p.error(f"variant {name!r}: {e}")
    if not torch.cuda.is_available():
        args.cpu = True
    if args.cpu and not args.quick:
        print("# no CUDA: using --quick shapes")
        args.quick = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = "gloo" if args.cpu else "nccl"
    if args.ranks is None and "RANK" in os.environ:
        dist.init_process_group(backend)
        res = _rank_main(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
    else:
        from pplx.moe import testing as mt

        world_size = args.ranks or (torch.cuda.device_count() if not args.cpu else 2)
        res = mt.spawn(_spawned, world_size, (args,), timeout_s=1800.0, backend=backend)[0]
    if res is None:  # a torchrun rank other than 0
        return 0
    rows, wrong = res
    emit(rows, args.csv or None)
    if wrong:
        print(f"# failed the reference check (no rows): {', '.join(wrong)}")
        return 1
    return 0
