"""`internode._words`: rows of bytes seen as the widest common integer type, so that the
host path's `index_copy_` moves words, not bytes, and still moves exactly those bytes."""

from __future__ import annotations

import pytest
import torch

from pplx.moe.internode import _words


@pytest.mark.parametrize(
    ("rec_bytes", "x_bytes", "word"),
    [
        (7392, 7168, torch.int64),  # decode fp8: 7168 B row + 56 f32 scales
        (2972, 2880, torch.int32),  # fp8 hidden 2880: 23 scales (92 B) break 8-byte words
        (262, 256, torch.int16),  # 256 B row + 6 B: only 2-byte words fit
        (259, 256, torch.uint8),  # odd record: bytes
    ],
)
def test_words_scatter_moves_exactly_the_bytes(rec_bytes, x_bytes, word):
    g = torch.Generator().manual_seed(rec_bytes)
    n, rows = 37, 80
    recs = torch.randint(0, 256, (n, rec_bytes), dtype=torch.uint8, generator=g)
    dst_rows = torch.randperm(rows, generator=g)[:n]
    expect = torch.full((rows, rec_bytes), 0x7F, dtype=torch.uint8)  # poison
    got = expect.clone()
    for lo, hi in ((0, x_bytes), (x_bytes, rec_bytes)):  # x part, scale part (strided)
        expect[dst_rows, lo:hi] = recs[:, lo:hi]
        dst, src = _words(got[:, lo:hi], recs[:, lo:hi])
        assert dst.dtype == src.dtype
        assert (dst.dtype == word) or (lo > 0 and dst.dtype.itemsize <= word.itemsize)
        dst.index_copy_(0, dst_rows, src)
    assert torch.equal(got, expect)
    assert torch.equal(expect[dst_rows], recs)  # and the poison is gone only there
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[dst_rows] = False
    assert bool((got[untouched] == 0x7F).all())
