"""Triton kernels of MoE combine inside one node (NVLink on CUDA, /dev/shm on CPU).

# T tokens per rank (T_MAX = max_num_tokens), K top-k, H hidden, R ranks,
# CB received tokens per combine-send program, TB tokens per combine-recv program.

Layout: dispatch sent each token once per destination rank; combine sends back ONE row
per (token, rank): the expert side sums `w[t, k] * expert_y[row(t, k)]` over the slots it
holds (f32, k order) and stores that partial, cast to the output dtype, into the source's
buffer. The source adds the partials of its ranks in rank order (f32) and casts. At EP4
with K=8 of 256 experts that is 3.6 rows per token instead of 8 (2.2x fewer bytes).

Arithmetic versus the contract (`sum over k in k order, f32`): the sum is regrouped by
rank and each partial is rounded once to the output dtype, so the result differs from the
reference by at most about 2 ulp of the output dtype times sum_k |w_k y_k| (tests bound it).

Both halves may split the hidden dim, one program per part: the send side into HS parts
of HCHUNK columns (a hook; measured slower), the receive side into HSR parts of RCHUNK
columns (HSR = HS, or more with an unsplit send side: two at EP4 decode).

1. send programs (s, cc, hs), R * CC * HS of them: for source s and a block of its tokens,
   the weighted partial over local slots (slot rows and weights loaded as one [CB, K] tile
   before the ack wait, columns taken from registers); stores into s's buffer; signals s.
   Waits first for s's ack of the previous combine (buffer reuse).
2. receive programs (b, hr), NB * HSR of them: wait for the send programs that wrote this
   program's rows (v2; v1: for every rank), add partials, write `out_tokens` rows t <
   bound_m (optionally accumulating); the last program acks. With its part in one tile
   (ONE_TILE) a program has read all it needs of the combine area before it stores, so it
   counts itself done first and the last one's ack does not wait behind the stores.
`_combine_kernel` runs the send programs, the receive programs, or both in one grid.

Warning: the weights are those given to dispatch (they travel with the tokens); combine's
own `weights` argument must be the same tensor values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pplx.moe.kernels.sync_kernels import (
    acker_program,
    column,
    last_program_done,
    peer_ptr,
    recv_program_done,
    send_owed_acks,
    signal_add,
    signal_set,
    stamp,
    wait_all_ge,
    wait_ge,
    wait_one_ge,
)


@triton.jit
def _combine_send(
    s,  # source rank (where the tokens came from)
    cc,  # block of CB tokens received from s
    hs,  # part of the hidden dim: [hs * HCHUNK, (hs + 1) * HCHUNK)
    prof_ptr,  # [8] int64 time stamps of this program (PROF only)
    expert_y_ptr,  # [rows, H] out dtype
    stride_yr,
    comb_row_ptr,  # [R, T_MAX, K] int32: row of expert_y per received slot, -1 if none
    comb_w_ptr,  # [R, T_MAX, K] float32
    table_ptr,
    state_ptr,  # [16] int32: [7] combine send epoch, [8] its done counter, [4] error flag
    rank,
    off_comb_ack,
    off_comb_flag,
    off_comb_rows,
    T_MAX,
    H,
    COMB_STRIDE,  # row stride of the combine area, elements
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    R: tl.constexpr,
    CB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    CC: tl.constexpr,
    HS: tl.constexpr,
    HCHUNK,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
):
    """Send program (s, cc, hs): the partials of token slots cc * CB + [0, CB) of source s,
    columns of part hs of the hidden dim."""
    stamp(prof_ptr, 0, PROF)
    # The send side's own epoch (state[7]; see _dispatch_send).
    epoch = tl.load(state_ptr + 7)
    # The slots' rows and weights, one [CB, K] tile each, loaded before the ack wait (they
    # are this rank's, written by its dispatch; the ack guards only s's buffer).
    j = cc * CB + tl.arange(0, CB)  # [CB] token slots of source s
    kk = tl.arange(0, K_PAD)
    rec = (s * T_MAX + j)[:, None] * K + kk[None, :]  # [CB, K_PAD]
    rec_ok = (j < T_MAX)[:, None] & (kk[None, :] < K)
    rows = tl.load(comb_row_ptr + rec, mask=rec_ok, other=-1)
    wts = tl.load(comb_w_ptr + rec, mask=rec_ok, other=0.0)
    # Slots that hold a token of s (dispatch wrote -1 into every k of the others).
    j_ok = tl.max(rows, axis=1) >= 0
    ack = peer_ptr(table_ptr, rank, off_comb_ack, tl.int32) + s
    if SYNC2:
        wait_one_ge(ack, epoch, state_ptr + 4, MAX_SPIN, ASM)
    else:
        wait_ge(ack, epoch, state_ptr + 4, MAX_SPIN)
    stamp(prof_ptr, 1, PROF)
    dst = (
        peer_ptr(table_ptr, s, off_comb_rows, OUT_DTYPE) + (rank * T_MAX + j)[:, None] * COMB_STRIDE
    )
    h_end = tl.minimum(H, (hs + 1) * HCHUNK)
    for h0 in range(hs * HCHUNK, h_end, BLOCK_H):
        ho = h0 + tl.arange(0, BLOCK_H)
        h_ok = ho < h_end
        acc = tl.zeros([CB, BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(K):
            # Slot k's row and weight out of the tiles in registers (no memory round trip
            # between this tile's store and the next tile's loads).
            r_k = column(rows, kk, k)  # [CB]
            w_k = column(wts, kk, k)  # [CB]
            y = tl.load(
                expert_y_ptr + r_k[:, None] * stride_yr + ho[None, :],
                mask=(r_k >= 0)[:, None] & h_ok[None, :],
                other=0.0,
            )
            acc += w_k[:, None] * y.to(tl.float32)
        tl.store(dst + ho[None, :], acc.to(OUT_DTYPE), mask=j_ok[:, None] & h_ok[None, :])
    stamp(prof_ptr, 2, PROF)
    if SYNC2:
        # v2: slot (rank, cc, hs) of s's [R, CC, HS] flags, value epoch + 1.
        flag = peer_ptr(table_ptr, s, off_comb_flag, tl.int32) + (rank * CC + cc) * HS + hs
        signal_set(flag, epoch + 1)
    else:
        signal_add(peer_ptr(table_ptr, s, off_comb_flag, tl.int32) + rank)
    stamp(prof_ptr, 3, PROF)
    if last_program_done(state_ptr + 8, R * CC * HS):
        tl.store(state_ptr + 7, epoch + 1)


@triton.jit
def _combine_recv(
    b,  # block of TB tokens of this rank
    hr,  # part of the hidden dim: [hr * RCHUNK, (hr + 1) * RCHUNK)
    prof_ptr,  # [8] int64 time stamps of this program (PROF only)
    out_ptr,  # [T, H] out dtype
    stride_ot,
    send_pos_ptr,  # [T_MAX, R] int32: t where token t reached rank d (its slot), else -1
    bound_m_ptr,
    num_tokens,
    table_ptr,
    state_ptr,  # [16] int32: [1] combine (receive) epoch, [3] done counter, [4] error flag
    rank,
    off_comb_ack,
    off_comb_flag,
    off_comb_rows,
    T_MAX,
    H,
    COMB_STRIDE,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    CC: tl.constexpr,
    TB: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    CB: tl.constexpr,
    HS: tl.constexpr,
    HSR: tl.constexpr,
    RCHUNK,
    ONE_TILE: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    ACKER: tl.constexpr,
):
    """Receive program (b, hr): tokens b * TB + [0, TB) of this rank, columns of part hr
    of the hidden dim (HSR parts; the send side has HS = 1 or HSR parts)."""
    stamp(prof_ptr, 0, PROF)
    epoch = tl.load(state_ptr + 1)
    flags = peer_ptr(table_ptr, rank, off_comb_flag, tl.int32)
    if not SYNC2:
        for r in range(R):
            wait_ge(flags + r, (epoch + 1) * CC * HS, state_ptr + 4, MAX_SPIN)
    m = tl.minimum(tl.load(bound_m_ptr), num_tokens)
    t = b * TB + tl.arange(0, TB)  # [TB]
    t_ok = t < m
    rr = tl.arange(0, R_PAD)
    pos = tl.load(
        send_pos_ptr + t[:, None] * R + rr[None, :],
        mask=t_ok[:, None] & (rr[None, :] < R),
        other=-1,
    )  # [TB, R]
    if SYNC2:
        # Only the send programs that hold this program's columns: rank d's program
        # (pos // CB, hs) wrote them in row pos of d's part of the combine area (one
        # vector poll); hs = hr when the send side is split the same way, else 0.
        need = pos >= 0
        hs = hr if HS > 1 else 0
        fofs = (rr[None, :] * CC + tl.where(need, pos, 0) // CB) * HS + hs
        wait_all_ge(flags, fofs, need, epoch + 1, state_ptr + 4, MAX_SPIN, ASM)
    stamp(prof_ptr, 1, PROF)
    area = peer_ptr(table_ptr, rank, off_comb_rows, OUT_DTYPE)
    h_end = tl.minimum(H, (hr + 1) * RCHUNK)
    if ONE_TILE:
        # This program's part of the row in one tile: its reads of the combine area all
        # come before its store, so it counts itself done (the last one acks the sources)
        # before storing, and the ack's release does not wait behind the store.
        ho = hr * RCHUNK + tl.arange(0, BLOCK_H)
        h_ok = ho < h_end
        acc = _partials_sum(
            area, send_pos_ptr, t, t_ok, ho, h_ok, T_MAX, COMB_STRIDE, R, TB, BLOCK_H
        )
        recv_program_done(
            state_ptr + 3, NB * HSR, state_ptr + 1, epoch, table_ptr, off_comb_ack, rank, R,
            R_PAD, SYNC2, ACKER,
        )  # fmt: skip
        _store_out(out_ptr, stride_ot, t, t_ok, ho, h_ok, acc, ACCUMULATE, OUT_DTYPE)
        stamp(prof_ptr, 2, PROF)
    else:
        for h0 in range(hr * RCHUNK, h_end, BLOCK_H):
            ho = h0 + tl.arange(0, BLOCK_H)
            h_ok = ho < h_end
            acc = _partials_sum(
                area, send_pos_ptr, t, t_ok, ho, h_ok, T_MAX, COMB_STRIDE, R, TB, BLOCK_H
            )
            _store_out(out_ptr, stride_ot, t, t_ok, ho, h_ok, acc, ACCUMULATE, OUT_DTYPE)
        stamp(prof_ptr, 2, PROF)
        recv_program_done(
            state_ptr + 3, NB * HSR, state_ptr + 1, epoch, table_ptr, off_comb_ack, rank, R,
            R_PAD, SYNC2, ACKER,
        )  # fmt: skip
    stamp(prof_ptr, 3, PROF)


@triton.jit
def _store_out(out_ptr, stride_ot, t, t_ok, ho, h_ok, acc, ACCUMULATE: tl.constexpr,
               OUT_DTYPE: tl.constexpr):  # fmt: skip
    """out_tokens[t, ho] = acc (plus the old value with ACCUMULATE), cast to OUT_DTYPE."""
    o_ptr = out_ptr + t[:, None] * stride_ot + ho[None, :]
    ok = t_ok[:, None] & h_ok[None, :]
    if ACCUMULATE:
        acc = tl.load(o_ptr, mask=ok, other=0.0).to(tl.float32) + acc
    tl.store(o_ptr, acc.to(OUT_DTYPE), mask=ok)


@triton.jit
def _partials_sum(area, send_pos_ptr, t, t_ok, ho, h_ok, T_MAX, COMB_STRIDE, R: tl.constexpr,
                  TB: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """`[TB, BLOCK_H]` f32: the partials of tokens t from every rank, columns ho, added in
    rank order."""
    acc = tl.zeros([TB, BLOCK_H], dtype=tl.float32)
    for d in tl.static_range(R):
        p_r = tl.load(send_pos_ptr + t * R + d, mask=t_ok, other=-1)  # [TB], no reduction
        v = tl.load(
            area + (d * T_MAX + p_r)[:, None] * COMB_STRIDE + ho[None, :],
            mask=(p_r >= 0)[:, None] & h_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        acc += v.to(tl.float32)
    return acc


@triton.jit
def _combine_kernel(
    # send side
    expert_y_ptr,
    stride_yr,
    comb_row_ptr,
    comb_w_ptr,
    # receive side
    out_ptr,
    stride_ot,
    send_pos_ptr,
    bound_m_ptr,
    num_tokens,
    # both
    prof_ptr,  # [R * CC * HS + NB * HSR, 8] int64 time stamps per program (PROF only)
    table_ptr,
    state_ptr,
    rank,
    off_comb_ack,
    off_comb_flag,
    off_comb_rows,
    off_disp_ack,
    T_MAX,
    H,
    COMB_STRIDE,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    CB: tl.constexpr,
    CC: tl.constexpr,
    TB: tl.constexpr,
    NB: tl.constexpr,
    HS: tl.constexpr,
    HCHUNK,
    HSR: tl.constexpr,
    RCHUNK,
    ONE_TILE: tl.constexpr,
    BLOCK_H_SEND: tl.constexpr,
    BLOCK_H_RECV: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    ACKER: tl.constexpr,
    ACK_NEXT: tl.constexpr,
    DO_SEND: tl.constexpr,
    DO_RECV: tl.constexpr,
):
    """Grid ACK_NEXT + (R * CC * HS if DO_SEND) + (NB * HSR + ACKER if DO_RECV): with
    ACK_NEXT first the owed-acks program, then the send programs (s, cc, hs), then the
    receive programs, then with ACKER the acker program; with
    both halves, one launch does the whole combine (same forward-progress argument as
    `_dispatch_kernel`: a program only waits for programs of lower index, here and on the
    peers)."""
    pid = tl.program_id(0) - ACK_NEXT  # -1: the owed-acks program (`_dispatch_kernel`)
    if ACK_NEXT:
        if pid < 0:
            send_owed_acks(
                table_ptr, state_ptr, off_disp_ack, off_comb_ack, rank, R, R_PAD, SYNC2
            )  # fmt: skip
    n_send = R * CC * HS if DO_SEND else 0  # constexpr: a half not asked for is not compiled
    if DO_SEND:
        if (pid >= 0) & (pid < n_send):
            _combine_send(
                pid % R,
                pid // R // HS,
                pid // R % HS,
                prof_ptr + pid * 8,
                expert_y_ptr,
                stride_yr,
                comb_row_ptr,
                comb_w_ptr,
                table_ptr,
                state_ptr,
                rank,
                off_comb_ack,
                off_comb_flag,
                off_comb_rows,
                T_MAX,
                H,
                COMB_STRIDE,
                K,
                K_PAD,
                R,
                CB,
                BLOCK_H_SEND,
                OUT_DTYPE,
                MAX_SPIN,
                CC,
                HS,
                HCHUNK,
                SYNC2,
                ASM,
                PROF,
            )
    if DO_RECV:
        q = pid - n_send
        if (q >= 0) & (q < NB * HSR):
            _combine_recv(
                q // HSR,
                q % HSR,
                prof_ptr + pid * 8,
                out_ptr,
                stride_ot,
                send_pos_ptr,
                bound_m_ptr,
                num_tokens,
                table_ptr,
                state_ptr,
                rank,
                off_comb_ack,
                off_comb_flag,
                off_comb_rows,
                T_MAX,
                H,
                COMB_STRIDE,
                R,
                R_PAD,
                CC,
                TB,
                NB,
                BLOCK_H_RECV,
                ACCUMULATE,
                OUT_DTYPE,
                MAX_SPIN,
                CB,
                HS,
                HSR,
                RCHUNK,
                ONE_TILE,
                SYNC2,
                ASM,
                PROF,
                ACKER,
            )
        if ACKER:
            if q == NB * HSR:
                acker_program(
                    prof_ptr + pid * 8, state_ptr + 3, NB * HSR, state_ptr + 1, table_ptr,
                    off_comb_ack, rank, state_ptr + 4, R, R_PAD, SYNC2, MAX_SPIN, ASM,
                    ACK_NEXT, PROF,
                )  # fmt: skip
