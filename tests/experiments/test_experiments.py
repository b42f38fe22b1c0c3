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


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_writes_outputs(name, tmp_path):
    mod = importlib.import_module(f"experiments.{name}")
    assert mod.__doc__ and "Command:" in mod.__doc__ and "Sources:" in mod.__doc__
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    for rel in CASES[name]:
        path = tmp_path / rel
        assert path.exists() and path.stat().st_size > 0, rel
        if rel.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
        if rel.endswith(".csv"):
            assert len(_rows(str(path))) > 0, rel


def test_decode_error_table_within_target(tmp_path):
    """The per-cell error table the decode experiment writes meets the 20% target."""
    importlib.import_module("experiments.moe_decode").main(["--quick", "--out", str(tmp_path)])
    rows = _rows(os.path.join(tmp_path, "moe_decode", "model_error.csv"))
    assert len(rows) == 16
    for r in rows:
        if not r["anomalous"]:
            assert abs(float(r["error_pct"])) < 20, r


def test_rl_weights_measured_run_is_bit_exact(tmp_path):
    importlib.import_module("experiments.rl_weights").main(["--quick", "--out", str(tmp_path)])
    rows = _rows(os.path.join(tmp_path, "rl_weights", "rl_weights_measured.csv"))
    memcpy = [r for r in rows if r["impl"] == "memcpy"][0]
    assert memcpy["bit_exact"] == "True" and float(memcpy["p50_s"]) > 0
    model = _rows(os.path.join(tmp_path, "rl_weights", "rl_weights_model.csv"))
    # More replicas of the same 128 GPUs -> more bytes per receiving GPU -> never faster.
    for nic in ("cx7", "efa"):
        t = [float(r["time_s"]) for r in model if r["nic"] == nic]
        assert t == sorted(t), t
