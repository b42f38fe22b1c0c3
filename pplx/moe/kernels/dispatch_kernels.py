"""Triton kernels of MoE dispatch inside one node (NVLink on CUDA, /dev/shm on CPU).

# T tokens per rank (T_MAX = max_num_tokens), K top-k, E experts, E_L = E / R local experts,
# H hidden, W = row bytes / word bytes, S scales per token, R ranks, NC token chunks of BT.

Layout (beats the per-slot byte floor, keeps the contract): a token goes to each
destination rank ONCE, however many of its K experts live there (at EP4, K=8, E=256 a
token reaches 3.6 ranks on average instead of 8 slots: 2.2x fewer bytes), into the slot of
its own token index t (`rows[src, t]`), so no sender needs to know how many tokens came
before its own. With the row go K small records `(local expert, rank q within (chunk,
expert))` plus the weight, and per chunk the count of slots per local expert; the receiver
turns counts into the contract's positions (prefix over (source, chunk), padded prefix
over experts) and fans the row out to the K' rows of `expert_x` it needs.

`_dispatch_kernel`, one grid of send programs (c, d) and/or receive programs (s, rc):
1. send, 1 + RS programs per (token chunk c, destination rank d), each first waiting for
   d's ack of the previous dispatch (buffer reuse); no prefix over earlier chunks in any:
   - RS rows programs (RS = `Tuning.rows_split`, 1 by default), each with its part of
     the row: load the chunk's rows (before the wait when they fit one tile), store the
     rows of the tokens that reach d at `rows[rank, t]`, then signal flag (rank, c) of d
     (a system-scope release: waits until the rows have drained; with RS > 1 the RS
     programs count the flag up to RS * (epoch + 1));
   - records program: the records of every slot of the chunk (-1 where the expert is not
     d's or t >= bound_m) and the chunk's counts per local expert of d, as tagged words
     (`(epoch + 1) << 32 | payload`, each one 8-byte store) with no fence and no flag: a
     release fence on an SM waits behind the rows' NVLink stores (clock stamps: a records
     flag landed no earlier than the rows), tagged words land as soon as they are stored.
2. receive, one launch of a layout program then programs (s, rc):
   - layout: poll the tagged counts of every (source, chunk), publish (this GPU) the row
     of expert_x where each (source, chunk)'s slots of local expert e start: `first[e]`
     (padded prefix over experts of the totals) plus the slots of earlier pairs, and
     expert_num_tokens;
   - (s, rc): token slots rc * RB + [0, RB) of source s (one chunk c: RB divides BT): wait
     for the layout, poll its tagged records, place each slot at `start[s, c, e] + q`, keep
     the row map and weights for combine; then wait for flag (s, c) only (the layout was
     computed while rows were in flight) and fan the rows out (each slot's K target rows
     come from the [RB, K] tile in registers). Every receive-side program counts itself
     done once it has read what it needs of the receive buffer (ONE_TILE_RECV, decode:
     right after loading its rows and scales, before the fan-out stores); then the sources
     are acked: with ACKER (`Tuning.acker`, the default) by an acker program at the end of
     the grid that waits for the count, so that no receive program carries the ack's
     round trip before its own stores (with ACK_NEXT the acker only moves the epoch on and
     the first program of the rank's next launch sends the acks); without, by the last
     program to count.

No host synchronisation; `bound_m` is read on the device; grids depend only on T_MAX, so
the whole dispatch can be captured in a CUDA graph.
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
    store_tagged,
    tag_word,
    wait_ge,
    wait_one_ge,
    wait_tagged,
    word_payload,
)


@triton.jit
def _live_tokens(bound_m_ptr, num_tokens):
    return tl.minimum(tl.load(bound_m_ptr), num_tokens)


@triton.jit
def _dispatch_send(
    c,  # token chunk
    d,  # destination rank
    part,  # >= 0: rows program `part` of (c, d) (words part * WCH + [0, WCH)); -1: records
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
    send_pos_ptr,  # [T_MAX, R] int32 (out): t where token t reaches rank d, else -1
    table_ptr,  # [R] int64 peer buffer addresses
    state_ptr,  # [16] int32: [5] dispatch send epoch, [6] its done counter, [4] error flag
    rank,
    off_disp_flag,
    off_disp_ack,
    off_counts,
    off_tok_eq,
    off_tok_w,
    off_rows,
    off_scales,
    T_MAX,
    W,  # words per row
    WCH,  # words per rows program (W if RS == 1)
    ROW_WORDS,  # row stride in the receive area, words
    S,
    HAS_SCALE: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_LOCAL: tl.constexpr,
    E_LOCAL_PAD: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
    NC: tl.constexpr,
    RS: tl.constexpr,
    FB: tl.constexpr,
    BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """Send program (c, d) of token chunk c to destination rank d: part `part` of its rows
    (then flag (rank, c) in d; RS rows programs per (c, d) count it up together), or, with
    part -1, its records and counts (tagged words, no flag)."""
    stamp(prof_ptr, 0, PROF)
    m = _live_tokens(bound_m_ptr, num_tokens)
    t = c * BT + tl.arange(0, BT)  # [BT]
    t_ok = t < m
    # The send side's own epoch (state[5]): in the fused kernel a send program may read
    # it while this rank's receive programs are bumping theirs (state[0]).
    epoch = tl.load(state_ptr + 5)
    # Buffer reuse: d must have consumed our previous dispatch before we overwrite it.
    ack = peer_ptr(table_ptr, rank, off_disp_ack, tl.int32) + d
    flags = peer_ptr(table_ptr, d, off_disp_flag, tl.int32)
    if part >= 0:
        # This program's words [w_lo, w_hi) of each row; the scales go with the last part.
        w_lo = part * WCH
        w_hi = tl.minimum(w_lo + WCH, W)
        last_part = part == RS - 1
        wo = tl.arange(0, BLOCK_W)
        so = tl.arange(0, S_PAD)
        xv = tl.zeros([BT, BLOCK_W], dtype=WORD)
        sv = tl.zeros([BT, S_PAD], dtype=tl.int32)
        if ONE_TILE:
            # The chunk's rows (part) and scales in one tile, loaded before the ack wait so
            # their HBM latency overlaps it (input data: no ordering with the peers).
            xv = tl.load(
                x_ptr + t[:, None] * stride_xt + (w_lo + wo)[None, :],
                mask=t_ok[:, None] & ((w_lo + wo)[None, :] < w_hi),
            )
            if HAS_SCALE:
                sv = tl.load(
                    xs_ptr + t[:, None] * stride_st + so[None, :],
                    mask=t_ok[:, None] & (so[None, :] < S) & last_part,
                )
        # Whether token t reaches d: any of its K experts in d's block.
        kk = tl.arange(0, K_PAD)
        g2 = tl.load(
            indices_ptr + t[:, None] * stride_it + kk[None, :],
            mask=t_ok[:, None] & (kk[None, :] < K),
            other=-1,
        ).to(tl.int32)  # [BT, K]
        on2 = (g2 >= d * E_LOCAL) & (g2 < (d + 1) * E_LOCAL)
        hit = tl.max(on2.to(tl.int32), axis=1) > 0  # [BT]
        if SYNC2:
            wait_one_ge(ack, epoch, state_ptr + 4, MAX_SPIN, ASM)
        else:
            wait_ge(ack, epoch, state_ptr + 4, MAX_SPIN)
        stamp(prof_ptr, 1, PROF)
        dst = peer_ptr(table_ptr, d, off_rows, WORD) + (rank * T_MAX + t)[:, None] * ROW_WORDS
        if ONE_TILE:
            ok = hit[:, None] & ((w_lo + wo)[None, :] < w_hi)
            tl.store(dst + (w_lo + wo)[None, :], xv, mask=ok)
        else:
            src = x_ptr + t[:, None] * stride_xt
            for w0 in range(w_lo, w_hi, BLOCK_W):
                ok = hit[:, None] & ((w0 + wo)[None, :] < w_hi)
                v = tl.load(src + (w0 + wo)[None, :], mask=ok)
                tl.store(dst + (w0 + wo)[None, :], v, mask=ok)
        if HAS_SCALE:
            ok = hit[:, None] & (so[None, :] < S) & last_part
            if not ONE_TILE:
                sv = tl.load(xs_ptr + t[:, None] * stride_st + so[None, :], mask=ok)
            dsc = peer_ptr(table_ptr, d, off_scales, tl.int32) + (rank * T_MAX + t)[:, None] * S
            tl.store(dsc + so[None, :], sv, mask=ok)
        if part == 0:
            tl.store(send_pos_ptr + t * R + d, tl.where(hit, t, -1), mask=t_ok)
        stamp(prof_ptr, 2, PROF)
        if SYNC2:
            # v2: flag (rank, c) in d's [R, NC] flags: epoch + 1, or with RS rows programs
            # per (c, d) a counter that reaches RS * (epoch + 1).
            if RS == 1:
                signal_set(flags + rank * NC + c, epoch + 1)
            else:
                signal_add(flags + rank * NC + c)
        else:
            signal_add(flags + rank)
    else:
        if SYNC2:
            wait_one_ge(ack, epoch, state_ptr + 4, MAX_SPIN, ASM)
        else:
            wait_ge(ack, epoch, state_ptr + 4, MAX_SPIN)
        stamp(prof_ptr, 1, PROF)
        # Records of every slot (t, k) of the chunk, in (t, k) order, FB slots per step:
        # q = slots of the same local expert earlier in the chunk (one-hot, exclusive scan).
        # Every word is tagged with epoch + 1 and stored with no fence and no flag: the
        # receiver polls the tags (store_tagged in sync_kernels.py).
        cols = tl.arange(0, E_LOCAL_PAD)
        run = tl.zeros([E_LOCAL_PAD], dtype=tl.int32)  # slots per expert in earlier steps
        tok_eq = peer_ptr(table_ptr, d, off_tok_eq, tl.int64) + rank * T_MAX * K
        tok_w = peer_ptr(table_ptr, d, off_tok_w, tl.int64) + rank * T_MAX * K
        for f0 in tl.static_range(0, BT * K_PAD, FB):
            f = f0 + tl.arange(0, FB)
            tf = c * BT + f // K_PAD
            kf = f % K_PAD
            f_ok = (kf < K) & (tf < m)
            g = tl.load(indices_ptr + tf * stride_it + kf, mask=f_ok, other=-1).to(tl.int32)
            on = f_ok & (g >= d * E_LOCAL) & (g < (d + 1) * E_LOCAL)
            el = g - d * E_LOCAL
            oh = ((el[:, None] == cols[None, :]) & on[:, None]).to(tl.int32)  # [FB, E_L]
            before = tl.cumsum(oh, axis=0) - oh + run[None, :]
            q = tl.sum(oh * before, axis=1)  # [FB]
            run += tl.sum(oh, axis=0)
            w = tl.load(weights_ptr + tf * stride_wt + kf, mask=f_ok, other=0.0)
            # Every slot below T_MAX is written (-1 where not d's or t >= bound_m): the
            # receiver reads all T_MAX slots of every source.
            st_ok = (kf < K) & (tf < T_MAX)
            eq = tl.where(on, el * 65536 + q, -1)
            store_tagged(tok_eq + tf * K + kf, tag_word(epoch + 1, eq), st_ok, ASM)
            wb = w.to(tl.int32, bitcast=True)
            store_tagged(tok_w + tf * K + kf, tag_word(epoch + 1, wb), st_ok, ASM)
        cnt_dst = peer_ptr(table_ptr, d, off_counts, tl.int64) + (rank * NC + c) * E_LOCAL
        store_tagged(cnt_dst + cols, tag_word(epoch + 1, run), cols < E_LOCAL, ASM)
        stamp(prof_ptr, 2, PROF)
    stamp(prof_ptr, 3, PROF)
    # The last send program to finish has read the epoch everywhere: next send epoch.
    if last_program_done(state_ptr + 6, (1 + RS) * NC * R):
        tl.store(state_ptr + 5, epoch + 1)


@triton.jit
def _dispatch_layout(
    prof_ptr,  # [8] int64 time stamps of this program (PROF only)
    expert_num_tokens_ptr,  # [E_L] int32 (out)
    starts_ptr,  # [R * NC, E_L] int32 (out): row of expert_x of each (source, chunk, e)
    table_ptr,
    state_ptr,  # [16] int32: [0] dispatch (receive) epoch, [9] layout epoch, [4] error
    rank,
    off_disp_ack,
    off_counts,
    expert_padding,
    E_LOCAL: tl.constexpr,
    E_LOCAL_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    NC: tl.constexpr,
    LB: tl.constexpr,
    RC: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    ACKER: tl.constexpr,
):
    """The layout program (one per receive launch): wait for the tagged counts of every
    (source, chunk), then publish where each (source, chunk)'s slots of local expert e
    start in expert_x: `first[e]` (padded prefix over experts of the totals) plus the slots
    of earlier (source, chunk) pairs (contract order: source, then token)."""
    stamp(prof_ptr, 0, PROF)
    epoch = tl.load(state_ptr)
    cols = tl.arange(0, E_LOCAL_PAD)
    c_ok = cols < E_LOCAL
    counts = peer_ptr(table_ptr, rank, off_counts, tl.int64)
    total = tl.zeros([E_LOCAL_PAD], dtype=tl.int32)
    for l0 in tl.static_range(0, R * NC, LB):
        lin = l0 + tl.arange(0, LB)
        ok = (lin[:, None] < R * NC) & c_ok[None, :]
        v = wait_tagged(
            counts + lin[:, None] * E_LOCAL + cols[None, :],
            ok,
            epoch + 1,
            state_ptr + 4,
            MAX_SPIN,
            ASM,
        )
        total += tl.sum(word_payload(v), axis=0)
    stamp(prof_ptr, 1, PROF)
    padded = (total + expert_padding - 1) // expert_padding * expert_padding
    run = tl.cumsum(padded, axis=0) - padded  # [E_L] first row of each expert
    tl.store(expert_num_tokens_ptr + cols, total, mask=c_ok)
    for l0 in tl.static_range(0, R * NC, LB):
        lin = l0 + tl.arange(0, LB)
        ok = (lin[:, None] < R * NC) & c_ok[None, :]
        cnt = word_payload(
            tl.load(counts + lin[:, None] * E_LOCAL + cols[None, :], mask=ok, other=0)
        )
        before = tl.cumsum(cnt, axis=0) - cnt  # [LB, E_L]
        tl.store(
            starts_ptr + lin[:, None] * E_LOCAL + cols[None, :], run[None, :] + before, mask=ok
        )
        run += tl.sum(cnt, axis=0)
    # Publish to this launch's receive programs (same GPU).
    tl.debug_barrier()
    tl.atomic_xchg(state_ptr + 9, epoch + 1, sem="release", scope="gpu")
    stamp(prof_ptr, 2, PROF)
    _recv_done(table_ptr, state_ptr, rank, off_disp_ack, epoch, R, R_PAD, RC, SYNC2, ACKER)


@triton.jit
def _recv_done(
    table_ptr,
    state_ptr,
    rank,
    off_disp_ack,
    epoch,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    RC: tl.constexpr,
    SYNC2: tl.constexpr,
    ACKER: tl.constexpr,
):
    """A receive-side program (R * RC receive programs + the layout program) has read all
    it needs of the receive buffer: count it; once all have, the sources are acked (by the
    acker program with ACKER, else by the last to count) and the epoch moves on."""
    recv_program_done(
        state_ptr + 2, R * RC + 1, state_ptr, epoch, table_ptr, off_disp_ack, rank, R, R_PAD,
        SYNC2, ACKER,
    )  # fmt: skip


@triton.jit
def _dispatch_recv(
    s,  # source rank
    rc,  # block of RB token slots of s
    prof_ptr,  # [8] int64 time stamps of this program (PROF only)
    starts_ptr,  # [R * NC, E_L] int32: from the layout program
    expert_x_ptr,  # [rows, W] words (out)
    stride_xr,
    expert_xs_ptr,  # [rows, S] int32 view of f32 scales (out)
    stride_sr,
    comb_row_ptr,  # [R, T_MAX, K] int32 (out): row of expert_x per received slot, -1 if none
    comb_w_ptr,  # [R, T_MAX, K] float32 (out): its weight
    table_ptr,
    state_ptr,  # [16] int32: [0] dispatch (receive) epoch, [2] done counter, [4] error,
    # [9] layout epoch
    rank,
    off_disp_flag,
    off_disp_ack,
    off_tok_eq,
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
    RS: tl.constexpr,
    RB: tl.constexpr,
    RC: tl.constexpr,
    BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    ONE_TILE_RECV: tl.constexpr,
    ACKER: tl.constexpr,
):
    """Receive program (s, rc): token slots rc * RB + [0, RB) of source s (chunk c)."""
    stamp(prof_ptr, 0, PROF)
    epoch = tl.load(state_ptr)
    flags = peer_ptr(table_ptr, rank, off_disp_flag, tl.int32)
    c = (rc * RB) // BT
    cols = tl.arange(0, E_LOCAL_PAD)
    # The layout program of this launch has published the starts of this epoch.
    wait_one_ge(state_ptr + 9, epoch + 1, state_ptr + 4, MAX_SPIN, ASM)
    start = tl.load(starts_ptr + (s * NC + c) * E_LOCAL + cols, mask=cols < E_LOCAL, other=0)
    stamp(prof_ptr, 1, PROF)

    j = rc * RB + tl.arange(0, RB)  # [RB] token slots of source s
    j_ok = j < T_MAX
    kk = tl.arange(0, K_PAD)
    rec = (s * T_MAX + j)[:, None] * K + kk[None, :]  # [RB, K]
    rec_ok = j_ok[:, None] & (kk[None, :] < K)
    tag = epoch + 1
    err = state_ptr + 4
    eqw = wait_tagged(
        peer_ptr(table_ptr, rank, off_tok_eq, tl.int64) + rec, rec_ok, tag, err, MAX_SPIN, ASM
    )
    ww = wait_tagged(
        peer_ptr(table_ptr, rank, off_tok_w, tl.int64) + rec, rec_ok, tag, err, MAX_SPIN, ASM
    )
    eq = tl.where(rec_ok, word_payload(eqw), -1)
    w = word_payload(ww).to(tl.float32, bitcast=True)
    on = eq >= 0  # [RB, K]
    e = tl.where(on, eq // 65536, -1)
    # Gather start[e] through a one-hot over local experts (no register gather in Triton).
    row = tl.sum(tl.where(e[:, :, None] == cols[None, None, :], start[None, None, :], 0), axis=2)
    row = tl.where(on, row + eq % 65536, -1)  # [RB, K]
    tl.store(comb_row_ptr + rec, row, mask=rec_ok)
    tl.store(comb_w_ptr + rec, w, mask=rec_ok)
    hit = tl.max(on.to(tl.int32), axis=1) > 0  # [RB] slots that hold a row

    stamp(prof_ptr, 2, PROF)
    if SYNC2:
        # The rows of (s, c) have landed: flag (s, c) (counted up by its RS rows programs).
        wait_one_ge(flags + s * NC + c, (epoch + 1) * RS, err, MAX_SPIN, ASM)
    else:
        # v1: one counter per source, every rows program of the source adds 1.
        for r in range(R):
            wait_ge(flags + r, (epoch + 1) * NC * RS, err, MAX_SPIN)
    stamp(prof_ptr, 3, PROF)
    # Fan out: read each received row once, store it to its K' rows of expert_x. Slot k's
    # rows come out of the [RB, K] tile in registers (`column`): read back from memory,
    # each k's load would wait behind the previous k's stores (they might alias), K round
    # trips to L2 in a row (4 H100: fan-out 4.6 us median per program).
    src = peer_ptr(table_ptr, rank, off_rows, WORD) + (s * T_MAX + j)[:, None] * ROW_WORDS
    so = tl.arange(0, S_PAD)
    s_ok = so[None, :] < S
    ssrc = peer_ptr(table_ptr, rank, off_scales, tl.int32) + (s * T_MAX + j)[:, None] * S
    if ONE_TILE_RECV:
        # Decode: each row is one tile, so every read of this rank's receive buffer comes
        # before the first store: the program counts itself done (the last one acks the
        # sources) before it fans out, and the ack's release does not wait behind the
        # fan-out stores (4 H100: the last ack landed ~3 us after the last fan-out).
        wo = tl.arange(0, BLOCK_W)
        w_ok = wo[None, :] < W
        v = tl.load(src + wo[None, :], mask=hit[:, None] & w_ok, cache_modifier=".cg")
        if HAS_SCALE:
            sv = tl.load(ssrc + so[None, :], mask=hit[:, None] & s_ok, cache_modifier=".cg")
        _recv_done(table_ptr, state_ptr, rank, off_disp_ack, epoch, R, R_PAD, RC, SYNC2, ACKER)
        stamp(prof_ptr, 6, PROF)  # loads complete (the done count's release waited for them)
        for k in tl.static_range(K):
            row_k = column(row, kk, k)  # [RB]
            dst = expert_x_ptr + row_k[:, None] * stride_xr + wo[None, :]
            tl.store(dst, v, mask=(row_k >= 0)[:, None] & w_ok)
            if HAS_SCALE:
                sdst = expert_xs_ptr + row_k[:, None] * stride_sr + so[None, :]
                tl.store(sdst, sv, mask=(row_k >= 0)[:, None] & s_ok)
        stamp(prof_ptr, 4, PROF)
    else:
        for w0 in range(0, W, BLOCK_W):
            wo = w0 + tl.arange(0, BLOCK_W)
            w_ok = wo[None, :] < W
            v = tl.load(src + wo[None, :], mask=hit[:, None] & w_ok, cache_modifier=".cg")
            for k in tl.static_range(K):
                row_k = column(row, kk, k)  # [RB]
                dst = expert_x_ptr + row_k[:, None] * stride_xr + wo[None, :]
                tl.store(dst, v, mask=(row_k >= 0)[:, None] & w_ok)
        if HAS_SCALE:
            sv = tl.load(ssrc + so[None, :], mask=hit[:, None] & s_ok, cache_modifier=".cg")
            for k in tl.static_range(K):
                row_k = column(row, kk, k)
                sdst = expert_xs_ptr + row_k[:, None] * stride_sr + so[None, :]
                tl.store(sdst, sv, mask=(row_k >= 0)[:, None] & s_ok)
        stamp(prof_ptr, 4, PROF)
        _recv_done(table_ptr, state_ptr, rank, off_disp_ack, epoch, R, R_PAD, RC, SYNC2, ACKER)
    stamp(prof_ptr, 5, PROF)


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
    send_pos_ptr,
    # receive side
    expert_num_tokens_ptr,
    expert_x_ptr,
    stride_xr,
    expert_xs_ptr,
    stride_sr,
    comb_row_ptr,
    comb_w_ptr,
    starts_ptr,
    expert_padding,
    # both
    prof_ptr,  # [(1 + RS) * NC * R + 1 + R * RC, 8] int64 stamps per program (PROF only)
    table_ptr,
    state_ptr,
    rank,
    off_disp_flag,
    off_disp_ack,
    off_counts,
    off_tok_eq,
    off_tok_w,
    off_rows,
    off_scales,
    off_comb_ack,
    T_MAX,
    W,
    WCH,
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
    RS: tl.constexpr,
    FB: tl.constexpr,
    LB: tl.constexpr,
    RB: tl.constexpr,
    RC: tl.constexpr,
    BLOCK_W_SEND: tl.constexpr,
    BLOCK_W_RECV: tl.constexpr,
    S_PAD: tl.constexpr,
    WORD: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    SYNC2: tl.constexpr,
    ASM: tl.constexpr,
    PROF: tl.constexpr,
    ONE_TILE: tl.constexpr,
    ONE_TILE_RECV: tl.constexpr,
    ACKER: tl.constexpr,
    ACK_NEXT: tl.constexpr,
    DO_SEND: tl.constexpr,
    DO_RECV: tl.constexpr,
):
    """Grid ACK_NEXT + ((1 + RS) * NC * R if DO_SEND) + (1 + R * RC + ACKER if DO_RECV):
    with ACK_NEXT first a program that sends the acks this rank owes, then the send
    programs (records programs (c, d), then RS rows programs (c, d) per pair, part-major),
    then the layout program, the receive programs (s, rc) and with ACKER the acker program;
    with both halves, one launch does the whole dispatch.

    Warning: with DO_SEND and DO_RECV a receive program spins until send programs of this
    launch (its own rank's chunks to itself) have signalled. That relies on the blocks of
    a launch starting in increasing linear index whenever one can start (true of CUDA's
    block scheduler in practice, and what decoupled look-back scans rely on too): every
    send program then starts no later than any receive program, so a spinning receive
    program never holds the slot a send program needs. The interpreter runs programs in
    index order (sends first) in each rank's process.
    """
    # With ACK_NEXT, program 0 sends the acks this rank owes (`send_owed_acks`) and the
    # others shift by one (pid -1 is that program).
    pid = tl.program_id(0) - ACK_NEXT
    if ACK_NEXT:
        if pid < 0:
            send_owed_acks(
                table_ptr, state_ptr, off_disp_ack, off_comb_ack, rank, R, R_PAD, SYNC2
            )  # fmt: skip
    n_send = (1 + RS) * NC * R if DO_SEND else 0  # constexpr: a half not asked for is not compiled
    if DO_SEND:
        if (pid >= 0) & (pid < n_send):
            # Records programs first (short, no fence), then rows programs.
            _dispatch_send(
                pid % NC,
                (pid // NC) % R,
                pid // (NC * R) - 1,
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
                send_pos_ptr,
                table_ptr,
                state_ptr,
                rank,
                off_disp_flag,
                off_disp_ack,
                off_counts,
                off_tok_eq,
                off_tok_w,
                off_rows,
                off_scales,
                T_MAX,
                W,
                WCH,
                ROW_WORDS,
                S,
                HAS_SCALE,
                K,
                K_PAD,
                E_LOCAL,
                E_LOCAL_PAD,
                R,
                BT,
                NC,
                RS,
                FB,
                BLOCK_W_SEND,
                S_PAD,
                WORD,
                MAX_SPIN,
                SYNC2,
                ASM,
                PROF,
                ONE_TILE,
            )
    if DO_RECV:
        q = pid - n_send
        if q == 0:
            _dispatch_layout(
                prof_ptr + pid * 8,
                expert_num_tokens_ptr,
                starts_ptr,
                table_ptr,
                state_ptr,
                rank,
                off_disp_ack,
                off_counts,
                expert_padding,
                E_LOCAL,
                E_LOCAL_PAD,
                R,
                R_PAD,
                NC,
                LB,
                RC,
                MAX_SPIN,
                SYNC2,
                ASM,
                PROF,
                ACKER,
            )
        if (q > 0) & (q <= R * RC):
            _dispatch_recv(
                (q - 1) % R,
                (q - 1) // R,
                prof_ptr + pid * 8,
                starts_ptr,
                expert_x_ptr,
                stride_xr,
                expert_xs_ptr,
                stride_sr,
                comb_row_ptr,
                comb_w_ptr,
                table_ptr,
                state_ptr,
                rank,
                off_disp_flag,
                off_disp_ack,
                off_tok_eq,
                off_tok_w,
                off_rows,
                off_scales,
                T_MAX,
                W,
                ROW_WORDS,
                S,
                HAS_SCALE,
                K,
                K_PAD,
                E_LOCAL,
                E_LOCAL_PAD,
                R,
                R_PAD,
                BT,
                NC,
                RS,
                RB,
                RC,
                BLOCK_W_RECV,
                S_PAD,
                WORD,
                MAX_SPIN,
                SYNC2,
                ASM,
                PROF,
                ONE_TILE_RECV,
                ACKER,
            )
        if ACKER:
            if q == 1 + R * RC:
                acker_program(
                    prof_ptr + pid * 8, state_ptr + 2, R * RC + 1, state_ptr, table_ptr,
                    off_disp_ack, rank, state_ptr + 4, R, R_PAD, SYNC2, MAX_SPIN, ASM,
                    ACK_NEXT, PROF,
                )  # fmt: skip
