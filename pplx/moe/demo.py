"""A small MoE layer over R ranks: router, top-k, dispatch, per-expert MLP, combine.

    python -m pplx.moe.demo                      # 4 CPU processes: 2 nodes x 2 ranks
    python -m pplx.moe.demo --ranks-per-node 4   # the same 4 ranks as one node
    python -m pplx.moe.demo --device cuda        # one GPU per rank, NCCL, Triton backend
    python -m pplx.moe.demo --ranks 3 --fp8 --tokens 128 --hidden 512

`--ranks-per-node P` splits the ranks into emulated nodes of P consecutive ranks: inside a
node rows move over the node's process group, between nodes only through the
TransferEngine (`pplx.moe.internode`; provider from PPLX_MOE_PROVIDER, default shm).
Default: 2 on the CPU (when it divides --ranks and the backend is torch), else all ranks.

Each rank owns E / R experts (SiLU MLPs) and T tokens. Every iteration routes the tokens
(softmax over the top-k router logits), dispatches them with `pplx.moe.AllToAll`, runs
its experts on the received rows, and combines the outputs. The last iteration's outputs
of every rank are gathered on rank 0 and checked against a dense, single-process
computation of the same layer (no communication: every token runs its K experts
directly). Tolerance: expert outputs are rounded to bf16 before combine, and the f32
matmuls of a batch of rows may round differently from those of one token, which can
flip one bf16 ulp (2^-8 relative) of an expert output; the outputs here are O(1), so the
check is |got - want| <= 2e-2 + 2^-6 |want| per element (a wrong row is off by O(1)).

Prints per-phase latency (p50/p20/p80 over iterations, microseconds, measured on each
rank and taken from rank 0) and the bytes each rank sends to other ranks per iteration
(one row per (token, slot) routed to a remote expert, as the contract counts them).
With defaults it takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

TOLERANCE_ATOL = 2e-2
TOLERANCE_RTOL = 2**-6


@dataclass
class DemoConfig:
    ranks: int = 4
    tokens: int = 64
    hidden: int = 256
    ffn: int = 256
    experts: int = 16
    topk: int = 4
    iters: int = 20
    backend: str | None = None
    device: str = "cpu"
    fp8: bool = False
    padding: int = 1
    seed: int = 0
    ranks_per_node: int | None = None  # None: every rank in one node


@dataclass
class MoEWeights:
    """The layer's parameters (every rank builds the same ones from the seed).

    Attributes:
        router: `[H, E]` torch.float32.
        w1: `[E, H, F]` torch.float32: first expert matmul.
        w2: `[E, F, H]` torch.float32: second expert matmul.
    """

    router: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor


def make_weights(cfg: DemoConfig, device: torch.device) -> MoEWeights:
    g = torch.Generator().manual_seed(cfg.seed)
    h, f, e = cfg.hidden, cfg.ffn, cfg.experts
    # Scaled so that activations and outputs stay O(1) (variance-preserving init).
    router = torch.randn(h, e, generator=g) / h**0.5
    w1 = torch.randn(e, h, f, generator=g) / h**0.5
    w2 = torch.randn(e, f, h, generator=g) / f**0.5 * 2.0
    return MoEWeights(router.to(device), w1.to(device), w2.to(device))


def make_tokens(cfg: DemoConfig, rank: int, device: torch.device) -> torch.Tensor:
    """`[T, H]` torch.bfloat16: rank `rank`'s input tokens."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 1 + rank)
    return torch.randn(cfg.tokens, cfg.hidden, generator=g).to(torch.bfloat16).to(device)


def route(x: torch.Tensor, w: MoEWeights, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: (`[T, K]` torch.int32 expert indices, `[T, K]` torch.float32 weights)."""
    logits = x.float() @ w.router  # [T, E]
    top = logits.topk(topk, dim=1)
    return top.indices.to(torch.int32), torch.softmax(top.values, dim=1).float()


def expert_mlp(x: torch.Tensor, w: MoEWeights, expert: int) -> torch.Tensor:
    """`[n, H]` f32 rows -> `[n, H]` f32: silu(x @ w1[e]) @ w2[e]."""
    return torch.nn.functional.silu(x @ w.w1[expert]) @ w.w2[expert]


def quantize(cfg: DemoConfig, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What dispatch moves: bf16 tokens as they are, or fp8 with 128-wide block scales."""
    if not cfg.fp8:
        return x, None
    from pplx.moe.testing import quantize_fp8

    q, s = quantize_fp8(x.float().cpu())
    return q.to(x.device), s.to(x.device)


def dequantize(cfg: DemoConfig, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if not cfg.fp8:
        return x.float()
    from pplx.moe.testing import dequantize_fp8

    return dequantize_fp8(x, scale)


def dense_reference(cfg: DemoConfig, w: MoEWeights, device: torch.device) -> torch.Tensor:
    """`[R, T, H]` torch.bfloat16: the layer on every rank's tokens, in one process."""
    from pplx.moe.reference import weighted_sum

    outs = []
    for r in range(cfg.ranks):
        x = make_tokens(cfg, r, device)
        idx, wts = route(x, w, cfg.topk)  # same shapes as on rank r: same bits
        q, s = quantize(cfg, x)
        xin = dequantize(cfg, q, s)  # [T, H] f32: what the experts see
        ys = torch.empty(cfg.tokens, cfg.topk, cfg.hidden, dtype=torch.bfloat16, device=device)
        for t in range(cfg.tokens):
            for k in range(cfg.topk):
                ys[t, k] = expert_mlp(xin[t : t + 1], w, int(idx[t, k]))[0].to(torch.bfloat16)
        outs.append(weighted_sum(ys, wts).to(torch.bfloat16))
    return torch.stack(outs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_main(rank: int, world: int, cfg: DemoConfig) -> dict:
    import torch.distributed as dist

    from pplx.moe import AllToAll
    from pplx.moe.layout import hidden_dim_scale

    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    w = make_weights(cfg, device)
    x = make_tokens(cfg, rank, device)
    e_local = cfg.experts // world
    in_dtype = torch.float8_e4m3fn if cfg.fp8 else torch.bfloat16
    a2a = AllToAll(
        max_num_tokens=cfg.tokens,
        num_experts=cfg.experts,
        expert_padding=cfg.padding,
        hidden_dim=cfg.hidden,
        hidden_dim_scale=hidden_dim_scale(cfg.hidden) if cfg.fp8 else None,
        in_dtype=in_dtype,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32 if cfg.fp8 else None,
        num_experts_per_token=cfg.topk,
        device=device,
        backend=cfg.backend,
        ranks_per_node=cfg.ranks_per_node,
    )
    bufs = a2a.alloc_dispatch_outputs()
    expert_y = a2a.alloc_expert_y()
    out = a2a.alloc_combine_output()
    phases = (
        "router",
        "dispatch send",
        "dispatch recv",
        "experts",
        "combine send",
        "combine recv",
        "total",
    )
    times: dict[str, list[float]] = {p: [] for p in phases}
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.iters,
            desc=f"MoE layer x{world} ranks ({a2a.backend})",
            file=sys.stderr,
            leave=False,
        )
    with a2a:
        for _ in range(cfg.iters):
            dist.barrier()
            _sync(device)
            marks = [time.perf_counter()]

            idx, wts = route(x, w, cfg.topk)
            q, s = quantize(cfg, x)
            _sync(device)
            marks.append(time.perf_counter())

            a2a.dispatch(
                bufs.expert_num_tokens,
                bufs.expert_x,
                bufs.expert_x_scale,
                q,
                s,
                idx,
                wts,
                do_send=True,
                do_recv=False,
            )
            _sync(device)
            marks.append(time.perf_counter())
            a2a.dispatch(
                bufs.expert_num_tokens,
                bufs.expert_x,
                bufs.expert_x_scale,
                q,
                s,
                idx,
                wts,
                do_send=False,
                do_recv=True,
            )
            _sync(device)
            marks.append(time.perf_counter())

            counts = bufs.expert_num_tokens.tolist()
            start = 0
            for e in range(e_local):
                n = counts[e]
                rows = slice(start, start + n)
                xs = bufs.expert_x[rows]
                sc = None if bufs.expert_x_scale is None else bufs.expert_x_scale[rows]
                expert_y[rows] = expert_mlp(dequantize(cfg, xs, sc), w, rank * e_local + e).to(
                    torch.bfloat16
                )
                start += (n + cfg.padding - 1) // cfg.padding * cfg.padding
            _sync(device)
            marks.append(time.perf_counter())

            a2a.combine(out, idx, wts, expert_y, do_send=True, do_recv=False)
            _sync(device)
            marks.append(time.perf_counter())
            a2a.combine(out, idx, wts, expert_y, do_send=False, do_recv=True)
            _sync(device)
            marks.append(time.perf_counter())

            for i, p in enumerate(phases[:-1]):
                times[p].append((marks[i + 1] - marks[i]) * 1e6)
            times["total"].append((marks[-1] - marks[0]) * 1e6)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    # Bytes this rank sends to other ranks per iteration (one row per remote slot).
    remote_slots = int(((idx.long() // e_local) != rank).sum())
    row_in = cfg.hidden * (1 if cfg.fp8 else 2) + (
        4 * hidden_dim_scale(cfg.hidden) if cfg.fp8 else 0
    )
    row_out = cfg.hidden * 2
    # All ranks' outputs to rank 0 for the check (same shape everywhere).
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)
    result: dict = {
        "times": times,
        "bytes_dispatch": remote_slots * row_in,
        "bytes_combine": remote_slots * row_out,
        "backend": a2a.backend,
    }
    if rank == 0:
        want = dense_reference(cfg, w, device)
        got = torch.stack(gathered)
        err = (got.float() - want.float()).abs()
        bad = err > TOLERANCE_ATOL + TOLERANCE_RTOL * want.float().abs()
        result["max_err"] = float(err.max()) if err.numel() else 0.0
        result["num_bad"] = int(bad.sum())
        result["num_elems"] = bad.numel()
    return result


def run(cfg: DemoConfig, timeout_s: float = 600.0) -> list[dict]:
    """Run the demo on `cfg.ranks` processes; returns every rank's result dict."""
    from pplx.moe.layout import num_local_experts
    from pplx.moe.testing import spawn

    num_local_experts(cfg.experts, cfg.ranks)
    if cfg.topk > cfg.experts:
        raise ValueError(f"--topk ({cfg.topk}) must be <= --experts ({cfg.experts})")
    backend = "gloo"
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        if torch.cuda.device_count() < cfg.ranks:
            raise SystemExit(
                f"--device cuda needs {cfg.ranks} GPUs (--ranks), found {torch.cuda.device_count()}"
            )
        backend = "nccl"
    return spawn(_rank_main, cfg.ranks, (cfg,), timeout_s=timeout_s, backend=backend)


def report(cfg: DemoConfig, results: list[dict]) -> bool:
    """Print the table and the check; returns True when the check passed."""
    from pplx.bench.common import Row, format_table, percentiles

    r0 = results[0]
    shape = f"T={cfg.tokens} H={cfg.hidden} E={cfg.experts} K={cfg.topk}"
    dtype = "fp8" if cfg.fp8 else "bf16"
    rows = []
    for phase, samples in r0["times"].items():
        nbytes = {"dispatch send": r0["bytes_dispatch"], "combine send": r0["bytes_combine"]}.get(
            phase, 0
        )
        p50, p20, p80 = percentiles(samples)
        rows.append(
            Row(
                bench="moe-demo",
                case=phase,
                impl=r0["backend"],
                p50_us=p50,
                p20_us=p20,
                p80_us=p80,
                ranks=cfg.ranks,
                ranks_per_node=cfg.ranks_per_node or cfg.ranks,
                shape=shape,
                dtype=dtype,
                bytes=nbytes,
            )
        )
    per_node = cfg.ranks_per_node or cfg.ranks
    print(
        f"# MoE layer demo: {cfg.ranks} ranks ({cfg.ranks // per_node} nodes x {per_node}) "
        f"on {cfg.device}, backend {r0['backend']}, "
        f"{shape}, dispatch {dtype}, {cfg.iters} iterations (rank 0's clock)"
    )
    print(format_table(rows, ("case", "impl", "p50_us", "p20_us", "p80_us", "bytes")))
    sent = [r["bytes_dispatch"] for r in results]
    print(
        f"# bytes sent to other ranks per iteration, dispatch: {sent}; combine: "
        f"{[r['bytes_combine'] for r in results]}"
    )
    ok = r0["num_bad"] == 0
    verdict = "PASS" if ok else "FAIL"
    print(
        f"# check vs dense single-process layer: {verdict} ({r0['num_bad']} of "
        f"{r0['num_elems']} elements outside {TOLERANCE_ATOL} + {TOLERANCE_RTOL:.4g}*|want|; "
        f"max abs err {r0['max_err']:.3g})"
    )
    return ok


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    p = argparse.ArgumentParser(prog="python -m pplx.moe.demo", description=__doc__.split("\n")[0])
    d = DemoConfig()
    p.add_argument("--ranks", type=int, default=d.ranks, help="processes (one per GPU on cuda)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank (T)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size (H)")
    p.add_argument("--ffn", type=int, default=d.ffn, help="expert MLP inner size")
    p.add_argument("--experts", type=int, default=d.experts, help="experts (E), divisible by ranks")
    p.add_argument("--topk", type=int, default=d.topk, help="experts per token (K)")
    p.add_argument("--iters", type=int, default=d.iters, help="timed iterations")
    p.add_argument(
        "--backend",
        choices=("torch", "triton"),
        default=None,
        help="default: triton on cuda, torch on cpu",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--fp8", action="store_true", help="dispatch fp8 e4m3 with block scales")
    p.add_argument("--padding", type=int, default=d.padding, help="expert_padding")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--ranks-per-node",
        type=int,
        default=None,
        help="ranks per emulated node (TransferEngine between nodes); default 2 on cpu "
        "with the torch backend when it divides --ranks, else --ranks (one node)",
    )
    a = p.parse_args(argv)
    for name in ("ranks", "tokens", "hidden", "ffn", "experts", "topk", "iters", "padding"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.experts % a.ranks:
        p.error(f"--experts ({a.experts}) must be divisible by --ranks ({a.ranks})")
    if a.topk > a.experts:
        p.error(f"--topk ({a.topk}) must be <= --experts ({a.experts})")
    per_node = a.ranks_per_node
    if per_node is None:
        cpu_torch = a.device == "cpu" and a.backend in (None, "torch")
        per_node = 2 if cpu_torch and a.ranks % 2 == 0 else a.ranks
    if per_node < 1 or a.ranks % per_node:
        p.error(f"--ranks-per-node ({per_node}) must divide --ranks ({a.ranks})")
    return DemoConfig(
        ranks=a.ranks,
        tokens=a.tokens,
        hidden=a.hidden,
        ffn=a.ffn,
        experts=a.experts,
        topk=a.topk,
        iters=a.iters,
        backend=a.backend,
        device=a.device,
        fp8=a.fp8,
        padding=a.padding,
        seed=a.seed,
        ranks_per_node=per_node,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.device == "cpu" and cfg.backend == "triton":
        # The Triton kernels run on the CPU only under the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = run(cfg)
    return 0 if report(cfg, results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
