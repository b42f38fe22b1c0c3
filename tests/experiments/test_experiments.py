"""Each experiment's quick mode writes its CSV and PNG (into a temporary results root)."""

from __future__ import annotations

import csv
import importlib
import os

import pytest

CASES = {
    "moe_decode": [
        "moe_decode/moe_decode.csv",
        "moe_decode/model_error.csv",
        "moe_decode/moe_decode.png",
    ],
    "moe_prefill": ["moe_prefill/moe_prefill.csv", "moe_prefill/moe_prefill.png"],
    "p2p_bandwidth": ["p2p_bandwidth/p2p_bandwidth.csv", "p2p_bandwidth/p2p_bandwidth.png"],
    "host_proxy": ["host_proxy/host_proxy.csv", "host_proxy/host_proxy.png"],
    "model_questions": [
        "model_questions/model_questions.csv",
        "model_questions/answers.md",
        "model_questions/model_questions.png",
    ],
    "rl_weights": [
        "rl_weights/rl_weights_model.csv",
        "rl_weights/rl_weights_measured.csv",
        "rl_weights/rl_weights.png",
    ],
}


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
    """Every experiment's --quick run, once, into one temporary results root."""
    root = tmp_path_factory.mktemp("results")
    for name in sorted(CASES):
        assert (
            importlib.import_module(f"experiments.{name}").main(["--quick", "--out", str(root)])
            == 0
        )
    return root


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_writes_outputs(name, quick_root):
    mod = importlib.import_module(f"experiments.{name}")
    assert mod.__doc__ and "Command:" in mod.__doc__ and "Sources:" in mod.__doc__
    for rel in CASES[name]:
        path = quick_root / rel
        assert path.exists() and path.stat().st_size > 0, rel
        if rel.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
        if rel.endswith(".csv"):
            assert len(_rows(str(path))) > 0, rel


def test_decode_error_table_within_target(quick_root):
    """The per-cell error table the decode experiment writes meets the 20% target."""
    rows = _rows(os.path.join(quick_root, "moe_decode", "model_error.csv"))
    assert len(rows) == 16
    for r in rows:
        if not r["anomalous"]:
            assert abs(float(r["error_pct"])) < 20, r


def test_rl_weights_measured_run_is_bit_exact(quick_root):
    rows = _rows(os.path.join(quick_root, "rl_weights", "rl_weights_measured.csv"))
    memcpy = [r for r in rows if r["impl"] == "memcpy"][0]
    assert memcpy["bit_exact"] == "True" and float(memcpy["p50_s"]) > 0
    model = _rows(os.path.join(quick_root, "rl_weights", "rl_weights_model.csv"))
    # More replicas of the same 128 GPUs -> more bytes per receiving GPU -> never faster.
    for nic in ("cx7", "efa"):
        t = [float(r["time_s"]) for r in model if r["nic"] == nic]
        assert t == sorted(t), t


def test_measured_moe_rows_are_parsed(tmp_path):
    """Whole-call rows of the decode shape measured on H100s are picked (the defaults of a
    variant run as "triton"), split halves, kernel spans, variants, other shapes and other
    cards not."""
    from experiments.moe_latency import our_measured
    from pplx.bench.common import Row, write_csv
    from pplx.sim import DECODE

    shape = "T128 H7168 K8 E256"
    rows = [
        Row("moe", "decode", "triton:dispatch", 55.0, 50.0, 60.0, ranks=2, shape=shape),
        Row("moe", "decode", "triton:dispatch-send", 20.0, 19.0, 21.0, ranks=2, shape=shape),
        Row("moe", "decode", "baseline:combine", 99.0, 90.0, 110.0, ranks=4, shape=shape),
        Row("moe", "decode", "triton:dispatch", 5e3, 5e3, 5e3, ranks=2, shape="T8 H256 K2 E8"),
        # a later run that timed variants: its defaults replace the older triton row, the
        # variant and the kernel-only span are left out
        Row("moe", "decode", "triton-default:dispatch", 25.0, 24.0, 26.0, ranks=2, shape=shape),
        Row("moe", "decode", "triton-fused:dispatch", 24.0, 23.0, 25.0, ranks=2, shape=shape),
        Row(
            "moe",
            "decode",
            "triton-default:dispatch-kernels",
            20.0,
            20.0,
            20.0,
            ranks=2,
            shape=shape,
        ),  # fmt: skip
    ]
    for r in rows:
        r.device = "NVIDIA H100 80GB HBM3"
    # A later run on another card: not compared with the H100 bar.
    h200 = Row("moe", "decode", "triton:dispatch", 21.0, 20.0, 22.0, ranks=2, shape=shape)
    h200.device = "NVIDIA H200"
    rows.append(h200)
    path = str(tmp_path / "moe.csv")
    write_csv(rows, path)
    got = sorted((r["ep"], r["phase"], r["system"], r["us"]) for r in our_measured(DECODE, path))
    assert got == [(2, "dispatch", "ours_triton", 25.0), (4, "combine", "ours_baseline", 99.0)]
