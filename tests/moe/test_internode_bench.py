"""`python -m pplx.bench.moe_internode --quick`: the benchmark runs, checks itself against the
baseline and writes its rows (2 nodes x 2 ranks, tiny shapes, CPU)."""

from __future__ import annotations

import csv

from pplx.bench import moe_internode


def test_quick_bench_writes_rows(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    rc = moe_internode.main(
        ["--quick", "--ranks", "4", "--csv", str(path), "--roundtrips", "50", "--proxy"]
        + ["--engine-sleep-us", "0"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "network = shm/tcp inside one host" in out
    with open(path) as f:
        rows = list(csv.DictReader(f))
    by = {(r["case"], r["impl"].strip()): r for r in rows}
    for phase in ("dispatch", "combine"):
        r = by[(f"quick {phase}", "pplx-internode")]
        assert "same as baseline" in r["notes"] and "poster proxy" in r["notes"], r
        assert "sleep_us=0" in r["notes"], r
        assert r["ranks"] == "4" and r["ranks_per_node"] == "2"
        assert float(r["p50_us"]) > 0 and int(r["bytes"]) > 0
        assert (f"quick {phase}", "baseline all_to_all_single") in by
    assert ("quick dispatch", "counts exchange (scatter + wait)") in by
    rt = by[("proxy round trip (8 B write + imm)", "C producer thread")]
    assert float(rt["p50_us"]) > 0
    assert float(by[("fabric write 8 MiB", "TransferEngine")]["gbps_fabric"]) > 0
