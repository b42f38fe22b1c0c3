"""`python -m pplx.bench moe` runs on CPU (gloo, torch backend, Triton interpreter) and
writes the shared CSV schema with one row per implementation and phase; `--sync v1,v2`
times both Triton signalling protocols side by side."""

from __future__ import annotations

import csv
import os

import pytest
import torch

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


class _DropsRows:
    """A backend that drops its last received row: the benchmark's check must catch it."""

    def __init__(self, at) -> None:
        self.at = at
        self.max_num_tokens = at.max_num_tokens
        self.max_recv_tokens = at.max_recv_tokens

    def dispatch(self, ent, ex, *args, **kw) -> None:
        self.at.dispatch(ent, ex, *args, **kw)
        if kw.get("do_recv", True):
            n = int(ent.sum())
            ex[n - 1].view(torch.uint8).add_(1)

    def combine(self, *args, **kw) -> None:
        self.at.combine(*args, **kw)


def _check_worker(rank: int, world_size: int) -> tuple[bool, bool]:
    # The interpreter must be chosen before any kernel module is imported in this process.
    os.environ["TRITON_INTERPRET"] = "1"
    from pplx.bench.moe import FP8, Shape, _check_against_reference
    from pplx.moe import layout as L
    from pplx.moe.kernels import TritonAllToAll

    shape = Shape("tiny", 4, 64, 2, 4)
    at = TritonAllToAll(
        max_num_tokens=4,
        num_experts=4,
        expert_padding=1,
        hidden_dim=64,
        hidden_dim_scale=L.hidden_dim_scale(64),
        in_dtype=FP8,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32,
        num_experts_per_token=2,
        device="cpu",
    )
    cpu = torch.device("cpu")
    good = _check_against_reference(at, shape, rank, world_size, cpu, None, "good")
    # Only rank 1 corrupts: both ranks must still agree that the variant is wrong.
    impl = _DropsRows(at) if rank == 1 else at
    bad = _check_against_reference(impl, shape, rank, world_size, cpu, None, "bad")
    at.destroy()
    return good, bad


def test_bench_moe_times_nothing_that_fails_the_reference_check() -> None:
    from pplx.moe import testing as mt

    assert mt.spawn(_check_worker, 2, timeout_s=240.0) == [(True, False), (True, False)]
