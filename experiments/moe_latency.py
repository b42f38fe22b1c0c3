"""Shared code of the MoE decode and prefill figures (model sweep, measured points)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from experiments.common import PAPER_DATA, RESULTS, read_rows
from pplx.sim import Workload, make_routing, phase_latency, preset

MOE_CSV = os.path.join(RESULTS, "moe", "moe.csv")


def model_sweep(
    workload: Workload, eps: Sequence[int], kinds: Sequence[str] = ("cx7", "efa"), seed: int = 0
) -> list[dict]:
    """Modelled dispatch/combine per EP size and NIC kind, uniform routing, with breakdown."""
    rows = []
    for ep in eps:
        w = workload
        routing = make_routing(
            "uniform", ep, w.num_tokens, w.num_experts, w.num_experts_per_token, seed
        )
        for kind in kinds:
            cluster = preset(kind)
            for phase in ("dispatch", "combine"):
                b = phase_latency(cluster, routing, w, phase)
                rows.append(
                    {
                        "ep": ep,
                        "phase": phase,
                        "system": f"model_{kind}",
                        "us": b.total_us,
                        "nvlink_us": b.nvlink_us,
                        "rdma_us": b.rdma_us,
                        "wire_us": b.wire_us,
                        "proxy_busy_us": b.proxy_busy_us,
                        "counts_wait_us": b.counts_wait_us,
                        "fabric_MB": b.fabric_bytes / 1e6,
                        "nvlink_MB": b.nvlink_bytes / 1e6,
                        "source": "pplx.sim model (calibrated on pplx_garden_decode.csv)",
                    }
                )
    return rows


def design_measured(workload_name: str) -> list[dict]:
    """DESIGN.md's measured H100 numbers (DeepEP, NCCL payload) for one workload."""
    rows = read_rows(os.path.join(PAPER_DATA, "design_measured.csv"))
    return [
        {
            "ep": int(r["ep"]),
            "phase": r["phase"],
            "system": f"measured_h100_{r['system']}",
            "us": float(r["us"]),
            "source": "DESIGN.md, measured 2026-11 on H100 SXM",
        }
        for r in rows
        if r["workload"] == workload_name
    ]


def our_measured(workload: Workload, path: str = MOE_CSV, card: str = "H100") -> list[dict]:
    """Rows of this repository's MoE benchmark (`python -m pplx.bench moe`) whose shape is
    exactly this workload ("T128 H7168 K8 E256"), measured on a `card` GPU (a substring of
    the device name: the bar of DESIGN.md was measured on H100s, so by default rows from
    other cards, e.g. an H200 lent in place of an H100, stay out of the comparison): the
    latest p50 per (ranks, phase, impl, device) of whole dispatch / combine calls (impl
    "triton:dispatch", "baseline:combine", "floor:dispatch", ...; split halves, kernel-only
    spans and peer copies are left out). The Triton kernels' defaults count as "triton"
    whether or not the run also timed variants ("triton-default"); the variants themselves
    ("triton-<name>") are experiments and left out. [] when none."""
    w = workload
    label = f"T{w.num_tokens} H{w.hidden_dim} K{w.num_experts_per_token} E{w.num_experts}"
    latest: dict[tuple, dict] = {}
    for r in read_rows(path):
        impl, _, phase = r.get("impl", "").partition(":")
        if r.get("shape", "") != label or phase not in ("dispatch", "combine"):
            continue
        if card and card not in r.get("device", ""):
            continue
        if impl == "triton-default":
            impl = "triton"
        elif impl.startswith("triton-"):
            continue
        latest[(int(r["ranks"]), phase, impl, r.get("device", ""))] = r
    return [
        {
            "ep": ep,
            "phase": phase,
            "system": f"ours_{impl}",
            "us": float(r["p50_us"]),
            "source": f"experiments/results/moe/moe.csv, {dev}, {r.get('time_utc', '')}",
        }
        for (ep, phase, impl, dev), r in sorted(latest.items())
    ]


STYLE = {
    "model_cx7": dict(color="tab:blue", ls="-", marker=None, label="model ConnectX-7"),
    "model_efa": dict(color="tab:orange", ls="-", marker=None, label="model EFA (2 x 200G)"),
    "cx7": dict(color="tab:blue", ls="none", marker="o", label="pplx-garden CX7 (published)"),
    "efa": dict(color="tab:orange", ls="none", marker="o", label="pplx-garden EFA (published)"),
    "deepep_cx7": dict(color="tab:green", ls="none", marker="s", label="DeepEP CX7 (published)"),
}


def plot(rows: Sequence[dict], title: str, path: str, note: str = "") -> str:
    """Two panels (dispatch, combine): latency against EP, one series per system."""
    from experiments.common import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    systems = sorted({r["system"] for r in rows})
    markers = ["^", "v", "D", "P", "X", "*", "h", "<", ">"]
    styles = dict(STYLE)  # one marker and colour per system, the same in both panels
    for i, s in enumerate(x for x in systems if x not in STYLE):
        styles[s] = dict(
            ls="none", marker=markers[i % len(markers)], color=f"C{(i + 3) % 10}",
            label=s.replace("_", " "),
        )  # fmt: skip
    for ax, phase in zip(axes, ("dispatch", "combine")):
        for s in systems:
            pts = sorted(
                (r["ep"], r["us"]) for r in rows if r["system"] == s and r["phase"] == phase
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], **styles[s])
        ax.set_xscale("log", base=2)
        # Log latency: the hand-written baseline (~2 ms) and the byte floors (~10 us) share
        # the panel with the 30-400 us kernels without flattening them.
        ax.set_yscale("log")
        ax.set_xticks([2, 4, 8, 16, 32, 64])
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("EP size (ranks, 8 GPUs per node)")
        ax.set_ylabel("latency per call (us)")
        ax.set_title(f"{title}: {phase}")
        ax.grid(alpha=0.3)
        ax.axvspan(1.5, 8, color="grey", alpha=0.08)
        ax.text(2.1, ax.get_ylim()[1] * 0.7, "one node (NVLink)", fontsize=7, color="grey")
    axes[1].legend(fontsize=6, loc="lower right", ncol=2)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="dimgray")
    return save(fig, path, footer=0.05)
