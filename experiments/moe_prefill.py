"""MoE prefill latency against EP size: the calibrated model for ConnectX-7 and EFA,
DESIGN.md's measured H100 points at EP4 and ours (EP <= 4) when recorded.

Command:  python -m experiments.moe_prefill [--quick] [--out DIR]
Hardware: any CPU (model only; measured points come from
          experiments/results/moe/moe.csv, recorded on GPUs by `python -m pplx.bench moe`).
Runtime:  about 10 s (routing of 4096 tokens x 64 ranks is sampled once per EP size).
Sources:  no published pplx-garden prefill table is in paper_data, so none is plotted;
          experiments/paper_data/design_measured.csv (DESIGN.md, H100, 2026-11).
Outputs:  moe_prefill/moe_prefill.csv, moe_prefill/moe_prefill.png.
Setting:  4096 tokens per rank, hidden 7168, 256 experts, top-8, fp8 dispatch, bf16 combine;
          the model's decode-fitted parameters are used unchanged (an extrapolation: at
          prefill sizes every cell is bandwidth-bound, 33x the decode bytes).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.common import out_dir, write_rows
from experiments.moe_latency import design_measured, model_sweep, our_measured, plot
from pplx.sim import PREFILL, Workload

EPS = (2, 4, 8, 16, 32, 64)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MoE prefill latency vs EP")
    ap.add_argument("--quick", action="store_true", help="1024 tokens per rank, EP <= 32")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    args = ap.parse_args(argv)
    d = out_dir("moe_prefill", args.out)
    w = Workload(num_tokens=1024) if args.quick else PREFILL
    eps = EPS[:-1] if args.quick else EPS
    rows = model_sweep(w, eps)
    if not args.quick:
        rows += design_measured("prefill")
    ours = our_measured(w)
    rows += ours
    write_rows(f"{d}/moe_prefill.csv", rows)
    for r in rows:
        if r["system"].startswith("model"):
            print(f"EP{r['ep']:3d} {r['phase']:8s} {r['system']:10s} {r['us']:9.1f} us")
    note = (
        f"model only for EP >= 8 (no published prefill table in paper_data); T={w.num_tokens}; "
        + (
            "ours from experiments/results/moe/moe.csv"
            if ours
            else "no measured rows in moe.csv yet"
        )
    )
    plot(rows, f"prefill, {w.num_tokens} tokens/rank", f"{d}/moe_prefill.png", note)
    print(f"wrote {d}/moe_prefill.csv, moe_prefill.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
