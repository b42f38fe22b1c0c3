"""Triton kernels of MoE dispatch inside one node (NVLink on CUDA, /dev/shm on CPU).

# T tokens per rank (T_MAX = max_num_tokens), K top-k, E experts, E_L = E / R local experts,
# H hidden, W = row bytes / word bytes, S scales per token, R ranks, NC token chunks of BT.

Layout (beats the per-slot byte floor, keeps the contract): a token goes to each
destination rank ONCE, however many of its K experts live there (at EP4, K=8, E=256 a
token reaches 3.6 ranks on average instead of 8 slots: 2.2x fewer bytes). With the row go
K small records `(local expert, position within (source, expert), weight)`; the receiver
fans the row out to the K' rows of `expert_x` it needs, in the contract order.

1. `_dispatch_count_kernel`, grid (NC, R): per token chunk c and destination d, count
   slots per local expert of d and tokens that reach d -> local scratch.
2. `_dispatch_send_kernel`, grid (NC, R): prefix sums over earlier chunks give each token's
   slot p in d's receive area and each slot's position q within (source, expert); store
   records, rows and scales into d's buffer; the last chunk also stores the totals; then
   signal d. Waits first for d's ack of the previous dispatch (buffer reuse).
3. `_dispatch_recv_kernel`, grid (R, RC): wait for every chunk of source s and the last
   chunk of every source (v2; v1: every source entirely), place rows at
   `off[e] + base[s][e] + q` (off: padded prefix over experts, base: prefix over sources),
   keep the row map and weights for combine, ack the sources (last program).

No host synchronisation; `bound_m` is read on the device; grids depend only on T_MAX, so
the whole dispatch can be captured in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pplx.moe.kernels.sync_kernels import (
    ack_peers,
    last_program_done,
    peer_ptr,
    signal_add,
    signal_set,
    stamp,
    wait_all_ge,
    wait_ge,
    wait_one_ge,
)


@triton.jit
def _live_tokens(bound_m_ptr, num_tokens):
    return tl.minimum(tl.load(bound_m_ptr), num_tokens)


@triton.jit
def _dispatch_count_kernel(
    indices_ptr,  # [T, K] int32/int64
    stride_it,
    bound_m_ptr,  # [1] int32
    num_tokens,
    chunk_counts_ptr,  # [NC, E] int32 (out)
    chunk_hits_ptr,  # [NC, R] int32 (out)
    K: tl.constexpr,
    E_LOCAL: tl.constexpr,
    E_LOCAL_PAD: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
):
    c = tl.program_id(0)
    d = tl.program_id(1)
    m = _live_tokens(bound_m_ptr, num_tokens)
    t = c * BT + tl.arange(0, BT)  # [BT]
    t_ok = t < m
    cols = tl.arange(0, E_LOCAL_PAD)
    cnt = tl.zeros([E_LOCAL_PAD], dtype=tl.int32)
    hit = tl.zeros([BT], dtype=tl.int32)
    for k in tl.static_range(K):
        g = tl.load(indices_ptr + t * stride_it + k, mask=t_ok, other=0).to(tl.int32)  # [BT]
        on = t_ok & (g >= d * E_LOCAL) & (g < (d + 1) * E_LOCAL)
        oh = ((g - d * E_LOCAL)[:, None] == cols[None, :]) & on[:, None]  # [BT, E_L]
        cnt += tl.sum(oh.to(tl.int32), axis=0)
        hit = tl.maximum(hit, on.to(tl.int32))
    tl.store(chunk_counts_ptr + c * (R * E_LOCAL) + d * E_LOCAL + cols, cnt, mask=cols < E_LOCAL)
    tl.store(chunk_hits_ptr + c * R + d, tl.sum(hit, axis=0))


@triton.jit
def _send_rows(
    x_ptr,
    stride_xt,
    xs_ptr,
    stride_st,
    t,  # [BT] this chunk's tokens
    t_ok,
    hit,  # [BT] 1 where token t reaches d
    p,  # [BT] its slot in d's area
    xv,  # [BT, BLOCK_W] its words (EARLY: loaded already)
    sv,  # [BT, S_PAD] its scales (EARLY)
    table_ptr,
    rank,
    d,
    off_rows,
    off_scales,
    T_MAX,
    W,
    ROW_WORDS,
    S,
    HAS_SCALE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    EARLY: tl.constexpr,
):
    """Rows: one copy of token t per destination rank, 8-byte words, straight into d's
    buffer at slot p (and its scales)."""
    h_ok = hit > 0
    dst = peer_ptr(table_ptr, d, off_rows, WORD) + (rank * T_MAX + p)[:, None] * ROW_WORDS
    if EARLY:
        wo = tl.arange(0, BLOCK_W)
        tl.store(dst + wo[None, :], xv, mask=h_ok[:, None] & (wo[None, :] < W))
    else:
        src = x_ptr + t[:, None] * stride_xt
        for w0 in range(0, W, BLOCK_W):
            wo = w0 + tl.arange(0, BLOCK_W)
            ok = h_ok[:, None] & (wo[None, :] < W)
            tl.store(dst + wo[None, :], tl.load(src + wo[None, :], mask=ok), mask=ok)
    if HAS_SCALE:
        so = tl.arange(0, S_PAD)
        ok = h_ok[:, None] & (so[None, :] < S)
        if not EARLY:
            sv = tl.load(xs_ptr + t[:, None] * stride_st + so[None, :], mask=ok)
        dsc = peer_ptr(table_ptr, d, off_scales, tl.int32) + (rank * T_MAX + p)[:, None] * S
        tl.store(dsc + so[None, :], sv, mask=ok)


@triton.jit
def _dispatch_send(
    c,  # token chunk
    d,  # destination rank
    prof_ptr,  # [8] int64 time stamps of this program (PROF only)
    x_ptr,  # [T, W] words
    stride_xt,
    xs_ptr,  # [T, S] int32 view of f32 scales (unused without HAS_SCALE)
    stride_st,
    indices_ptr,  # [T, K] int32/int64
    stride_it,
    weights_ptr,  # [T, K] float32
    stride_wt,
    bound_m_ptr,  # [1] int32
    num_tokens,
    chunk_counts_ptr,  # [NC, E] int32
    chunk_hits_ptr,  # [NC, R] int32
    send_pos_ptr,  # [T_MAX, R] int32 (out): slot of token t in rank d's area, -1 if none
    table_ptr,  # [R] int64 peer buffer addresses
    state_ptr,  # [16] int32: [5] dispatch send epoch, [6] its done counter, [4] error flag
    rank,
    off_disp_flag,
    off_disp_ack,
    off_counts,
    off_ntok,
    off_tok_e,
    off_tok_q,
    off_tok_w,
    off_rows,
    off_scales,
    T_MAX,
    W,  # words per row
    ROW_WORDS,  # row stride in the receive area, words
    S,
    HAS_SCALE: tl.constexpr,
    K: tl.constexpr,
    E_LOCAL: tl.constexpr,
    E_LOCAL_PAD: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
    NC: tl.constexpr,
    CB: tl.constexpr,
    BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    FUSED_PREFIX: tl.constexpr,
    PB: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    EARLY: tl.constexpr,
):
    """Send program (c, d): token chunk c to destination rank d."""
    stamp(prof_ptr, 0, PROF)
    m = _live_tokens(bound_m_ptr, num_tokens)
    xv = tl.zeros([BT, BLOCK_W], dtype=WORD)
    sv = tl.zeros([BT, S_PAD], dtype=tl.int32)
    if EARLY:
        # This chunk's rows and scales (one tile: W <= BLOCK_W), loaded before the ack wait
        # and the prefix so that their HBM latency overlaps them (input data: no ordering
        # with the peers is involved).
        t = c * BT + tl.arange(0, BT)
        wo = tl.arange(0, BLOCK_W)
        xok = (t < m)[:, None] & (wo[None, :] < W)
        xv = tl.load(x_ptr + t[:, None] * stride_xt + wo[None, :], mask=xok)
        if HAS_SCALE:
            so = tl.arange(0, S_PAD)
            sok = (t < m)[:, None] & (so[None, :] < S)
            sv = tl.load(xs_ptr + t[:, None] * stride_st + so[None, :], mask=sok)
    # The send side's own epoch (state[5]): in the fused kernel a send program may read
    # it while this rank's receive programs are bumping theirs (state[0]).
    epoch = tl.load(state_ptr + 5)
    # Buffer reuse: d must have consumed our previous dispatch before we overwrite it.
    ack = peer_ptr(table_ptr, rank, off_disp_ack, tl.int32) + d
    if SYNC2:
        wait_one_ge(ack, epoch, state_ptr + 4, MAX_SPIN, ASM)
    else:
        wait_ge(ack, epoch, state_ptr + 4, MAX_SPIN)
    stamp(prof_ptr, 1, PROF)

    cols = tl.arange(0, E_LOCAL_PAD)
    # Prefix over earlier chunks: slots per expert of d and tokens reaching d before chunk c.
    base_q = tl.zeros([E_LOCAL_PAD], dtype=tl.int32)
    base_p = tl.program_id(0) * 0
    if FUSED_PREFIX:
        # Small T (decode): recount the earlier tokens here instead of a count kernel.
        # Elementwise accumulation, ONE reduction at the end: each cross-warp reduction
        # is a barrier round, and the last chunk's program used to chain 4 * (K + 1) of them.
        acc_q = tl.zeros([PB, E_LOCAL_PAD], dtype=tl.int32)
        acc_p = tl.zeros([PB], dtype=tl.int32)
        for t0 in range(0, c * BT, PB):
            tt = t0 + tl.arange(0, PB)
            tt_ok = (tt < c * BT) & (tt < m)
            hit_p = tl.zeros([PB], dtype=tl.int32)
            for k in tl.static_range(K):
                g = tl.load(indices_ptr + tt * stride_it + k, mask=tt_ok, other=0).to(tl.int32)
                on = tt_ok & (g >= d * E_LOCAL) & (g < (d + 1) * E_LOCAL)
                oh = ((g - d * E_LOCAL)[:, None] == cols[None, :]) & on[:, None]
                acc_q += oh.to(tl.int32)
                hit_p = tl.maximum(hit_p, on.to(tl.int32))
            acc_p += hit_p
        base_q = tl.sum(acc_q, axis=0)
        base_p = tl.sum(acc_p, axis=0)
    else:
        for c0 in range(0, c, CB):
            cc = c0 + tl.arange(0, CB)  # [CB]
            c_ok = cc < c
            blk = tl.load(
                chunk_counts_ptr + cc[:, None] * (R * E_LOCAL) + d * E_LOCAL + cols[None, :],
                mask=c_ok[:, None] & (cols[None, :] < E_LOCAL),
                other=0,
            )  # [CB, E_L]
            base_q += tl.sum(blk, axis=0)
            base_p += tl.sum(tl.load(chunk_hits_ptr + cc * R + d, mask=c_ok, other=0), axis=0)

    stamp(prof_ptr, 2, PROF)
    t = c * BT + tl.arange(0, BT)  # [BT]
    t_ok = t < m
    # Pass 1: per-token one-hot of local experts (summed over k) and whether t reaches d.
    oh_sum = tl.zeros([BT, E_LOCAL_PAD], dtype=tl.int32)
    hit = tl.zeros([BT], dtype=tl.int32)
    for k in tl.static_range(K):
        g = tl.load(indices_ptr + t * stride_it + k, mask=t_ok, other=0).to(tl.int32)
        on = t_ok & (g >= d * E_LOCAL) & (g < (d + 1) * E_LOCAL)
        oh_sum += (((g - d * E_LOCAL)[:, None] == cols[None, :]) & on[:, None]).to(tl.int32)
        hit = tl.maximum(hit, on.to(tl.int32))
    before_t = tl.cumsum(oh_sum, axis=0) - oh_sum  # [BT, E_L] slots of earlier tokens in chunk
    p = base_p + tl.cumsum(hit, axis=0) - hit  # [BT] slot of token t in d's area
    tl.store(send_pos_ptr + t * R + d, tl.where(hit > 0, p, -1), mask=t_ok)

    if EARLY:
        # Rows first: their remote stores overlap the record pass below.
        _send_rows(
            x_ptr, stride_xt, xs_ptr, stride_st, t, t_ok, hit, p, xv, sv, table_ptr, rank, d,
            off_rows, off_scales, T_MAX, W, ROW_WORDS, S, HAS_SCALE, BLOCK_W, S_PAD, WORD, EARLY,
        )  # fmt: skip
    stamp(prof_ptr, 3, PROF)
    # Pass 2: records (local expert, q, weight) per slot, into d's area for source `rank`.
    rec = (rank * T_MAX + p) * K  # [BT] first record of token t
    tok_e = peer_ptr(table_ptr, d, off_tok_e, tl.int32)
    tok_q = peer_ptr(table_ptr, d, off_tok_q, tl.int32)
    tok_w = peer_ptr(table_ptr, d, off_tok_w, tl.float32)
    h_ok = hit > 0
    before_k = tl.zeros([BT, E_LOCAL_PAD], dtype=tl.int32)
    for k in tl.static_range(K):
        g = tl.load(indices_ptr + t * stride_it + k, mask=t_ok, other=0).to(tl.int32)
        on = t_ok & (g >= d * E_LOCAL) & (g < (d + 1) * E_LOCAL)
        oh = (((g - d * E_LOCAL)[:, None] == cols[None, :]) & on[:, None]).to(tl.int32)
        # q = slots of (rank, e) in earlier chunks + earlier tokens + earlier k of token t.
        q = tl.sum(oh * (base_q[None, :] + before_t + before_k), axis=1)  # [BT]
        before_k += oh
        w = tl.load(weights_ptr + t * stride_wt + k, mask=t_ok, other=0.0)
        tl.store(tok_e + rec + k, tl.where(on, g - d * E_LOCAL, -1), mask=h_ok)
        tl.store(tok_q + rec + k, q, mask=h_ok)
        tl.store(tok_w + rec + k, w, mask=h_ok)

    if not EARLY:
        _send_rows(
            x_ptr, stride_xt, xs_ptr, stride_st, t, t_ok, hit, p, xv, sv, table_ptr, rank, d,
            off_rows, off_scales, T_MAX, W, ROW_WORDS, S, HAS_SCALE, BLOCK_W, S_PAD, WORD, EARLY,
        )  # fmt: skip
    stamp(prof_ptr, 4, PROF)
    if c == NC - 1:
        # The last chunk's prefix plus its own counts are the totals from this rank.
        cnt_dst = peer_ptr(table_ptr, d, off_counts, tl.int32) + rank * E_LOCAL
        tl.store(cnt_dst + cols, base_q + tl.sum(oh_sum, axis=0), mask=cols < E_LOCAL)
        tl.store(peer_ptr(table_ptr, d, off_ntok, tl.int32) + rank, base_p + tl.sum(hit, axis=0))
    if SYNC2:
        # v2: slot (rank, c) of d's [R, NC] flags, value epoch + 1.
        signal_set(peer_ptr(table_ptr, d, off_disp_flag, tl.int32) + rank * NC + c, epoch + 1)
    else:
        signal_add(peer_ptr(table_ptr, d, off_disp_flag, tl.int32) + rank)
    stamp(prof_ptr, 5, PROF)
    # The last send program to finish has read the epoch everywhere: next send epoch.
    if last_program_done(state_ptr + 6, NC * R):
        tl.store(state_ptr + 5, epoch + 1)


@triton.jit
def _dispatch_recv(
    s,  # source rank
    rc,  # block of RB received tokens of s
    prof_ptr,  # [8] int64 time stamps of this program (PROF only)
    expert_num_tokens_ptr,  # [E_L] int32 (out)
    expert_x_ptr,  # [rows, W] words (out)
    stride_xr,
    expert_xs_ptr,  # [rows, S] int32 view of f32 scales (out)
    stride_sr,
    comb_row_ptr,  # [R, T_MAX, K] int32 (out): row of expert_x per received slot, -1 if none
    comb_w_ptr,  # [R, T_MAX, K] float32 (out): its weight
    comb_ntok_ptr,  # [R] int32 (out): tokens received per source
    table_ptr,
    state_ptr,  # [16] int32: [0] dispatch (receive) epoch, [2] done counter, [4] error
    rank,
    off_disp_flag,
    off_disp_ack,
    off_counts,
    off_ntok,
    off_tok_e,
    off_tok_q,
    off_tok_w,
    off_rows,
    off_scales,
    T_MAX,
    W,
    ROW_WORDS,
    S,
    expert_padding,
    HAS_SCALE: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_LOCAL: tl.constexpr,
    E_LOCAL_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    NC: tl.constexpr,
    NC_PAD: tl.constexpr,
    RB: tl.constexpr,
    RC: tl.constexpr,
    BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
):
    """Receive program (s, rc): tokens rc * RB + [0, RB) that source s sent here."""
    stamp(prof_ptr, 0, PROF)
    epoch = tl.load(state_ptr)
    flags = peer_ptr(table_ptr, rank, off_disp_flag, tl.int32)
    if SYNC2:
        # Only what this program reads: every chunk of source s (its rows and records) and
        # the last chunk of every source (the counts and ntok it wrote), in one vector poll.
        fr = tl.arange(0, R_PAD)[:, None]
        fc = tl.arange(0, NC_PAD)[None, :]
        need = (fr < R) & (fc < NC) & ((fr == s) | (fc == NC - 1))
        wait_all_ge(flags, fr * NC + fc, need, epoch + 1, state_ptr + 4, MAX_SPIN, ASM)
    else:
        for r in range(R):
            wait_ge(flags + r, (epoch + 1) * NC, state_ptr + 4, MAX_SPIN)
    stamp(prof_ptr, 1, PROF)

    # Block starts: off[e] = padded prefix over experts, base[e] = prefix over sources < s.
    rr = tl.arange(0, R_PAD)
    cols = tl.arange(0, E_LOCAL_PAD)
    cnt = tl.load(
        peer_ptr(table_ptr, rank, off_counts, tl.int32) + rr[:, None] * E_LOCAL + cols[None, :],
        mask=(rr[:, None] < R) & (cols[None, :] < E_LOCAL),
        other=0,
        volatile=True,
    )  # [R, E_L]
    total = tl.sum(cnt, axis=0)  # [E_L]
    padded = (total + expert_padding - 1) // expert_padding * expert_padding
    first = tl.cumsum(padded, axis=0) - padded + tl.sum(tl.where(rr[:, None] < s, cnt, 0), axis=0)
    if (s == 0) & (rc == 0):
        tl.store(expert_num_tokens_ptr + cols, total, mask=cols < E_LOCAL)
    ntok = tl.load(peer_ptr(table_ptr, rank, off_ntok, tl.int32) + s, volatile=True)
    if rc == 0:
        tl.store(comb_ntok_ptr + s, ntok)

    j = rc * RB + tl.arange(0, RB)  # [RB] received token slots of source s
    j_ok = j < ntok
    kk = tl.arange(0, K_PAD)
    rec = (s * T_MAX + j)[:, None] * K + kk[None, :]  # [RB, K]
    rec_ok = j_ok[:, None] & (kk[None, :] < K)
    e = tl.load(
        peer_ptr(table_ptr, rank, off_tok_e, tl.int32) + rec,
        mask=rec_ok,
        other=-1,
        cache_modifier=".cg",
    )
    q = tl.load(
        peer_ptr(table_ptr, rank, off_tok_q, tl.int32) + rec,
        mask=rec_ok,
        other=0,
        cache_modifier=".cg",
    )
    w = tl.load(
        peer_ptr(table_ptr, rank, off_tok_w, tl.float32) + rec,
        mask=rec_ok,
        other=0.0,
        cache_modifier=".cg",
    )
    on = rec_ok & (e >= 0)  # [RB, K]
    # Gather first[e] through a one-hot over local experts (no register gather in Triton).
    row = tl.sum(tl.where(e[:, :, None] == cols[None, None, :], first[None, None, :], 0), axis=2)
    row = tl.where(on, row + q, -1)  # [RB, K]
    tl.store(comb_row_ptr + rec, row, mask=rec_ok)
    tl.store(comb_w_ptr + rec, w, mask=rec_ok)
    # Slot k's rows are read back below as a [RB] column (a load) instead of extracted from
    # the [RB, K] tile (a cross-thread reduction per k); the barrier makes the stores above
    # visible to every thread of the program.
    tl.debug_barrier()
    slot = comb_row_ptr + (s * T_MAX + j) * K  # [RB]

    stamp(prof_ptr, 2, PROF)
    # Fan out: read each received row once, store it to its K' rows of expert_x.
    src = peer_ptr(table_ptr, rank, off_rows, WORD) + (s * T_MAX + j)[:, None] * ROW_WORDS
    for w0 in range(0, W, BLOCK_W):
        wo = w0 + tl.arange(0, BLOCK_W)
        w_ok = wo[None, :] < W
        v = tl.load(src + wo[None, :], mask=j_ok[:, None] & w_ok, cache_modifier=".cg")
        for k in tl.static_range(K):
            row_k = tl.load(slot + k, mask=j_ok, other=-1, cache_modifier=".cg")  # [RB]
            dst = expert_x_ptr + row_k[:, None] * stride_xr + wo[None, :]
            tl.store(dst, v, mask=(row_k >= 0)[:, None] & w_ok)
    if HAS_SCALE:
        so = tl.arange(0, S_PAD)
        s_ok = so[None, :] < S
        ssrc = peer_ptr(table_ptr, rank, off_scales, tl.int32) + (s * T_MAX + j)[:, None] * S
        sv = tl.load(ssrc + so[None, :], mask=j_ok[:, None] & s_ok, cache_modifier=".cg")
        for k in tl.static_range(K):
            row_k = tl.load(slot + k, mask=j_ok, other=-1, cache_modifier=".cg")
            sdst = expert_xs_ptr + row_k[:, None] * stride_sr + so[None, :]
            tl.store(sdst, sv, mask=(row_k >= 0)[:, None] & s_ok)

    stamp(prof_ptr, 3, PROF)
    # The last program to finish has seen every program's reads: ack all sources, next epoch.
    if last_program_done(state_ptr + 2, R * RC):
        if SYNC2:
            ack_peers(table_ptr, off_disp_ack, rank, epoch + 1, R, R_PAD)
        else:
            for peer in range(R):
                ack = peer_ptr(table_ptr, peer, off_disp_ack, tl.int32) + rank
                tl.atomic_xchg(ack, epoch + 1, sem="release", scope="sys")
        tl.store(state_ptr, epoch + 1)
    stamp(prof_ptr, 4, PROF)


@triton.jit
def _dispatch_kernel(
    # send side
    x_ptr,
    stride_xt,
    xs_ptr,
    stride_st,
    indices_ptr,
    stride_it,
    weights_ptr,
    stride_wt,
    bound_m_ptr,
    num_tokens,
    chunk_counts_ptr,
    chunk_hits_ptr,
    send_pos_ptr,
    # receive side
    expert_num_tokens_ptr,
    expert_x_ptr,
    stride_xr,
    expert_xs_ptr,
    stride_sr,
    comb_row_ptr,
    comb_w_ptr,
    comb_ntok_ptr,
    expert_padding,
    # both
    prof_ptr,  # [NC * R + R * RC, 8] int64 time stamps per program (PROF only)
    table_ptr,
    state_ptr,
    rank,
    off_disp_flag,
    off_disp_ack,
    off_counts,
    off_ntok,
    off_tok_e,
    off_tok_q,
    off_tok_w,
    off_rows,
    off_scales,
    T_MAX,
    W,
    ROW_WORDS,
    S,
    HAS_SCALE: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_LOCAL: tl.constexpr,
    E_LOCAL_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BT: tl.constexpr,
    NC: tl.constexpr,
    NC_PAD: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    RC: tl.constexpr,
    BLOCK_W_SEND: tl.constexpr,
    BLOCK_W_RECV: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    FUSED_PREFIX: tl.constexpr,
    PB: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    EARLY: tl.constexpr,
    DO_SEND: tl.constexpr,
    DO_RECV: tl.constexpr,
):
    """Grid (NC * R if DO_SEND) + (R * RC if DO_RECV): the send programs (c, d) first,
    then the receive programs (s, rc); with both, one launch does the whole dispatch.

    Warning: with DO_SEND and DO_RECV a receive program spins until send programs of this
    launch (its own rank's chunks to itself) have signalled. That relies on the blocks of
    a launch starting in increasing linear index whenever one can start (true of CUDA's
    block scheduler in practice, and what decoupled look-back scans rely on too): every
    send program then starts no later than any receive program, so a spinning receive
    program never holds the slot a send program needs. The interpreter runs programs in
    index order (sends first) in each rank's process.
    """
    pid = tl.program_id(0)
    n_send = NC * R if DO_SEND else 0  # constexpr: a half not asked for is not compiled
    if DO_SEND:
        if pid < n_send:
            _dispatch_send(
                pid % NC,
                pid // NC,
                prof_ptr + pid * 8,
                x_ptr,
                stride_xt,
                xs_ptr,
                stride_st,
                indices_ptr,
                stride_it,
                weights_ptr,
                stride_wt,
                bound_m_ptr,
                num_tokens,
                chunk_counts_ptr,
                chunk_hits_ptr,
                send_pos_ptr,
                table_ptr,
                state_ptr,
                rank,
                off_disp_flag,
                off_disp_ack,
                off_counts,
                off_ntok,
                off_tok_e,
                off_tok_q,
                off_tok_w,
                off_rows,
                off_scales,
                T_MAX,
                W,
                ROW_WORDS,
                S,
                HAS_SCALE,
                K,
                E_LOCAL,
                E_LOCAL_PAD,
                R,
                BT,
                NC,
                CB,
                BLOCK_W_SEND,
                S_PAD,
                WORD,
                MAX_SPIN,
                FUSED_PREFIX,
                PB,
                SYNC2,
                ASM,
                PROF,
                EARLY,
            )
    if DO_RECV:
        q = pid - n_send
        if q >= 0:
            _dispatch_recv(
                q % R,
                q // R,
                prof_ptr + pid * 8,
                expert_num_tokens_ptr,
                expert_x_ptr,
                stride_xr,
                expert_xs_ptr,
                stride_sr,
                comb_row_ptr,
                comb_w_ptr,
                comb_ntok_ptr,
                table_ptr,
                state_ptr,
                rank,
                off_disp_flag,
                off_disp_ack,
                off_counts,
                off_ntok,
                off_tok_e,
                off_tok_q,
                off_tok_w,
                off_rows,
                off_scales,
                T_MAX,
                W,
                ROW_WORDS,
                S,
                expert_padding,
                HAS_SCALE,
                K,
                K_PAD,
                E_LOCAL,
                E_LOCAL_PAD,
                R,
                R_PAD,
                NC,
                NC_PAD,
                RB,
                RC,
                BLOCK_W_RECV,
                S_PAD,
                WORD,
                MAX_SPIN,
                SYNC2,
                ASM,
                PROF,
            )
