"""`python -m pplx.bench fabric --quick` on shm: both implementations run, rows and table right.

Checks the structure of the CSV and the printed table, never the timings (a shared 2-core CI
machine gives any number). The pplx side also checks every byte it moved (bit-exact).
"""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch

from pplx.bench import fabric
from pplx.bench.common import FIELDS


def test_quick_shm_csv_table_png(tmp_path, capsys):
    csv_path, png_path = tmp_path / "fabric.csv", tmp_path / "fabric.png"
    rc = fabric.main(
        ["--provider=shm", "--quick", f"--csv={csv_path}", f"--png={png_path}", "--no-progress"]
    )
    assert rc == 0
    out = capsys.readouterr().out

    q = fabric.FabricBenchConfig(**fabric.QUICK)
    cases = [("lat", 8)] + [("bw", s) for s in q.sizes] + [("paged", p) for p in q.page_sizes]
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        rows = list(reader)
    # raw then pplx, per case, in sweep order; after the latency pair (pplx = the engine's
    # C loop) the Python-API latency row, pplx only.
    want = [(k, str(b), impl) for k, b in cases for impl in ("raw", "pplx")]
    want.insert(2, ("lat_py", "8", "pplx"))
    assert [(r["case"], r["bytes"], r["impl"]) for r in rows] == want
    for r in rows:
        assert (r["bench"], r["provider"], r["ranks"]) == ("fabric", "shm", "2")
        p20, p50, p80 = (float(r[k]) for k in ("p20_us", "p50_us", "p80_us"))
        assert 0 < p20 <= p50 <= p80, r
        if r["case"] not in ("lat", "lat_py"):
            assert float(r["gbps_fabric"]) > 0, r
    assert "no Python" in rows[1]["notes"] and "Python API" in rows[2]["notes"]
    pairs = [(rows[0], rows[1]), (rows[0], rows[2])] + list(zip(rows[3::2], rows[4::2]))
    for raw, pplx in pairs:
        assert raw["baseline"] == "" and pplx["baseline"] == "raw"
        # ratio = raw p50 / pplx p50 (per write for bw rows: both divide by the same count).
        ratio = float(raw["p50_us"]) / float(pplx["p50_us"])
        assert math.isclose(float(pplx["ratio"]), ratio, rel_tol=1e-2), (raw, pplx)
        if raw["case"] == "bw":
            g = float(pplx["gbps_fabric"]) / float(raw["gbps_fabric"])
            assert math.isclose(g, ratio, rel_tol=1e-2)
            # Same footprint on both sides, named in the notes.
            slots = q.bw_slots(int(raw["bytes"]))
            assert f"{slots} slots" in raw["notes"] and f"{slots} slots" in pplx["notes"]

    # The table is printed last with both implementations; one target line per 1 MiB+ size
    # and one for latency, each PASS or MISS.
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["case", "impl"])
    body = lines[header + 2 : header + 2 + len(want)]
    assert [tuple(line.split()[:2]) for line in body] == [(k, impl) for k, _, impl in want]
    targets = [line for line in lines if line.startswith(("PASS", "MISS"))]
    assert len(targets) == 1 + sum(s >= fabric.TARGET_BW_FROM for s in q.sizes), out
    assert any("8B latency pplx engine/raw" in t for t in targets)

    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_check_arrived_catches_a_wrong_byte():
    g = torch.Generator().manual_seed(7)
    orig = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    buf = torch.full((4096,), 0x7F, dtype=torch.uint8)  # poisoned: unwritten bytes show
    src, dst = [1024, 0], [0, 2048]
    for s, d in zip(src, dst):
        buf[d : d + 512] = orig[s : s + 512]
    fabric._check_arrived(buf, orig, src, dst, 512, "ok")
    # Source bytes below LAT_BYTES are the acks' and are not compared.
    buf[2048] ^= 1
    fabric._check_arrived(buf, orig, src, dst, 512, "ack bytes")
    buf[2048 + 100] ^= 1
    with pytest.raises(
        RuntimeError, match=r"1 of 1016 bytes differ; first at receiver offset 2148"
    ):
        fabric._check_arrived(buf, orig, src, dst, 512, "bad")


def test_targets_and_ratio_direction():
    # Synthetic measurements: pplx half the raw bandwidth at 1 MiB, 1.1x the raw latency.
    # The Python-API latency (lat_py) is 5x raw but carries no target.
    raw = [
        fabric.Measurement("lat", 8, 1, [1.0, 1.0, 1.0]),
        fabric.Measurement("bw", 1 << 20, 4, [400.0, 400.0]),
        fabric.Measurement("bw", 4096, 4, [10.0]),
    ]
    pplx = [
        fabric.Measurement("lat", 8, 1, [1.1, 1.1]),
        fabric.Measurement("lat_py", 8, 1, [5.0]),
        fabric.Measurement("bw", 1 << 20, 4, [800.0]),
        fabric.Measurement("bw", 4096, 4, [100.0]),
    ]
    checks = {c.name: c for c in fabric.check_targets(raw, pplx)}
    lat = "8B latency pplx engine/raw"
    assert set(checks) == {lat, "bw 1MiB pplx/raw"}  # no target below 1 MiB, none for lat_py
    assert checks[lat].ok and math.isclose(checks[lat].value, 1.1)
    assert not checks["bw 1MiB pplx/raw"].ok and math.isclose(checks["bw 1MiB pplx/raw"].value, 0.5)
    rows = fabric.to_rows(fabric.FabricBenchConfig(), raw, pplx)
    bw = [r for r in rows if r.case == "bw" and r.bytes == 1 << 20]
    assert [r.impl for r in bw] == ["raw", "pplx"]
    assert math.isclose(bw[0].p50_us, 100.0) and math.isclose(bw[1].p50_us, 200.0)  # per write
    assert math.isclose(bw[0].gbps_fabric, (1 << 20) / 100.0 / 1e3)
    assert math.isclose(bw[1].ratio, 0.5)
    lat_py = [r for r in rows if r.case == "lat_py"]
    assert [r.impl for r in lat_py] == ["pplx"] and math.isclose(lat_py[0].ratio, 0.2)
    # The engine's C streaming row (bw_c) compares with raw bw, stands alone, has no target.
    bw_c = fabric.Measurement("bw_c", 1 << 20, 4, [500.0])
    rows = fabric.to_rows(fabric.FabricBenchConfig(), raw, pplx + [bw_c])
    assert [(r.case, r.impl) for r in rows[-1:]] == [("bw_c", "pplx")]
    assert math.isclose(rows[-1].ratio, 0.8) and math.isclose(rows[-1].p50_us, 125.0)
    assert len(fabric.check_targets(raw, pplx + [bw_c])) == 2


def test_rows_refuse_unequal_footprints():
    # A baseline over a smaller buffer (data kept in cache) is not comparable.
    raw = [fabric.Measurement("bw", 1 << 20, 4, [400.0], 16, slots=1, buf_bytes=1 << 20)]
    pplx = [fabric.Measurement("bw", 1 << 20, 4, [400.0], 16, slots=16, buf_bytes=16 << 20)]
    with pytest.raises(ValueError, match="same memory footprint"):
        fabric.to_rows(fabric.FabricBenchConfig(), raw, pplx)
    ok = [dataclasses.replace(raw[0], slots=16, buf_bytes=16 << 20)]
    assert [r.impl for r in fabric.to_rows(fabric.FabricBenchConfig(), ok, pplx)] == [
        "raw",
        "pplx",
    ]


def test_merge_rounds_pools_samples_per_case():
    a = [fabric.Measurement("lat", 8, 1, [1.0, 2.0]), fabric.Measurement("bw", 4096, 4, [9.0])]
    b = [fabric.Measurement("lat", 8, 1, [3.0]), fabric.Measurement("bw", 4096, 4, [7.0, 8.0])]
    merged = fabric.merge_rounds(fabric.merge_rounds([], a), b)
    assert [(m.key, m.samples_us) for m in merged] == [
        (("lat", 8), [1.0, 2.0, 3.0]),
        (("bw", 4096), [9.0, 7.0, 8.0]),
    ]
    assert a[0].samples_us == [1.0, 2.0]  # inputs untouched
    with pytest.raises(ValueError, match="does not match"):
        fabric.merge_rounds(a, [fabric.Measurement("bw", 4096, 8, [1.0])])


def test_engine_bw_rows(tmp_path):
    # --engine-bw adds, per size, the engine's C streaming loop beside the Python loop; the
    # receiver's bit-exact check runs after both.
    csv_path = tmp_path / "fabric.csv"
    argv = ["--provider=shm", "--quick", "--engine-bw", "--tests=bw", "--sizes=4K,64K"]
    assert fabric.main([*argv, f"--csv={csv_path}", "--no-png", "--no-progress"]) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    want = [(c, b, i) for b in ("4096", "65536") for c, i in (("bw", "raw"), ("bw", "pplx"))]
    want.insert(2, ("bw_c", "4096", "pplx"))
    want.append(("bw_c", "65536", "pplx"))
    assert [(r["case"], r["bytes"], r["impl"]) for r in rows] == want
    for r in rows:
        assert float(r["gbps_fabric"]) > 0 and r["notes"], r


def _topo(packages: int, cores: int, threads: int) -> dict[int, fabric.CpuTopo]:
    """Linux numbering: CPU c is core c % (packages*cores); its SMT sibling c + that count;
    one L3 per package."""
    n = packages * cores
    return {
        c: fabric.CpuTopo(package=(c % n) // cores, core=c % cores, l3=str((c % n) // cores))
        for c in range(n * threads)
    }


def test_pin_plan_same_l3_distinct_cores():
    # 2 sockets x 16 cores x 2 threads (a 64-vCPU host): cpus 0-1 left out, four physical
    # cores of socket 0, no SMT siblings shared.
    assert fabric.pin_plan(range(64), _topo(2, 16, 2)) == ((2, 3), (4, 5))
    # Socket 0 allowed only partly (cpus 13-15 + the others on socket 1): the plan moves to
    # the L3 that has four eligible cores.
    cpus = [0, 1, 13, 14, 15] + list(range(16, 32))
    assert fabric.pin_plan(cpus, _topo(2, 16, 1)) == ((16, 17), (18, 19))
    # Siblings of one core count once: 3 physical cores are too few for 2 ranks x 2 cores.
    assert fabric.pin_plan([0, 1, 2, 6, 7, 8], _topo(1, 6, 2)) is None  # cores 0-2 only
    # <= 4 CPUs (the CI VM): no pinning at all.
    assert fabric.pin_plan([0, 1], _topo(1, 2, 1)) is None
    assert fabric.pin_plan(range(4), _topo(1, 4, 1)) is None


def test_pin_parse_note_and_config():
    assert fabric.parse_pin("none") is None
    assert fabric.parse_pin("2,3:4,5") == ((2, 3), (4, 5))
    assert fabric.pin_note(((2, 3), (4, 5))) == "pin r0=2,3 r1=4,5"
    assert fabric.pin_note(None) == ""
    for bad in ("2,3", "a:b", ":4"):
        with pytest.raises(ValueError, match="--pin"):
            fabric.parse_pin(bad)
    with pytest.raises(ValueError, match="pin must be"):
        fabric.FabricBenchConfig(pin=((1,), ()))
    # Rows name the placement in their notes.
    cfg = fabric.FabricBenchConfig(pin=((0,), (1,)))
    rows = fabric.to_rows(cfg, [], [fabric.Measurement("lat", 8, 1, [1.0])])
    assert rows[0].notes.endswith("pin r0=0 r1=1")
