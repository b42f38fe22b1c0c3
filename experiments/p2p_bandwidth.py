"""Point-to-point write bandwidth against message size, single and paged writes:
measured here on shm/tcp (the fabric benchmark's CSV), modelled for ConnectX-7 and EFA,
the paper's 400 Gb/s peak marked.

Command:  python -m experiments.p2p_bandwidth [--quick] [--out DIR]
Hardware: any CPU. Measured points come from experiments/results/fabric/fabric_<provider>.csv
          (`python -m pplx.bench fabric`); without --quick, when no such CSV exists and
          the benchmark module exists, it runs `python -m pplx.bench fabric --quick` once
          into its own folder (about 30 s on 2 cores).
Runtime:  about 2 s (plus the benchmark when it runs).
Sources:  paper headline (400 Gb/s on CX7 and EFA, experiments/paper_data/headline.csv);
          DESIGN.md raw libfabric numbers measured here (shm 5.5-9 GB/s, tcp 4-5.4 GB/s at
          1 MiB); pplx.sim NIC presets (fitted on the decode table).
Outputs:  p2p_bandwidth/p2p_bandwidth.csv, p2p_bandwidth/p2p_fit.csv (shm/tcp fits of
          time per streamed write = fixed + bytes / bandwidth), p2p_bandwidth/p2p_bandwidth.png
          (and p2p_bandwidth/fabric_quick_shm.csv when it ran the benchmark itself).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from experiments.common import REPO, RESULTS, out_dir, pyplot, read_rows, save, write_rows
from pplx.sim import cx7_cluster, efa_cluster, p2p_stream_GBps

PAGE_BYTES = 16 * 1024  # a KV-cache page of 16 KiB (one layer's block of a few tokens)
PEAK_GBPS = 400.0  # paper: peak point-to-point throughput, CX7 and EFA


def measured_rows(paths: Sequence[str]) -> list[dict]:
    """Throughput rows (cases other than the latency ping-pong) of fabric benchmark CSVs:
    provider, case, impl, bytes (message or page size), p50_us, GB/s, per_write (whether
    p50_us is the time per write of a windowed stream)."""
    out = []
    for path in paths:
        for r in read_rows(path):
            try:
                nbytes, p50 = int(float(r["bytes"])), float(r["p50_us"])
                gbps = float(r.get("gbps_fabric") or 0) or (nbytes / p50 / 1e3 if p50 else 0)
            except (KeyError, ValueError):
                continue
            if nbytes <= 0 or r.get("case", "") == "lat" or gbps <= 0:
                continue
            out.append(
                {
                    "provider": r.get("provider", ""),
                    "case": r.get("case", ""),
                    "impl": r.get("impl", ""),
                    "bytes": nbytes,
                    "p50_us": p50,
                    "GBps": gbps,
                    "per_write": "per write" in r.get("notes", ""),
                    "source": f"{os.path.relpath(path, REPO)} {r.get('time_utc', '')}",
                }
            )
    return out


def fit_latency_bandwidth(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fit of time_us = fixed_us + bytes / bytes_per_us, on relative error.
    Returns (fixed_us, GB/s)."""
    b = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    a = np.stack([np.ones_like(b), b], axis=1) / t[:, None]
    (lat, inv_bw), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return float(lat), float(1 / inv_bw / 1e3) if inv_bw > 0 else float("inf")


def fabric_csvs(own_dir: str) -> list[str]:
    """The fabric benchmark's recorded CSVs, else the one this script recorded itself."""
    recorded = sorted(glob.glob(os.path.join(RESULTS, "fabric", "fabric_*.csv")))
    return recorded or sorted(glob.glob(os.path.join(own_dir, "fabric_quick_*.csv")))


def maybe_run_fabric_bench(own_dir: str) -> str:
    """Without any recorded CSV, run the fabric benchmark once (--quick, shm) into
    `own_dir` (never into the benchmark's own results folder); say what happened."""
    if glob.glob(os.path.join(RESULTS, "fabric", "fabric_*.csv")):
        return "recorded CSV"
    if importlib.util.find_spec("pplx.bench.fabric") is None:
        return "no fabric benchmark in this checkout yet (pplx.bench.fabric missing)"
    csv_path = os.path.join(own_dir, "fabric_quick_shm.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    cmd = [sys.executable, "-m", "pplx.bench", "fabric", "--quick", "--provider", "shm",
           "--csv", csv_path, "--no-png"]  # fmt: skip
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "fabric benchmark timed out after 300 s"
    if p.returncode:
        return f"fabric benchmark failed (rc {p.returncode}): {p.stderr.strip()[-200:]}"
    return "ran python -m pplx.bench fabric --quick (shm) here"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="p2p write bandwidth vs message size")
    ap.add_argument("--quick", action="store_true", help="never run the fabric benchmark")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    args = ap.parse_args(argv)
    d = out_dir("p2p_bandwidth", args.out)
    status = "not run (--quick)" if args.quick else maybe_run_fabric_bench(d)
    meas = measured_rows(fabric_csvs(d))

    sizes = [2**k for k in range(10, 31)]
    rows = []
    for name, nic in (("ConnectX-7", cx7_cluster().nic), ("EFA 2x200G", efa_cluster().nic)):
        for s in sizes:
            rows.append(
                {
                    "system": f"model {name}",
                    "mode": "single",
                    "bytes": s,
                    "GBps": p2p_stream_GBps(nic, s),
                    "source": "pplx.sim preset",
                }
            )
            if s >= PAGE_BYTES:
                rows.append(
                    {
                        "system": f"model {name}",
                        "mode": f"paged {PAGE_BYTES // 1024} KiB",
                        "bytes": s,
                        "GBps": p2p_stream_GBps(nic, s, s // PAGE_BYTES),
                        "source": "pplx.sim preset",
                    }
                )
    for r in meas:
        rows.append(
            {
                "system": f"measured {r['provider']}",
                "mode": f"{r['case']} {r['impl']}".strip(),
                "bytes": r["bytes"],
                "GBps": r["GBps"],
                "source": r["source"],
            }
        )
    write_rows(f"{d}/p2p_bandwidth.csv", rows)

    fits = []
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in meas:
        if not r["per_write"]:
            continue
        groups.setdefault((r["provider"], f"{r['case']} {r['impl']}".strip()), []).append(
            (r["bytes"], r["p50_us"])
        )
    for (prov, mode), pts in sorted(groups.items()):
        if len({p[0] for p in pts}) >= 3:
            lat, bw = fit_latency_bandwidth(pts)
            errs = [abs((lat + b / (bw * 1e3)) / t - 1) for b, t in pts]
            if not (lat > 0 and 0 < bw < float("inf")) or max(errs) > 0.5:
                # Times that do not grow with bytes (a loaded machine): no meaningful fit.
                print(f"fit {prov:6s} {mode:24s} rejected (per write {lat:.2f} us, bw {bw} GB/s)")
                continue
            fits.append(
                {
                    "provider": prov,
                    "mode": mode,
                    "per_write_us": lat,
                    "GBps": bw,
                    "max_err_pct": 100 * max(errs),
                    "points": len(pts),
                }
            )
            print(
                f"fit {prov:6s} {mode:24s} per write {lat:7.2f} us  bw {bw:7.2f} GB/s  "
                f"max err {100 * max(errs):5.1f}%"
            )
    fit_path = f"{d}/p2p_fit.csv"
    if fits:
        write_rows(fit_path, fits)
    elif os.path.exists(fit_path):
        os.remove(fit_path)  # a stale fit of older measurements would mislead

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for sysname, color in (("model ConnectX-7", "tab:blue"), ("model EFA 2x200G", "tab:orange")):
        for mode, ls in (("single", "-"), (f"paged {PAGE_BYTES // 1024} KiB", "--")):
            pts = [
                (r["bytes"], r["GBps"])
                for r in rows
                if r["system"] == sysname and r["mode"] == mode
            ]
            ax.plot(
                [p[0] for p in pts],
                [p[1] * 8 for p in pts],
                ls=ls,
                color=color,
                label=f"{sysname}, {mode}",
            )
    cmap = iter(["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 3)
    for prov, mode in sorted({(r["provider"], f"{r['case']} {r['impl']}".strip()) for r in meas}):
        pts = sorted(
            (r["bytes"], r["GBps"])
            for r in meas
            if r["provider"] == prov and f"{r['case']} {r['impl']}".strip() == mode
        )
        ax.plot(
            [p[0] for p in pts],
            [p[1] * 8 for p in pts],
            marker="o",
            ms=3,
            ls=":",
            color=next(cmap, "k"),
            label=f"measured {prov} {mode} (this machine)",
        )
    # DESIGN.md raw libfabric ranges at 1 MiB, measured here.
    ax.errorbar(
        [1 << 20],
        [7.25 * 8],
        yerr=[[1.75 * 8], [1.75 * 8]],
        fmt="s",
        color="gray",
        capsize=3,
        label="raw libfabric shm 1 MiB (DESIGN.md, here)",
    )
    ax.errorbar(
        [1 << 20],
        [4.7 * 8],
        yerr=[[0.7 * 8], [0.7 * 8]],
        fmt="D",
        color="black",
        capsize=3,
        label="raw libfabric tcp 1 MiB (DESIGN.md, here)",
    )
    ax.axhline(PEAK_GBPS, color="red", ls="-.", lw=1)
    ax.text(1100, PEAK_GBPS * 1.05, "paper: 400 Gb/s peak (CX7 and EFA)", color="red", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(0.05, 800)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("throughput (Gb/s)")
    ax.set_title("point-to-point RDMA write throughput")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="lower right")
    fig.text(
        0.01,
        0.005,
        f"measured: {status if not meas else 'from ' + meas[0]['source'].split()[0]}"
        + ("" if meas else " -- no measured shm/tcp curve in this figure")
        + "\nmodel: posting cost per write as fitted on decode (CX7 0.05, EFA 0.15 us); "
        "NIC message-rate limits not modelled (curves saturate early)",
        fontsize=7,
        color="dimgray",
    )
    save(fig, f"{d}/p2p_bandwidth.png", footer=0.07)
    print(f"measured: {status}; {len(meas)} rows. wrote {d}/p2p_bandwidth.csv, p2p_bandwidth.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
