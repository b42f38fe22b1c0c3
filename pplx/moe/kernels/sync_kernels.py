"""Triton helpers shared by the dispatch and combine kernels: peer pointers, flags, waits.

# R ranks; a "table" is the `[R]` int64 array of peer buffer addresses (buffers.py).

Signals are monotone int32 counters in the receiver's buffer. A sender program adds 1 to
`flag[src]` after its stores (release, system scope); the receiver waits until the counter
reaches `(epoch + 1) * programs_per_peer`, where `epoch` counts completed calls of that
phase on this rank (all ranks make the same calls, so epochs agree). Comparisons use the
wrapping difference `(value - target) >= 0`, so counters may overflow int32.

Buffer reuse: after a receive has read everything a peer sent, it stores `epoch + 1` into
that peer's `ack[me]`; the next send to that peer first waits for `ack >= epoch`. So a
sender never overwrites data the receiver has not consumed, whatever runs in between.
"Has read everything": each receive-side program adds 1 to a done counter (release) once
its reads of the receive buffer are over; an acker program at the end of the grid waits
for the count (acquire), then acks (`recv_program_done` / `acker_program`; or, with
`Tuning.acker` off, the last program to count acks itself). With `Tuning.ack_next` the acker
only moves the receive epoch on, and the first program of the rank's next launch sends
the acks (`send_owed_acks`): an ack then says "every receive up to this epoch is consumed"
and may be sent any number of times.

Two protocols (`SYNC2` constexpr of the kernels; `TritonAllToAll(sync=...)`):
- "v1": one counter per source (`flag[src]`), every sender program adds 1 to it (remote
  RMW atomics on one address), receivers poll each source in turn with RMW atomics;
- "v2" (default): one slot per (source, sender program); a program stores `epoch + 1` into
  its own slot (release, system scope: distinct addresses, no RMW contention); receivers
  poll only the slots they need, all at once in one vector load (`ld.acquire.sys` on CUDA,
  vector atomics under the interpreter); acks go to the R peers in one vector atomic.

Scope: peers are other GPUs (NVLink) whose threads are outside `.gpu` scope in the PTX
memory model, so every release/acquire that pairs with a peer is `.sys`; the done counter
of the last-program test is only touched by this GPU (`.gpu`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def peer_ptr(table_ptr, rank, byte_off, DTYPE: tl.constexpr):
    """Typed pointer to byte `byte_off` of rank `rank`'s buffer (as mapped in this process)."""
    # Buffers are 128-byte aligned and every region offset is a multiple of 16: telling the
    # compiler lets it emit 16-byte vector loads/stores (it cannot see a loaded address).
    # The hints must sit on pointers: one on the loaded integer does not survive the cast,
    # and every access through the pointer then compiled to scalar loads/stores (bf16:
    # 2-byte ones; `python -m pplx.moe.kernels.sm90` counts them). A byte pointer first,
    # then the typed one: with a constant `byte_off` a hint on the typed pointer alone was
    # lost too (tests/moe/test_triton_compile.py checks both).
    base = tl.multiple_of(tl.load(table_ptr + rank).to(tl.pointer_type(tl.int8)), 16)
    return tl.multiple_of((base + byte_off).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def column(tile, idx, k: tl.constexpr):
    """Column k of a `[N, M]` tile whose column indices are `idx` `[M]`: `[N]`, exact (a sum
    over a one-hot, in registers; no memory round trip)."""
    return tl.sum(tl.where(idx[None, :] == k, tile, 0), axis=1)


@triton.jit
def wait_ge(flag_ptr, target, err_ptr, MAX_SPIN: tl.constexpr):
    """Spin until `*flag_ptr - target >= 0` (wrapping int32); after MAX_SPIN polls give up
    and set `*err_ptr = 1` so the host can raise instead of hanging."""
    v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    i = 0
    while ((v - target) < 0) & (i < MAX_SPIN):
        v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        i += 1
    if (v - target) < 0:
        tl.atomic_xchg(err_ptr, 1)


@triton.jit
def _ld_acquire(ptrs, ASM: tl.constexpr):
    """Elementwise acquire load (system scope) of int32 flags at `ptrs` (every lane valid)."""
    if ASM:
        v = tl.inline_asm_elementwise(
            "ld.acquire.sys.global.b32 $0, [$1];",
            "=r,l",
            [ptrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        # Interpreter (no PTX): an RMW reads the latest value just as well.
        v = tl.atomic_add(ptrs, 0, sem="acquire", scope="sys")
    return v


@triton.jit
def wait_all_ge(base_ptr, offs, mask, target, err_ptr, MAX_SPIN: tl.constexpr, ASM: tl.constexpr):
    """Spin until every flag `base_ptr[offs]` with `mask` set satisfies `flag - target >= 0`
    (wrapping int32), polling all of them in one vector load; after MAX_SPIN polls give up
    and set `*err_ptr = 1`. Masked-off lanes read `base_ptr[0]` and are ignored."""
    ptrs = base_ptr + tl.where(mask, offs, 0)
    v = _ld_acquire(ptrs, ASM)
    behind = tl.sum((((v - target) < 0) & mask).to(tl.int32), axis=None)
    i = 0
    while (behind > 0) & (i < MAX_SPIN):
        v = _ld_acquire(ptrs, ASM)
        behind = tl.sum((((v - target) < 0) & mask).to(tl.int32), axis=None)
        i += 1
    if behind > 0:
        tl.atomic_xchg(err_ptr, 1)
    # The lanes that saw the flags hand the ordering to every thread of the program.
    tl.debug_barrier()


@triton.jit
def wait_one_ge(flag_ptr, target, err_ptr, MAX_SPIN: tl.constexpr, ASM: tl.constexpr):
    """`wait_all_ge` for one flag (acquire loads instead of RMW polls)."""
    lane = tl.arange(0, 2)
    wait_all_ge(flag_ptr, lane, lane < 1, target, err_ptr, MAX_SPIN, ASM)


@triton.jit
def tag_word(tag, payload):
    """A tagged 64-bit word: `tag` (int32) in the high half, the 32 bits of `payload`
    (int32) in the low half."""
    return (tag.to(tl.int64) << 32) | (payload.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def word_payload(word):
    """The int32 payload of a tagged word (`tag_word`)."""
    return (word & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def store_tagged(ptrs, words, mask, ASM: tl.constexpr):
    """Store tagged int64 words to a peer with no fence: each word is one naturally aligned
    8-byte store (single-copy atomic), so a reader that sees the word's tag sees its
    payload, whatever order the words land in (the protocol of NCCL's LL buffers). CUDA:
    `st.relaxed.sys` (a morally strong store a peer may poll); interpreter: a plain store."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.relaxed.sys.global.b64 [$1], $2; }"
            " mov.u32 $0, 0;",
            "=r,l,l,r",
            [ptrs, words, mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        tl.store(ptrs, words, mask=mask)


@triton.jit
def wait_tagged(ptrs, mask, tag, err_ptr, MAX_SPIN: tl.constexpr, ASM: tl.constexpr):
    """Poll the int64 words at `ptrs` (lanes with `mask`) until each carries `tag` in its
    high half; return them (masked-off lanes: 0). After MAX_SPIN polls give up and set
    `*err_ptr = 1`. CUDA: `ld.relaxed.sys` vector polls; interpreter: atomic reads."""
    v = _ld_tagged(ptrs, mask, ASM)
    behind = tl.sum((((v >> 32).to(tl.int32) != tag) & mask).to(tl.int32), axis=None)
    i = 0
    while (behind > 0) & (i < MAX_SPIN):
        v = _ld_tagged(ptrs, mask, ASM)
        behind = tl.sum((((v >> 32).to(tl.int32) != tag) & mask).to(tl.int32), axis=None)
        i += 1
    if behind > 0:
        tl.atomic_xchg(err_ptr, 1)
    return tl.where(mask, v, 0)


@triton.jit
def _ld_tagged(ptrs, mask, ASM: tl.constexpr):
    if ASM:
        v = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b64 $0, 0;"
            " @p ld.relaxed.sys.global.b64 $0, [$1]; }",
            "=l,l,r",
            [ptrs, mask.to(tl.int32)],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )
    else:
        v = tl.atomic_add(ptrs, 0, mask=mask, sem="relaxed", scope="sys")
    return v


@triton.jit
def signal_set(flag_ptr, value):
    """Publish this program's earlier stores, then store `value` into a peer's flag slot
    (one slot per sender program: a plain exchange, no contention with other senders)."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


@triton.jit
def ack_peers(table_ptr, byte_off, rank, value, R: tl.constexpr, R_PAD: tl.constexpr):
    """Store `value` into `ack[rank]` (int32 at `byte_off`) of every peer's buffer: one
    vector atomic, one lane per peer, so the R remote round trips overlap."""
    rr = tl.arange(0, R_PAD)
    base = tl.multiple_of(tl.load(table_ptr + rr, mask=rr < R, other=0), 16)
    ptrs = (base + byte_off).to(tl.pointer_type(tl.int32)) + rank
    tl.atomic_xchg(
        ptrs, tl.zeros([R_PAD], tl.int32) + value, mask=rr < R, sem="release", scope="sys"
    )


@triton.jit
def _ack_all(
    table_ptr, off_ack, rank, value, R: tl.constexpr, R_PAD: tl.constexpr, SYNC2: tl.constexpr
):  # fmt: skip
    """`ack[rank] = value` (release, system scope) in every peer's buffer at `off_ack`."""
    if SYNC2:
        ack_peers(table_ptr, off_ack, rank, value, R, R_PAD)
    else:
        for peer in range(R):
            ack = peer_ptr(table_ptr, peer, off_ack, tl.int32) + rank
            tl.atomic_xchg(ack, value, sem="release", scope="sys")


@triton.jit
def _ack_sources(
    epoch_ptr, epoch, table_ptr, off_ack, rank, R: tl.constexpr, R_PAD: tl.constexpr,
    SYNC2: tl.constexpr,
):  # fmt: skip
    _ack_all(table_ptr, off_ack, rank, epoch + 1, R, R_PAD, SYNC2)
    tl.store(epoch_ptr, epoch + 1)


@triton.jit
def send_owed_acks(
    table_ptr, state_ptr, off_disp_ack, off_comb_ack, rank, R: tl.constexpr,
    R_PAD: tl.constexpr, SYNC2: tl.constexpr,
):  # fmt: skip
    """The first program of every launch with ACK_NEXT: tell every peer how many dispatch
    and combine receives of this rank are complete (`ack[rank]` = the receive epochs,
    `state[0]` / `state[1]`, which an acker program moves on once its receive programs have
    read everything). The acks leave the end of the receive phase, where their
    system-scope release and round trip were the last thing each launch waited for, and
    overlap the next launch's work instead. Epochs only grow, so an ack sent twice (every
    launch sends both) changes nothing."""
    ed = tl.atomic_add(state_ptr, 0, sem="acquire", scope="gpu")
    ec = tl.atomic_add(state_ptr + 1, 0, sem="acquire", scope="gpu")
    _ack_all(table_ptr, off_disp_ack, rank, ed, R, R_PAD, SYNC2)
    _ack_all(table_ptr, off_comb_ack, rank, ec, R, R_PAD, SYNC2)


@triton.jit
def recv_program_done(
    done_ptr,
    num_programs,
    epoch_ptr,
    epoch,
    table_ptr,
    off_ack,
    rank,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    SYNC2: tl.constexpr,
    ACKER: tl.constexpr,
):
    """A receive-side program has read everything it needs from the receive buffer. With
    ACKER it adds 1 to the done counter (release; the result is not awaited, so its stores
    go on at once) and the launch's acker program acks the sources; without, the last of
    `num_programs` to finish has seen every program's reads and acks every source itself
    (`ack[rank] = epoch + 1` in each peer's buffer at `off_ack`) and moves this rank's
    epoch (`*epoch_ptr`) on: the done count's round trip and the ack's system-scope release
    then sit in that program, before its stores."""
    if ACKER:
        tl.debug_barrier()  # every thread's reads come before the one thread's add
        tl.atomic_add(done_ptr, 1, sem="release", scope="gpu")
    elif last_program_done(done_ptr, num_programs):
        _ack_sources(epoch_ptr, epoch, table_ptr, off_ack, rank, R, R_PAD, SYNC2)


@triton.jit
def acker_program(
    prof_ptr,
    done_ptr,
    num_programs,
    epoch_ptr,
    table_ptr,
    off_ack,
    rank,
    err_ptr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    SYNC2: tl.constexpr,
    MAX_SPIN: tl.constexpr,
    ASM: tl.constexpr,
    ACK_NEXT: tl.constexpr,
    PROF: tl.constexpr,
):
    """The last program of a receive launch with ACKER: wait until the `num_programs`
    receive programs of this call have counted themselves done (the counter only grows:
    `(epoch + 1) * num_programs`; acquire), then ack every source and move the epoch on
    (with ACK_NEXT only the epoch, with release: the next launch's first program sends the
    acks, `send_owed_acks`). Last in the grid, so the interpreter (programs in index
    order) finds every count in. Stamps 0 and 1 (PROF): its start and end."""
    stamp(prof_ptr, 0, PROF)
    epoch = tl.load(epoch_ptr)
    # The whole receive phase passes during this wait (the receive programs' own waits are
    # bounded by MAX_SPIN each): a wider bound, so the acker never gives up first.
    wait_one_ge(done_ptr, (epoch + 1) * num_programs, err_ptr, 4 * MAX_SPIN, ASM)
    if ACK_NEXT:
        tl.atomic_xchg(epoch_ptr, epoch + 1, sem="release", scope="gpu")
    else:
        _ack_sources(epoch_ptr, epoch, table_ptr, off_ack, rank, R, R_PAD, SYNC2)
    stamp(prof_ptr, 1, PROF)


@triton.jit
def signal_add(flag_ptr):
    """Publish this program's earlier stores, then add 1 to a peer's counter."""
    # The barrier orders every thread's stores before the one thread that signals.
    tl.debug_barrier()
    tl.atomic_add(flag_ptr, 1, sem="release", scope="sys")


@triton.jit
def last_program_done(counter_ptr, num_programs):
    """True in exactly one program: the last of `num_programs` to arrive; it resets the
    counter for the next launch."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = done == num_programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def stamp(prof_ptr, i, PROF: tl.constexpr):
    """Profiling only (PROF, CUDA): store the GPU's nanosecond clock (`%globaltimer`, one
    clock per GPU, not synchronised across GPUs) into `prof_ptr[i]`."""
    if PROF:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
        tl.store(prof_ptr + i, now)


@triton.jit
def spin_probe_kernel(flag_ptr, err_ptr, MAX_SPIN: tl.constexpr):
    """Polls a flag that never rises MAX_SPIN times: times one poll (interpreter calibration)."""
    wait_ge(flag_ptr, 1, err_ptr, MAX_SPIN)
