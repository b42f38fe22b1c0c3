"""Host-proxy overhead: the GPU <-> CPU proxy round trip (measured), and its share of MoE
decode latency at EP 16-64 by the model, with a C proxy thread and with a Python one.

Command:  python -m experiments.host_proxy [--quick] [--out DIR]
Hardware: any CPU (model). The round trip is the last GPU row of the inter-node
          benchmark (`python -m pplx.bench moe --ranks-per-node R --device cuda`: a Triton
          kernel writes a work item into the host ring, the C proxy posts an 8 B write +
          imm, the kernel polls the ImmCounter table), read from
          results/moe_internode/moe_internode.csv (or a fabric CSV's "*proxy*" GPU case);
          without one, DESIGN.md's measurement is used (H100 SXM, 2026-11: a bare Triton
          kernel <-> C spin thread 4.2 us, <-> Python thread 64.6 us).
Runtime:  about 2 s.
Sources:  experiments/paper_data/headline.csv (DESIGN.md measured round trips).
Outputs:  host_proxy/host_proxy.csv, host_proxy/host_proxy.png.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Sequence

from experiments.common import RESULTS, out_dir, pyplot, read_rows, save, write_rows
from pplx.sim import DECODE, make_routing, phase_latency, preset

C_RTT_US, PY_RTT_US = 4.2, 64.6  # DESIGN.md, measured on H100 SXM


def _is_gpu_proxy_row(r: dict) -> bool:
    on_gpu = not r.get("device", "cpu").startswith("cpu")
    producer = r.get("impl", "").lower()
    return on_gpu and "proxy" in r.get("case", "").lower() and ("gpu" in producer or not producer)


def measured_rtt() -> tuple[float, str]:
    """(round trip us, source): the latest GPU-kernel proxy round trip recorded by our
    benchmarks, else DESIGN.md's."""
    paths = [os.path.join(RESULTS, "moe_internode", "moe_internode.csv")]
    paths += sorted(glob.glob(os.path.join(RESULTS, "fabric", "fabric_*.csv")))
    for path in paths:
        if not os.path.exists(path):
            continue
        rows = [r for r in read_rows(path) if _is_gpu_proxy_row(r)]
        if rows:
            r = max(rows, key=lambda r: r.get("time_utc", ""))
            rel = os.path.relpath(path, os.path.dirname(RESULTS))
            return float(r["p50_us"]), (
                f"{rel}: {r.get('impl') or r.get('case')} ({r.get('device')}, "
                f"{r.get('commit')}, {r.get('time_utc')})"
            )
    return C_RTT_US, "DESIGN.md, measured 2026-11 on H100 SXM (C thread)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="host proxy overhead")
    ap.add_argument("--quick", action="store_true", help="EP 16 and 32 only")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    args = ap.parse_args(argv)
    d = out_dir("host_proxy", args.out)
    rtt, src = measured_rtt()
    eps = (16, 32) if args.quick else (16, 32, 64)
    rows = []
    for ep in eps:
        w = DECODE
        routing = make_routing("uniform", ep, w.num_tokens, w.num_experts, w.num_experts_per_token)
        for kind in ("cx7", "efa"):
            for proxy, one_way in (("C thread", rtt / 2), ("Python thread", PY_RTT_US / 2)):
                c = preset(kind, proxy_one_way_us=one_way)
                for phase in ("dispatch", "combine"):
                    b = phase_latency(c, routing, w, phase)
                    rows.append(
                        {
                            "ep": ep,
                            "nic": kind,
                            "proxy": proxy,
                            "phase": phase,
                            "proxy_rtt_us": 2 * one_way,
                            "total_us": b.total_us,
                            "proxy_share_pct": 100 * 2 * one_way / b.total_us,
                            "proxy_busy_us": b.proxy_busy_us,
                            "rtt_source": src
                            if proxy == "C thread"
                            else "DESIGN.md (Python thread)",
                        }
                    )
    write_rows(f"{d}/host_proxy.csv", rows)
    for r in rows:
        print(
            f"EP{r['ep']:3d} {r['nic']} {r['proxy']:13s} {r['phase']:8s} total "
            f"{r['total_us']:7.1f} us, proxy hand-offs {r['proxy_share_pct']:5.1f}%"
        )

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.2
    for i, (kind, phase) in enumerate(
        [(k, p) for k in ("cx7", "efa") for p in ("dispatch", "combine")]
    ):
        sel = [
            r for r in rows if r["nic"] == kind and r["phase"] == phase and r["proxy"] == "C thread"
        ]
        axes[0].bar(
            [j + i * width for j in range(len(sel))],
            [r["proxy_share_pct"] for r in sel],
            width,
            label=f"{kind} {phase}",
        )
        py = [
            r for r in rows if r["nic"] == kind and r["phase"] == phase and r["proxy"] != "C thread"
        ]
        axes[1].plot(
            [r["ep"] for r in sel],
            [r["total_us"] for r in sel],
            color=f"C{i}",
            marker="o",
            label=f"{kind} {phase}, C proxy",
        )
        axes[1].plot(
            [r["ep"] for r in py],
            [r["total_us"] for r in py],
            color=f"C{i}",
            marker="x",
            ls="--",
            label=f"{kind} {phase}, Python proxy",
        )
    axes[0].set_xticks([j + 1.5 * width for j in range(len(eps))], [f"EP{e}" for e in eps])
    axes[0].set_ylabel("proxy hand-offs / decode latency (%)")
    axes[0].set_title(f"share of a {rtt:.1f} us round trip (C proxy)")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("EP size")
    axes[1].set_ylabel("modelled decode latency per call (us)")
    axes[1].set_title(f"C proxy ({rtt:.1f} us RTT) vs Python proxy ({PY_RTT_US} us RTT)")
    axes[1].legend(fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.text(
        0.01,
        0.005,
        f"round trip: {src}; shares by the pplx.sim model (decode, uniform routing)",
        fontsize=7,
        color="dimgray",
    )
    save(fig, f"{d}/host_proxy.png", footer=0.05)
    print(f"wrote {d}/host_proxy.csv, host_proxy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
