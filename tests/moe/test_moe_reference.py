"""The single-process reference against an independent per-token loop, and its invariants.

The loop implementation below is written from the contract text in
`pplx/moe/reference.py` alone (no layout helpers), so that both would have to be wrong in
the same way for these tests to pass.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pplx.moe import layout as L
from pplx.moe import reference as R
from pplx.moe import testing as TT


def slow_dispatch(inputs: list[TT.MoEInputs], num_experts: int, padding: int):
    """Per destination rank: counts, rows (list of (src, t, k)), and the row of each slot."""
    world = len(inputs)
    e_local = num_experts // world
    out = []
    where = {}  # (s, t, k) -> (d, row)
    for d in range(world):
        counts, rows, row = [], [], 0
        for e in range(e_local):
            g = d * e_local + e
            n = 0
            for s, inp in enumerate(inputs):
                m = (
                    inp.indices.shape[0]
                    if inp.bound_m is None
                    else min(inp.bound_m, inp.indices.shape[0])
                )
                for t in range(m):
                    for k in range(inp.indices.shape[1]):
                        if int(inp.indices[t, k]) == g:
                            where[(s, t, k)] = (d, row)
                            rows.append((row, s, t))
                            row += 1
                            n += 1
            counts.append(n)
            while row % padding:  # pad the block
                row += 1
        out.append((counts, rows, row))
    return out, where


def check_against_slow(inputs, num_experts, padding, hidden, *, out_dtype=torch.bfloat16):
    got = R.reference_dispatch(
        [i.x for i in inputs],
        [i.x_scale for i in inputs],
        [i.indices for i in inputs],
        [i.weights for i in inputs],
        num_experts,
        padding,
        [i.bound_m for i in inputs],
    )
    want, where = slow_dispatch(inputs, num_experts, padding)
    for d, (counts, rows, total) in enumerate(want):
        res = got[d]
        assert res.expert_num_tokens.tolist() == counts, f"rank {d}"
        assert int(res.expert_offsets[-1]) == total, f"rank {d}"
        for row, s, t in rows:
            assert torch.equal(
                res.expert_x[row].view(torch.uint8), inputs[s].x[t].view(torch.uint8)
            ), f"rank {d} row {row}"
            if inputs[s].x_scale is not None:
                assert torch.equal(res.expert_x_scale[row], inputs[s].x_scale[t])
    # Row map: every live slot maps to where the loop put it, the rest to -1.
    for s, inp in enumerate(inputs):
        T, K = inp.indices.shape
        for t in range(T):
            for k in range(K):
                d, row = where.get((s, t, k), (-1, -1))
                assert (int(got[s].dst_rank[t, k]), int(got[s].dst_row[t, k])) == (d, row)
    # Combine: out[t] = sum_k w * y[row(t, k)] in f32, k order, starting from the old out
    # only when accumulating.
    g = torch.Generator().manual_seed(7)
    ys = [TT.random_expert_y(max(r.expert_x.shape[0], 1), hidden, out_dtype, g) for r in got]
    olds = [TT.random_expert_y(i.indices.shape[0], hidden, out_dtype, g) for i in inputs]
    for accumulate in (False, True):
        outs = R.reference_combine(
            ys,
            [i.indices for i in inputs],
            [i.weights for i in inputs],
            num_experts,
            padding,
            [i.bound_m for i in inputs],
            out_dtype,
            outs=olds,
            accumulate=accumulate,
        )
        for s, inp in enumerate(inputs):
            T, K = inp.indices.shape
            m = T if inp.bound_m is None else min(T, inp.bound_m)
            want_out = olds[s].clone()
            for t in range(m):
                acc = torch.zeros(hidden, dtype=torch.float32)
                for k in range(K):
                    d, row = where[(s, t, k)]
                    acc = acc + inp.weights[t, k] * ys[d][row].float()
                want_out[t] = (
                    (olds[s][t].float() + acc).to(out_dtype) if accumulate else acc.to(out_dtype)
                )
            # Same f32 operations in the same order: expected bit-equal, so tolerance 0.
            TT.assert_bitwise_equal(outs[s], want_out, f"combine rank {s} acc={accumulate}")


# Named edge cases: (why, world, tokens per rank, hidden, experts, topk, padding, dtype,
# distinct, bound_ms)
CASES = [
    ("zero tokens on every rank", 2, 0, 128, 4, 2, 16, torch.bfloat16, True, None),
    ("one token", 2, 1, 128, 4, 2, 1, torch.bfloat16, True, None),
    ("K == E: every token to every expert", 2, 3, 128, 4, 4, 1, torch.bfloat16, True, None),
    ("3 ranks (not a power of two)", 3, 5, 256, 6, 2, 16, TT.FP8, True, None),
    (
        "hidden 2880 (gpt-oss), fp8 scales with a partial block",
        2,
        3,
        2880,
        4,
        2,
        1,
        TT.FP8,
        True,
        None,
    ),
    ("top-1", 2, 6, 128, 4, 1, 1, torch.bfloat16, True, None),
    ("top-8 with duplicates", 2, 3, 128, 4, 8, 1, torch.bfloat16, False, None),
    ("padding 128", 2, 4, 128, 4, 2, 128, TT.FP8, True, None),
    ("bound_m < T and bound_m = 0", 3, 4, 128, 6, 2, 16, torch.bfloat16, True, [2, 0, 4]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_named_cases(case):
    _, world, tokens, hidden, experts, topk, padding, dtype, distinct, bms = case
    inputs = TT.random_group_inputs(
        1, world, tokens, hidden, experts, topk, dtype, distinct=distinct, bound_ms=bms
    )
    check_against_slow(inputs, experts, padding, hidden)


def test_all_tokens_to_one_expert():
    # Every slot of every rank names expert 3 (with duplicates): one block holds all rows.
    inputs = TT.random_group_inputs(2, 2, 5, 128, 4, 3, torch.bfloat16, distinct=False)
    for i in inputs:
        i.indices.fill_(3)
    check_against_slow(inputs, 4, 16, 128)
    got = R.reference_dispatch(
        [i.x for i in inputs], None, [i.indices for i in inputs], None, 4, 16
    )
    assert got[1].expert_num_tokens.tolist() == [0, 2 * 5 * 3]
    assert got[0].expert_num_tokens.tolist() == [0, 0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=st.integers(1, 4),
    e_local=st.integers(1, 3),
    tokens=st.lists(st.integers(0, 5), min_size=4, max_size=4),
    topk=st.integers(1, 4),
    padding=st.sampled_from([1, 2, 16]),
    fp8=st.booleans(),
    distinct=st.booleans(),
    bound=st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    int32=st.booleans(),
)
def test_reference_random(world, e_local, tokens, topk, padding, fp8, distinct, bound, seed, int32):
    experts = world * e_local
    if distinct:
        topk = min(topk, experts)
    inputs = TT.random_group_inputs(
        seed,
        world,
        tokens[:world],
        128,
        experts,
        topk,
        TT.FP8 if fp8 else torch.bfloat16,
        distinct=distinct,
        index_dtype=torch.int32 if int32 else torch.int64,
        bound_ms=bound[:world],
    )
    check_against_slow(inputs, experts, padding, 128)


def test_layout_invariants():
    # Metadata invariants over a random group: blocks are padded prefix sums of the counts,
    # the row maps of all sources hit every valid row exactly once (a permutation), and
    # rows inside a block are ordered by (source rank, t, k).
    world, experts, padding = 3, 9, 4
    inputs = TT.random_group_inputs(3, world, [7, 4, 6], 128, experts, 4, distinct=False)
    layout, maps = R.reference_layout([i.indices for i in inputs], experts, padding)
    counts = layout.expert_num_tokens
    width = layout.expert_offsets.diff(dim=1)
    assert torch.equal(layout.expert_offsets[:, 0], torch.zeros(world, dtype=torch.int64))
    assert bool(((width % padding) == 0).all()) and bool((width >= counts).all())
    assert bool((width - counts < padding).all())
    assert torch.equal(layout.counts.sum(0).reshape(world, -1), counts)
    for d in range(world):
        rows = torch.cat([m.dst_row[m.dst_rank == d] for m in maps])
        valid = L.valid_row_mask(counts[d], padding, layout.num_rows(d)).nonzero().reshape(-1)
        assert torch.equal(rows.sort().values, valid)
        # recv_rows lists the same rows, in arrival order (source, expert, t, k).
        assert torch.equal(L.recv_rows(layout, d).sort().values, valid)
        keys = {}
        for s, m in enumerate(maps):
            for t in range(m.dst_row.shape[0]):
                for k in range(m.dst_row.shape[1]):
                    if int(m.dst_rank[t, k]) == d:
                        keys[int(m.dst_row[t, k])] = (int(inputs[s].indices[t, k]), s, t, k)
        ordered = [keys[r] for r in sorted(keys)]
        assert ordered == sorted(ordered)


def test_sizes_and_errors():
    assert L.max_recv_tokens(128, 4, 8, 64, 1) == 4 * 128 * 8
    assert L.max_recv_tokens(128, 4, 8, 64, 16) == 4 * 128 * 8 + 64 * 15
    assert L.hidden_dim_scale(7168) == 56 and L.hidden_dim_scale(2880) == 23
    assert L.num_local_experts(256, 4) == 64 and L.num_local_experts(6, 3) == 2
    with pytest.raises(ValueError, match=r"num_experts \(8\).*world size \(3\)"):
        L.num_local_experts(8, 3)
    with pytest.raises(ValueError, match="expert_padding"):
        L.expert_offsets(torch.tensor([1, 2]), 0)
    inputs = TT.random_group_inputs(4, 2, 3, 128, 4, 2)
    inputs[1].indices[2, 1] = 4
    with pytest.raises(ValueError, match=r"indices\[1\]\[2, 1\] = 4 is out of range"):
        R.reference_dispatch([i.x for i in inputs], None, [i.indices for i in inputs], None, 4, 1)


def test_fp8_roundtrip():
    # The fp8 generator: scales map each 128-wide block's absmax to 448, so dequantised
    # values are within e4m3's half-ulp (2^-4 relative) of the input.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, generator=g)
    q, s = TT.quantize_fp8(x)
    assert q.dtype == TT.FP8 and s.shape == (4, 3)
    TT.assert_close(TT.dequantize_fp8(q, s), x, "fp8", atol=1e-3, rtol=2**-4)
