"""`python -m pplx.bench moe` runs on CPU (gloo, torch backend, Triton interpreter) and
writes the shared CSV schema with one row per implementation and phase."""

from __future__ import annotations

import csv

from pplx.bench import moe


def test_bench_moe_quick_cpu(tmp_path) -> None:
    path = tmp_path / "moe.csv"
    argv = [
        "--ranks",
        "2",
        "--quick",
        "--cpu",
        "--cases",
        "decode",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--csv",
        str(path),
    ]
    assert moe.main(argv) == 0
    with path.open() as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows}
    for phase in ("dispatch", "combine"):
        for impl in ("triton", "baseline", "payload", "torch"):
            assert f"{impl}:{phase}" in impls, sorted(impls)
    assert {
        "triton:dispatch-send",
        "triton:dispatch-recv",
        "triton:combine-send",
        "triton:combine-recv",
    } <= impls
    for r in rows:
        assert r["bench"] == "moe" and r["ranks"] == "2" and float(r["p50_us"]) > 0, r
