"""`python -m pplx.bench moe` runs on CPU (gloo, torch backend, Triton interpreter) and
writes the shared CSV schema with one row per implementation and phase; `--sync v1,v2`
times both Triton signalling protocols side by side."""

from __future__ import annotations

import csv

import pytest

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
        "--sync",
        "v1,v2",
    ]
    assert moe.main(argv) == 0
    with path.open() as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows}
    for phase in ("dispatch", "combine"):
        for impl in ("triton-v1", "triton-v2", "baseline", "payload", "torch"):
            assert f"{impl}:{phase}" in impls, sorted(impls)
    for sync in ("v1", "v2"):
        assert {
            f"triton-{sync}:dispatch-send",
            f"triton-{sync}:dispatch-recv",
            f"triton-{sync}:combine-send",
            f"triton-{sync}:combine-recv",
        } <= impls
    for r in rows:
        assert r["bench"] == "moe" and r["ranks"] == "2" and float(r["p50_us"]) > 0, r


def test_bench_moe_variants_keep_the_defaults_beside_them() -> None:
    from pplx.bench.moe import parse_args

    a = parse_args(["--cpu", "--variant", "fused:PPLX_MOE_FUSED=1"])
    assert a.variant == [("default", {}), ("fused", {"PPLX_MOE_FUSED": "1"})]
    # A variant with no settings names the defaults itself: not timed twice.
    a = parse_args(["--cpu", "--variant", "base:", "--variant", "bh:PPLX_MOE_COMB_BH=1024"])
    assert a.variant == [("base", {}), ("bh", {"PPLX_MOE_COMB_BH": "1024"})]


def test_bench_moe_variant_with_a_bad_value_is_refused_at_parse_time() -> None:
    from pplx.bench.moe import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--cpu", "--variant", "bad:PPLX_MOE_FUSED=yes"])
    # --sync is a variant per protocol.
    a = parse_args(["--cpu", "--sync", "v1,v2"])
    assert a.variant == [("v1", {"PPLX_MOE_SYNC": "v1"}), ("v2", {"PPLX_MOE_SYNC": "v2"})]
