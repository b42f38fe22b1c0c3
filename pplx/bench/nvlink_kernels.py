"""Triton kernels of `python -m pplx.bench nvlink` (separate module: on CPU the benchmark
sets TRITON_INTERPRET before importing it)."""

from __future__ import annotations

import triton
import triton.language as tl

from pplx.moe.kernels.sync_kernels import peer_ptr


@triton.jit
def _store_rows(
    src_ptr,  # [R, N, WORDS] int64: row n for destination d at src[d, n]
    table_ptr,  # [R] int64 buffer addresses
    rank,
    N,  # rows per destination
    WORDS,  # 8-byte words per row
    ITEMS_PER_PROG,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
    RR: tl.constexpr,  # item order: True = destinations interleaved
    STAGES: tl.constexpr,
):
    """Program p moves items [p * ITEMS_PER_PROG, ...): item i is (destination, row);
    the row goes to slot [rank, row] of the destination's area (offset 0)."""
    p = tl.program_id(0)
    i0 = p * ITEMS_PER_PROG
    i1 = tl.minimum(i0 + ITEMS_PER_PROG, R * N)
    cols = tl.arange(0, BLOCK)
    for i in tl.range(i0, i1, num_stages=STAGES):
        if RR:
            d = (rank + i) % R
            n = i // R
        else:
            d = (rank + i // N) % R
            n = i % N
        dst = peer_ptr(table_ptr, d, 0, tl.int64) + (rank * N + n).to(tl.int64) * WORDS
        src = src_ptr + (d * N + n).to(tl.int64) * WORDS
        for w0 in range(0, WORDS, BLOCK):
            ok = w0 + cols < WORDS
            v = tl.load(src + w0 + cols, mask=ok)
            tl.store(dst + w0 + cols, v, mask=ok)


@triton.jit
def _sum_rows(
    area_ptr,  # [R, N, H] bf16 (this rank's area)
    out_ptr,  # [N, H] bf16
    table_ptr,  # [R] int64 buffer addresses (VIA_TABLE)
    rank,
    N,
    H,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    VIA_TABLE: tl.constexpr,
):
    """Program (t, s): columns of part s of row t: out[t] = sum_d area[d, t] (f32). With
    VIA_TABLE the area is addressed as the kernels address it, through the address table
    entry of this rank, instead of the local tensor's pointer."""
    if VIA_TABLE:
        area_ptr = peer_ptr(table_ptr, rank, 0, tl.bfloat16)
    t = tl.program_id(0) // SPLIT
    s = tl.program_id(0) % SPLIT
    part = tl.cdiv(tl.cdiv(H, SPLIT), BLOCK) * BLOCK
    h_end = tl.minimum(H, (s + 1) * part)
    for h0 in range(s * part, h_end, BLOCK):
        ho = h0 + tl.arange(0, BLOCK)
        ok = ho < h_end
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for d in tl.static_range(R):
            v = tl.load(area_ptr + (d * N + t) * H + ho, mask=ok, other=0.0, cache_modifier=".cg")
            acc += v.to(tl.float32)
        tl.store(out_ptr + t * H + ho, acc.to(tl.bfloat16), mask=ok)
