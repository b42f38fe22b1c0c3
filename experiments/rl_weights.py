"""RL weight transfer: the static schedule of one-sided writes for a 1T-parameter model
(Kimi-K2 shapes) from 256 training GPUs (bf16) to 128 inference GPUs (fp8), its modelled
time next to the paper's 1.3 s, and a measured small-scale run of the same schedule code
on this machine (plain memcpy and `pplx.fabric.TransferEngine` on shm).

Command:  python -m experiments.rl_weights [--quick] [--out DIR]
Hardware: any CPU. The measured run uses libfabric shm between two engines of one process.
Runtime:  about 20 s (planning 1.2M writes for 8 replicas takes ~4 s); --quick: ~5 s
          (a 4-layer model for the full-scale plan, fewer repetitions).
Sources:  paper headline 1.3 s (experiments/paper_data/headline.csv); Kimi-K2 public
          config (shapes in pplx.apps.weights.kimi_k2_params); NIC parameters from the
          pplx.sim presets; shm bandwidth 7 GB/s from DESIGN.md's raw libfabric numbers.
Outputs:  rl_weights/rl_weights_model.csv, rl_weights/rl_weights_measured.csv,
          rl_weights/rl_weights.png.
Assumption: the paper does not say how the 128 inference GPUs are split into replicas;
          we sweep 1, 2, 4 and 8 replicas (128, 64, 32, 16 GPUs each).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from experiments.common import out_dir, pyplot, save, write_rows
from pplx.apps import weights as W
from pplx.sim import preset

PAPER_S = 1.3
SHM_GBPS, SHM_POST_US, SHM_LAT_US = 7.0, 1.0, 1.0  # DESIGN.md raw libfabric shm, 1 MiB


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RL weight transfer schedule")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    args = ap.parse_args(argv)
    d = out_dir("rl_weights", args.out)

    params = W.kimi_k2_params(num_layers=4) if args.quick else W.kimi_k2_params()
    total = sum(p.rows * p.cols for p in params)
    model_rows = []
    for replicas in (1, 2, 4, 8):
        sched = W.plan(params, 256, replicas, 128 // replicas)
        for kind in ("cx7", "efa"):
            nic = preset(kind).nic
            e = W.modelled_time_s(sched, nic.bytes_per_us / 1e3, nic.post_us, nic.latency_us)
            model_rows.append(
                {
                    "params_T": total / 1e12,
                    "replicas": replicas,
                    "gpus_per_replica": 128 // replicas,
                    "nic": kind,
                    "writes": sched.num_writes,
                    "time_s": e.time_s,
                    "bound": e.bound,
                    "max_send_GB": e.max_send_GB,
                    "max_recv_GB": e.max_recv_GB,
                    "post_s": e.post_s,
                    "quantize_s": e.quantize_s,
                    "paper_s": PAPER_S,
                }
            )
            print(
                f"{replicas} x {128 // replicas:3d} GPUs {kind}: {e.time_s:6.3f} s "
                f"({e.bound}-bound, {sched.num_writes} writes, recv {e.max_recv_GB:.1f} GB/GPU)"
            )
    write_rows(
        f"{d}/rl_weights_model.csv",
        model_rows,
        "modelled; setting: Kimi-K2 shapes, 256 bf16 training GPUs -> 128 fp8 inference GPUs",
    )

    # Measured: the same planner and writes, small model, on this machine.
    h = 512 if args.quick else 1024  # hidden size of the small model
    small = W.kimi_k2_params(
        num_layers=3,
        num_dense_layers=1,
        num_experts=16,
        hidden=h,
        moe_inter=h // 2,
        dense_inter=2 * h,
        vocab=2048,
        attn_params_per_layer=h * 256,
    )
    sched = W.plan(small, 8, 2, 4)
    g = torch.Generator().manual_seed(1234)
    weights = [torch.randn(p.rows, p.cols, generator=g).to(torch.bfloat16) for p in small]
    src = W.stage_sources(sched, weights)
    expected = W.expected_destination(sched, weights)
    nbytes = int(sched.nbytes.sum())
    est = W.modelled_time_s(sched, SHM_GBPS, SHM_POST_US, SHM_LAT_US)
    # The measured run moves every rank's bytes through one engine pair (one link):
    one_link_s = nbytes / (SHM_GBPS * 1e9) + sched.num_writes * SHM_POST_US * 1e-6
    reps = 2 if args.quick else 5
    meas_rows = []
    for impl in ("memcpy", "TransferEngine shm"):
        times, note = [], ""
        for _ in range(reps):
            try:
                if impl == "memcpy":
                    dst, sec = W.execute_memcpy(sched, src)
                else:
                    dst, sec = W.execute_transfer_engine(sched, src, "shm")
            except Exception as exc:  # the engine may be absent or fail here: say so
                note = f"unavailable: {type(exc).__name__}: {exc}"[:200]
                break
            ok = all(np.array_equal(a, b) for a, b in zip(dst, expected))
            if not ok:
                raise AssertionError(f"{impl}: destination buffers differ from the expected ones")
            times.append(sec)
        p50 = float(np.median(times)) if times else float("nan")
        meas_rows.append(
            {
                "impl": impl,
                "writes": sched.num_writes,
                "bytes": nbytes,
                "src_ranks": 8,
                "replicas": 2,
                "ranks_per_replica": 4,
                "p50_s": p50,
                "GBps": nbytes / p50 / 1e9 if times else float("nan"),
                "bit_exact": bool(times),
                "reps": len(times),
                "modelled_shm_parallel_s": est.time_s,
                "modelled_shm_one_link_s": one_link_s,
                "note": note
                or "one process (two engines for TransferEngine); first write to last arrival",
            }
        )
        print(
            f"measured {impl}: {p50 * 1e3:.2f} ms for {nbytes / 1e6:.1f} MB in "
            f"{sched.num_writes} writes {note}"
        )
    write_rows(
        f"{d}/rl_weights_measured.csv",
        meas_rows,
        "measured on this machine (CPU); small Kimi-K2-shaped model, same planner",
    )

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(4)
    for i, kind in enumerate(("cx7", "efa")):
        sel = [r for r in model_rows if r["nic"] == kind]
        axes[0].bar(x + 0.38 * i, [r["time_s"] for r in sel], 0.38, label=f"model, {kind}")
    axes[0].axhline(PAPER_S, color="red", ls="--", label="paper: 1.3 s")
    axes[0].set_xticks(x + 0.19, [f"{r} x {128 // r}" for r in (1, 2, 4, 8)])
    axes[0].set_xlabel("inference replicas x GPUs per replica (128 GPUs)")
    axes[0].set_ylabel("weight update time (s)")
    axes[0].set_title(f"{total / 1e12:.2f}T params, 256 -> 128 GPUs, static schedule")
    axes[0].legend(fontsize=8)
    labels = [r["impl"].replace(" ", "\n") for r in meas_rows]
    labels += ["model:\none 7 GB/s link", "model:\nper-rank links"]
    vals = [r["p50_s"] * 1e3 for r in meas_rows] + [one_link_s * 1e3, est.time_s * 1e3]
    axes[1].bar(labels, vals, color=["tab:gray", "tab:green", "tab:purple", "tab:pink"])
    axes[1].tick_params(axis="x", labelsize=7)
    axes[1].set_ylabel("ms")
    axes[1].set_title(f"measured here: {nbytes / 1e6:.0f} MB, {sched.num_writes} writes, bit-exact")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    save(fig, f"{d}/rl_weights.png")
    print(f"wrote {d}/rl_weights_model.csv, rl_weights_measured.csv, rl_weights.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
