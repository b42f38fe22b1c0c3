"""`python -m pplx.bench nvlink` runs on CPU (gloo, /dev/shm buffers, Triton interpreter):
the stores land bit-exact in every rank's area (checked inside the benchmark before any
timing), the read case's sums match torch, and the rows follow the shared CSV schema."""

from __future__ import annotations

import csv

import pytest

from pplx.bench import nvlink


def test_bench_nvlink_quick_cpu(tmp_path) -> None:
    path = tmp_path / "nvlink.csv"
    argv = ["--ranks", "2", "--cpu", "--splits", "1,2", "--store", "4,1,blk", "--csv", str(path)]
    assert nvlink.main(argv) == 0
    with path.open() as f:
        rows = list(csv.DictReader(f))
    got = {(r["case"], r["impl"]) for r in rows}
    assert ("store", "sm-w4-p4-blk") in got, sorted(got)
    for split in ("", "-split2"):
        for name in ("after-local-write", "after-peer-write", "after-peer-write-nosleep",
                     "after-peer-write-nosleep-table", "again"):  # fmt: skip
            assert ("read", name + split) in got, sorted(got)
    for r in rows:
        assert r["bench"] == "nvlink" and r["ranks"] == "2" and float(r["p50_us"]) > 0, r
        assert int(r["bytes"]) > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--row-bytes", "100"], "--row-bytes must be a positive multiple of 16"),
        (["--store", "4,1,zigzag"], "want WARPS,PROGS_PER_SM,rr|blk"),
        (["--store", "3,1,rr"], "bad store spec"),
        (["--rows", "0"], "--rows must be >= 1"),
    ],
)
def test_bench_nvlink_bad_arguments_are_named(argv, words, capsys) -> None:
    with pytest.raises(SystemExit):
        nvlink.parse_args(["--cpu", *argv])
    assert words in capsys.readouterr().err
