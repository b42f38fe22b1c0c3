"""The RL weight-transfer schedule (pplx.apps.weights): coverage, bit-exact replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pplx.apps import weights as W


@pytest.fixture(scope="module")
def small():
    params = W.tiny_params(num_layers=3, num_experts=6, hidden=200, inter=72)  # 200: not /128
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(p.rows, p.cols, generator=g).to(torch.bfloat16) * 3 for p in params]
    return params, ws


@pytest.mark.parametrize("num_src,replicas,per_replica", [(4, 2, 2), (3, 1, 3), (5, 3, 1)])
def test_writes_tile_every_destination_exactly_once(small, num_src, replicas, per_replica):
    params, _ = small
    s = W.plan(params, num_src, replicas, per_replica)
    for d in range(s.num_dst):
        sel = s.dst == d
        spans = sorted(zip(s.dst_offset[sel].tolist(), s.nbytes[sel].tolist()))
        pos = 0
        for off, n in spans:
            assert off == pos, (d, off, pos)
            pos += n
        assert pos == s.dst_bytes[d]
    # Every replica receives every param's bytes once.
    total = sum(p.fp8_bytes for p in params)
    assert int(s.nbytes.sum()) == total * replicas
    # Source reads stay inside the owner's staging buffer.
    assert (s.src_offset + s.nbytes <= s.src_bytes[s.src]).all()


@pytest.mark.parametrize("engine", ["memcpy", "shm"])
def test_replay_is_bit_exact(small, engine):
    params, ws = small
    s = W.plan(params, 4, 2, 3)
    src = W.stage_sources(s, ws)
    if engine == "memcpy":
        dst, _ = W.execute_memcpy(s, src)
    else:
        dst, _ = W.execute_transfer_engine(s, src, "shm", timeout_s=60)
    exp = W.expected_destination(s, ws)
    for d, (a, b) in enumerate(zip(dst, exp)):
        bad = np.flatnonzero(a != b)
        assert bad.size == 0, f"dst {d}: {bad.size} bytes differ, first at {bad[:1]}"
    # Dequantized weights are close to the bf16 originals (fp8 e4m3: 3 mantissa bits,
    # relative error <= 2**-4 of the block max).
    q, sc = W.quantize_fp8_blocks(ws[0])
    deq = q.float() * sc.repeat_interleave(128, dim=1)[:, : ws[0].shape[1]]
    err = (deq - ws[0].float()).abs().max() / ws[0].float().abs().max()
    assert err <= 2**-4, err


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_src"):
        W.plan(W.tiny_params(), 0, 1, 1)
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        W.plan(W.tiny_params(num_experts=4), 2, 1, 8)


def test_kimi_k2_shapes_add_up_to_about_a_trillion_parameters():
    params = W.kimi_k2_params()
    total = sum(p.rows * p.cols for p in params)
    assert 1.0e12 < total < 1.06e12
