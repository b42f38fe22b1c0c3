"""MoE decode latency against EP size: published pplx-garden EFA / CX7 / DeepEP, the
calibrated model, DESIGN.md's measured H100 points and ours (EP <= 4) when recorded.

Command:  python -m experiments.moe_decode [--quick] [--out DIR]
Hardware: any CPU (model only; our measured points are read from
          experiments/results/moe/moe.csv, recorded on GPUs by `python -m pplx.bench moe`).
Runtime:  about 3 s (the fit, 16 model evaluations per EP, a figure).
Sources:  experiments/paper_data/pplx_garden_decode.csv (pplx-garden README, commit
          2446003), experiments/paper_data/design_measured.csv (DESIGN.md, H100, 2026-11).
Outputs:  moe_decode/moe_decode.csv (every plotted point, with its source),
          moe_decode/single_node.csv (EP2/EP4: model vs measured H100 numbers),
          moe_decode/model_error.csv and .md (per-cell error of the model, refit here),
          moe_decode/moe_decode.png.
Setting:  128 tokens per rank, hidden 7168, 256 experts, top-8, fp8 dispatch, bf16 combine.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.common import out_dir, write_rows
from experiments.moe_latency import design_measured, model_sweep, our_measured, plot
from pplx.sim import DECODE, calibrate

EPS = (2, 4, 8, 16, 32, 64)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MoE decode latency vs EP")
    ap.add_argument("--quick", action="store_true", help="presets only, no refit")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    args = ap.parse_args(argv)
    d = out_dir("moe_decode", args.out)

    cells = calibrate.load_decode_table()
    rows = [
        {
            "ep": c.ep,
            "phase": c.phase,
            "system": c.system,
            "us": c.published_us,
            "source": "pplx-garden README (published)",
        }
        for c in cells
    ]
    rows += model_sweep(DECODE, EPS)
    rows += design_measured("decode")
    ours = our_measured(DECODE)
    rows += ours
    write_rows(f"{d}/moe_decode.csv", rows)

    # Per-cell error of the model: the presets, and (unless --quick) a fresh fit.
    f = calibrate.fit(cells) if not args.quick else None
    routings = calibrate.decode_routings([8, 16, 32, 64])
    from pplx.sim import cx7_cluster, efa_cluster

    pred = calibrate.predict({"cx7": cx7_cluster(), "efa": efa_cluster()}, cells, routings)
    err_rows = []
    for c, p, q in zip(cells, pred, f.predicted_us if f else [float("nan")] * len(cells)):
        if c.system not in ("efa", "cx7"):
            continue
        err_rows.append(
            {
                "ep": c.ep,
                "phase": c.phase,
                "system": c.system,
                "published_us": c.published_us,
                "model_us": p,
                "error_pct": 100 * (p / c.published_us - 1),
                "refit_us": q,
                "refit_error_pct": 100 * (q / c.published_us - 1),
                "anomalous": calibrate.ANOMALOUS.get((c.ep, c.phase, c.system), ""),
            }
        )
    write_rows(f"{d}/model_error.csv", err_rows)
    table = calibrate.error_table(calibrate.Fit({}, {}, cells, pred))
    with open(f"{d}/model_error.md", "w") as fh:
        fh.write(table + "\n")
    print(table)
    worst = max(abs(r["error_pct"]) for r in err_rows)
    print(f"max |error| of the presets over the {len(err_rows)} modelled cells: {worst:.1f}%")
    if f is not None:
        print("refit:", {k: round(v, 3) for k, v in f.values.items()})

    # One node (EP2/EP4, NVLink only): the model next to what was measured on H100s.
    single = []
    for ep in (2, 4):
        for phase in ("dispatch", "combine"):
            cell = {"ep": ep, "phase": phase}
            for r in rows:
                if r["ep"] == ep and r["phase"] == phase and r["system"] != "model_efa":
                    cell[r["system"]] = r["us"]
            single.append(cell)
    write_rows(f"{d}/single_node.csv", single, "EP2/EP4 on one node: model vs measured, us")
    print(
        "one node (us): "
        + "; ".join(
            ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items())
            for c in single
        )
    )

    note = (
        "model: pplx.sim, calibrated on the published cells (max error "
        f"{worst:.1f}%); measured points: "
        + ("experiments/results/moe/moe.csv" if ours else "none recorded in moe.csv yet")
        + "; DESIGN.md H100 DeepEP/NCCL at EP2/4"
    )
    plot(rows, "decode, 128 tokens/rank", f"{d}/moe_decode.png", note)
    print(f"wrote {d}/moe_decode.csv, model_error.csv, moe_decode.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
