"""The paper's questions, answered with the calibrated model: at which EP EFA falls
behind ConnectX-7 and why; what one more NIC per GPU buys; how much the private buffer
saves.

Command:  python -m experiments.model_questions [--quick] [--out DIR]
Hardware: any CPU (model only).
Runtime:  about 15 s (prefill routings of 4096 tokens per rank dominate); --quick: 3 s.
Sources:  pplx.sim presets, calibrated on experiments/paper_data/pplx_garden_decode.csv.
Outputs:  model_questions/model_questions.csv, model_questions/answers.md,
          model_questions/model_questions.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.common import out_dir, pyplot, save, write_rows
from pplx.sim import DECODE, PREFILL, Workload, make_routing, phase_latency, preset

EPS = (8, 16, 32, 64)


def _both(cluster, routing, w: Workload) -> tuple[float, float]:
    return tuple(phase_latency(cluster, routing, w, p).total_us for p in ("dispatch", "combine"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EFA vs CX7, one more NIC, private buffer")
    ap.add_argument("--quick", action="store_true", help="decode only, 1024-token prefill")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    args = ap.parse_args(argv)
    d = out_dir("model_questions", args.out)
    prefill = Workload(num_tokens=1024) if args.quick else PREFILL
    rows: list[dict] = []
    routings = {}
    for ep in EPS:
        for name, w in (("decode", DECODE), ("prefill", prefill)):
            routings[(name, ep, "uniform")] = make_routing("uniform", ep, w.num_tokens, 256, 8)
        routings[("decode", ep, "zipf")] = make_routing("zipf", ep, 128, 256, 8, skew=1.0)

    # Q1: EFA vs CX7, and which EFA parameter makes the gap.
    for ep in EPS:
        r = routings[("decode", ep, "uniform")]
        cx7 = _both(preset("cx7"), r, DECODE)
        efa = _both(preset("efa"), r, DECODE)
        cx7n = preset("cx7").nic
        swaps = {
            "efa": efa,
            "efa with CX7 latency": _both(preset("efa", nic_latency_us=cx7n.latency_us), r, DECODE),
            "efa with CX7 post cost": _both(preset("efa", nic_post_us=cx7n.post_us), r, DECODE),
            "efa as 1 x 400G NIC": _both(
                preset("efa", nic_nics_per_gpu=1, nic_gbps_per_nic=400.0), r, DECODE
            ),
        }
        for variant, (dsp, cmb) in swaps.items():
            rows.append(
                {
                    "question": "efa_vs_cx7",
                    "workload": "decode",
                    "routing": "uniform",
                    "ep": ep,
                    "variant": variant,
                    "dispatch_us": dsp,
                    "combine_us": cmb,
                    "vs_cx7_dispatch": dsp / cx7[0],
                    "vs_cx7_combine": cmb / cx7[1],
                }
            )
        rows.append(
            {
                "question": "efa_vs_cx7",
                "workload": "decode",
                "routing": "uniform",
                "ep": ep,
                "variant": "cx7",
                "dispatch_us": cx7[0],
                "combine_us": cx7[1],
                "vs_cx7_dispatch": 1.0,
                "vs_cx7_combine": 1.0,
            }
        )

    # Q2: one more NIC per GPU (same speed each).
    for name in ("decode", "prefill"):
        w = DECODE if name == "decode" else prefill
        for ep in EPS[1:]:
            r = routings[(name, ep, "uniform")]
            for kind in ("cx7", "efa"):
                base = preset(kind)
                n0 = base.nic.nics_per_gpu
                t0 = _both(base, r, w)
                t1 = _both(base.replace(nic_nics_per_gpu=n0 + 1), r, w)
                rows.append(
                    {
                        "question": "one_more_nic",
                        "workload": name,
                        "routing": "uniform",
                        "ep": ep,
                        "variant": f"{kind} {n0}->{n0 + 1} NICs",
                        "dispatch_us": t1[0],
                        "combine_us": t1[1],
                        "saved_dispatch_pct": 100 * (1 - t1[0] / t0[0]),
                        "saved_combine_pct": 100 * (1 - t1[1] / t0[1]),
                    }
                )

    # Q3: the private buffer: none vs the fitted 32 rows vs everything (128).
    for rname in ("uniform", "zipf"):
        for ep in EPS[1:]:
            r = routings[("decode", ep, rname)]
            for kind in ("cx7", "efa"):
                t_none = phase_latency(preset(kind, max_private_tokens=0), r, DECODE, "dispatch")
                for mp in (0, 16, 32, 128):
                    b = phase_latency(preset(kind, max_private_tokens=mp), r, DECODE, "dispatch")
                    rows.append(
                        {
                            "question": "private_buffer",
                            "workload": "decode",
                            "routing": rname,
                            "ep": ep,
                            "variant": f"{kind} private={mp}",
                            "dispatch_us": b.total_us,
                            "overflow_rows": b.overflow_rows,
                            "saved_dispatch_pct": 100 * (1 - b.total_us / t_none.total_us),
                            "saved_dispatch_us": t_none.total_us - b.total_us,
                        }
                    )
    write_rows(f"{d}/model_questions.csv", rows)

    def pick(q, **kw):
        return [r for r in rows if r["question"] == q and all(r[k] == v for k, v in kw.items())]

    lines = ["# What the model says (decode: 128 tokens/rank, uniform routing unless noted)", ""]
    lines.append("## At which EP does EFA fall behind ConnectX-7, and why")
    for ep in EPS:
        e = pick("efa_vs_cx7", ep=ep, variant="efa")[0]
        lat = pick("efa_vs_cx7", ep=ep, variant="efa with CX7 latency")[0]
        lines.append(
            f"- EP{ep}: EFA/CX7 = {e['vs_cx7_dispatch']:.2f}x dispatch, {e['vs_cx7_combine']:.2f}x "
            f"combine; with CX7's latency EFA would be {lat['vs_cx7_dispatch']:.2f}x / "
            f"{lat['vs_cx7_combine']:.2f}x"
        )
    lines.append(
        "- EFA falls behind as soon as tokens leave the node (EP16): both reach the same 400 "
        "Gb/s per GPU in the fit, so the gap is the EFA per-call latency term (fitted "
        f"{preset('efa').nic.latency_us:.0f} us vs {preset('cx7').nic.latency_us:.0f} us assumed "
        "for CX7). It is paid once per phase, twice in dispatch when rows overflow the private "
        "region (EP16: ~48 rows per peer > 32), which is why EP16 dispatch is ~1.9x. The gap "
        "stays near-constant in microseconds, so it shrinks relatively as EP grows and "
        "bytes dominate."
    )
    lines += ["", "## What one more NIC per GPU buys"]
    for r in pick("one_more_nic"):
        lines.append(
            f"- {r['workload']} EP{r['ep']} {r['variant']}: dispatch "
            f"-{r['saved_dispatch_pct']:.0f}%, combine -{r['saved_combine_pct']:.0f}%"
        )
    lines += ["", "## How much the private buffer saves (dispatch, vs no private region)"]
    for r in pick("private_buffer"):
        if r["variant"].endswith("=0"):
            continue
        lines.append(
            f"- {r['routing']} EP{r['ep']} {r['variant']}: {r['saved_dispatch_us']:.1f} us "
            f"({r['saved_dispatch_pct']:.0f}%), overflow rows {r['overflow_rows']}"
        )
    text = "\n".join(lines) + "\n"
    with open(f"{d}/answers.md", "w") as f:
        f.write(text)
    print(text)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for variant in ("efa", "efa with CX7 latency", "efa with CX7 post cost", "efa as 1 x 400G NIC"):
        sel = pick("efa_vs_cx7", variant=variant)
        axes[0].plot(
            [r["ep"] for r in sel],
            [r["vs_cx7_dispatch"] for r in sel],
            marker="o",
            label=f"{variant} (dispatch)",
        )
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].set_title("EFA / CX7 decode latency")
    axes[0].set_xlabel("EP")
    for kind in ("cx7", "efa"):
        for wl, ls in (("decode", "-"), ("prefill", "--")):
            sel = [r for r in pick("one_more_nic", workload=wl) if r["variant"].startswith(kind)]
            axes[1].plot(
                [r["ep"] for r in sel],
                [r["saved_combine_pct"] for r in sel],
                ls=ls,
                marker="o",
                label=f"{sel[0]['variant']} {wl}",
            )
    axes[1].set_title("one more NIC per GPU: combine time saved (%)")
    axes[1].set_xlabel("EP")
    for kind in ("cx7", "efa"):
        for rname, ls in (("uniform", "-"), ("zipf", "--")):
            sel = [
                r
                for r in pick("private_buffer", routing=rname)
                if r["variant"] == f"{kind} private=32"
            ]
            axes[2].plot(
                [r["ep"] for r in sel],
                [r["saved_dispatch_us"] for r in sel],
                ls=ls,
                marker="o",
                label=f"{kind}, {rname}",
            )
    axes[2].set_title("private region of 32 rows: dispatch us saved vs none")
    axes[2].set_xlabel("EP")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    save(fig, f"{d}/model_questions.png")
    print(f"wrote {d}/model_questions.csv, answers.md, model_questions.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
