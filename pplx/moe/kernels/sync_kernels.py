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
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def peer_ptr(table_ptr, rank, byte_off, DTYPE: tl.constexpr):
    """Typed pointer to byte `byte_off` of rank `rank`'s buffer (as mapped in this process)."""
    # Buffers are 128-byte aligned and every region offset is a multiple of 16: telling the
    # compiler lets it emit 16-byte vector loads/stores (it cannot see a loaded address).
    base = tl.multiple_of(tl.load(table_ptr + rank), 16)
    return (base + byte_off).to(tl.pointer_type(DTYPE))


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
def spin_probe_kernel(flag_ptr, err_ptr, MAX_SPIN: tl.constexpr):
    """Polls a flag that never rises MAX_SPIN times: times one poll (interpreter calibration)."""
    wait_ge(flag_ptr, 1, err_ptr, MAX_SPIN)
