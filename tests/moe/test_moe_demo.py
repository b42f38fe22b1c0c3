"""`python -m pplx.moe.demo`: the MoE layer over processes matches the dense layer."""

from __future__ import annotations

import pytest

from pplx.moe import demo


def test_demo_small_fp8_three_ranks(capsys):
    # 3 ranks (not a power of two), fp8 dispatch, padded blocks: the full demo path.
    cfg = demo.parse_args(
        [
            "--ranks",
            "3",
            "--experts",
            "6",
            "--tokens",
            "16",
            "--hidden",
            "256",
            "--ffn",
            "64",
            "--iters",
            "2",
            "--fp8",
            "--padding",
            "16",
        ]
    )
    results = demo.run(cfg, timeout_s=240)
    assert results[0]["num_elems"] == 3 * 16 * 256
    assert demo.report(cfg, results)
    out = capsys.readouterr().out
    assert "PASS" in out and "dispatch send" in out and "combine recv" in out
    # Every rank sends some rows away (16 tokens x top-4 over 3 ranks).
    assert all(r["bytes_dispatch"] > 0 for r in results)


def test_demo_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--ranks", "3", "--experts", "8"])
    assert "--experts (8) must be divisible by --ranks (3)" in capsys.readouterr().err
