"""HostProxy: a C thread that posts TransferEngine writes described in a ring of work items.

A producer (a GPU kernel through host-mapped pinned memory, CPU code, Python) puts 64-byte
items into the ring; the proxy thread (native/src/proxy.c) posts each as a write or an
immediate from one local region to one of a table of peer descriptors. Receivers see the
data through the engine's ImmCounter ("when imm X arrived N times store V at F"), which a
kernel can poll in host-mapped memory. Ring protocol (also in native/include/pplx_proxy.h):

    ticket t -> slot t % num_slots; wait until t - counters[CONSUMED] < num_slots;
    write words 1..7; store word 0 (seq) = t + 1 LAST (release; x86 stores are ordered).

Item words (`[num_slots, 8]` torch.int64 view `ring`): 0 seq, 1 op | dst << 32,
2 src_offset, 3 dst_offset, 4 len, 5 imm | has_imm << 32, 6-7 reserved. A tagged ring
(`tagged=True`) also carries `tag(t) << 56` in words 1..5 (`ticket_tag`), so that a producer
may store the words in any order with no fence (a GPU saves its system-scope release).

Example::

    proxy = HostProxy(engine, send_mr, [peer_desc])
    proxy.submit(0, src_offset=0, dst_offset=0, nbytes=4096, imm=7)
    proxy.wait(1)                                # sender completion of 1 item
    proxy.close()

Warning: close the proxy before its engine (`InterNodeAllToAll.destroy` does): the thread
posts on the engine until `close()`; a proxy that is garbage-collected is closed then.

Warning: one producer per proxy: `submit` (C, the fast path) and `put` (the ring written
from Python, as a GPU kernel would) keep separate tickets; use one of them per proxy.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from pplx._ffi import InvalidArgument, check, ffi, lib
from pplx.fabric.descriptor import MrDescriptor
from pplx.fabric.engine import DEFAULT_TIMEOUT_S, MemoryRegion, TransferEngine, _timeout_us

OP_NOP, OP_WRITE, OP_IMM = 0, 1, 2
CONSUMED, COMPLETED, FAILED, ERROR = 0, 1, 2, 3
ITEM_WORDS = 8  # 64 bytes
FLAG_DRIVE, FLAG_TAGGED = 1, 2  # enum pplx_proxy_flag
TAG_SHIFT = 56


def ticket_tag(ticket: int, num_slots: int) -> int:
    """The tag of ticket `ticket` in a tagged ring, already shifted into the top byte."""
    return ((ticket // num_slots) % 255 + 1) << TAG_SHIFT


class HostProxy:
    """A C proxy thread posting writes from `src_mr` to `dsts[i]` (item field `dst = i`).

    Args:
        engine: the engine to post on (its calls are thread-safe).
        src_mr: the local region every write reads from.
        dsts: peer descriptors (None entries: items naming them fail).
        num_slots: ring entries, a power of two.
        ring: `[num_slots * 8]` torch.int64 zeroed host tensor to hold the ring (pin it so a
            GPU kernel can write it through UVA), or None for proxy-allocated memory.
        idle_spin_us, idle_sleep_us: after the last item the thread spins idle_spin_us, then
            naps idle_sleep_us per round (0: spin forever, lowest latency, a core busy).
        drive_progress: wait for items inside the engine's wait, driving its progress from
            the proxy thread (the engine's progress thread steps aside, so posts never wait
            for the engine lock). Lowest latency; the thread spins while work may come.
        tagged: a tagged ring (module docstring): every producer tags words 1..5
            (`submit` and `put` do; GPU kernels with `PUBLISH_TAGGED`).
    """

    def __init__(
        self,
        engine: TransferEngine,
        src_mr: MemoryRegion,
        dsts: Sequence[MrDescriptor | None],
        *,
        num_slots: int = 1024,
        ring: torch.Tensor | None = None,
        idle_spin_us: int = 200,
        idle_sleep_us: int = 20,
        drive_progress: bool = False,
        tagged: bool = False,
    ) -> None:
        if num_slots < 2 or num_slots & (num_slots - 1):
            raise InvalidArgument(f"num_slots must be a power of two >= 2, got {num_slots}")
        self._engine = engine
        self._rdescs = [None if d is None else engine._rdesc(d) for d in dsts]
        arr = ffi.new(
            "struct pplx_rdesc *[]",
            [h if h is not None else ffi.NULL for h in self._rdescs] or [ffi.NULL],
        )
        ring_ptr = ffi.NULL
        if ring is not None:
            if ring.dtype != torch.int64 or ring.numel() != num_slots * ITEM_WORDS:
                raise InvalidArgument(
                    f"ring must be a [{num_slots * ITEM_WORDS}] torch.int64 tensor, got "
                    f"{ring.dtype}{tuple(ring.shape)}"
                )
            if ring.device.type != "cpu" or not ring.is_contiguous():
                raise InvalidArgument("ring must be a contiguous host tensor (pinned for a GPU)")
            ring_ptr = ffi.cast("void *", ring.data_ptr())
        out = ffi.new("struct pplx_proxy **")
        check(
            lib.pplx_proxy_create(
                engine._handle(),
                src_mr._handle(),
                len(self._rdescs),
                arr,
                ring_ptr,
                num_slots,
                idle_spin_us,
                idle_sleep_us,
                (FLAG_DRIVE if drive_progress else 0) | (FLAG_TAGGED if tagged else 0),
                out,
            ),
            "HostProxy",
        )
        self._h = out[0]
        # Stops the thread if the object is collected without close() (the engine, which
        # this object references, is still alive then).
        self._finalizer = weakref.finalize(self, lib.pplx_proxy_destroy, out[0], 5_000_000)
        self._ring_owner = ring
        self.tagged = bool(tagged)
        self.drive_progress = bool(drive_progress)
        items, n, ctrs = (
            ffi.new("struct pplx_proxy_item **"),
            ffi.new("uint32_t *"),
            ffi.new("uint64_t **"),
        )
        check(lib.pplx_proxy_ring(self._h, items, n, ctrs), "HostProxy.ring")
        self.num_slots = int(n[0])
        self.ring_ptr = int(ffi.cast("uintptr_t", items[0]))
        self.counters_ptr = int(ffi.cast("uintptr_t", ctrs[0]))
        self.ring = torch.frombuffer(
            ffi.buffer(items[0], self.num_slots * 64), dtype=torch.int64
        ).view(self.num_slots, ITEM_WORDS)
        self.counters = torch.frombuffer(ffi.buffer(ctrs[0], 64), dtype=torch.int64)
        self._ring_np = self.ring.numpy()
        self._ctr_np = self.counters.numpy()
        self._item = ffi.new("struct pplx_proxy_item *")
        self._put_ticket = 0
        self.submitted = 0

    def _handle(self):
        if self._h is None:
            raise InvalidArgument("HostProxy is closed")
        return self._h

    # ---- producers ----
    def submit(
        self,
        dst: int,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        nbytes: int = 0,
        imm: int | None = None,
        op: int = OP_WRITE,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> int:
        """Put one item through the C producer (waits for a free slot); returns its ticket."""
        it = self._item
        it.op, it.dst = op, dst
        it.src_offset, it.dst_offset, it.len = src_offset, dst_offset, nbytes
        it.imm, it.has_imm = (0, 0) if imm is None else (imm, 1)
        t = check(lib.pplx_proxy_submit(self._handle(), it, _timeout_us(timeout)), "submit")
        self.submitted += 1
        return t

    def put(
        self,
        dst: int,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        nbytes: int = 0,
        imm: int | None = None,
        op: int = OP_WRITE,
    ) -> int:
        """Put one item by writing the ring from Python, word by word, seq last (what a GPU
        kernel does with a release store). Raises TryAgain-like InvalidArgument when full."""
        t = self._put_ticket
        if t - int(self._ctr_np[CONSUMED]) >= self.num_slots:
            raise InvalidArgument(f"ring full: ticket {t}, consumed {int(self._ctr_np[CONSUMED])}")
        tag = ticket_tag(t, self.num_slots) if self.tagged else 0
        if tag and (dst >= 1 << 24 or max(src_offset, dst_offset, nbytes) >= 1 << TAG_SHIFT):
            raise InvalidArgument("tagged ring: dst < 2^24, offsets and nbytes < 2^56")
        words = [
            op | (dst << 32),
            src_offset,
            dst_offset,
            nbytes,
            0 if imm is None else (imm | (1 << 32)),
        ]
        row = self._ring_np[t % self.num_slots]
        # int64 storage: a tag in the top byte makes the word negative.
        row[1:6] = np.array([w | tag for w in words], dtype=np.uint64).view(np.int64)
        row[0] = t + 1  # last: the proxy takes the item once it sees seq == t + 1
        self._put_ticket = t + 1
        self.submitted += 1
        return t

    # ---- completion ----
    @property
    def consumed(self) -> int:
        return int(self._ctr_np[CONSUMED])

    @property
    def completed(self) -> int:
        return int(self._ctr_np[COMPLETED])

    @property
    def failed(self) -> int:
        return int(self._ctr_np[FAILED])

    def wait(self, n: int | None = None, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        """Wait until `n` items (default: every item put so far) completed; TransferFailed if
        any failed, FabricTimeout after `timeout` seconds. Releases the GIL."""
        n = self.submitted if n is None else n
        check(lib.pplx_proxy_wait(self._handle(), n, _timeout_us(timeout)), "HostProxy.wait")

    def roundtrip_ns(
        self,
        receiver: TransferEngine,
        dst: int,
        nbytes: int,
        imm: int,
        iters: int,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> np.ndarray:
        """`[iters]` ns of producer -> proxy -> write -> imm -> trigger flag, measured by a C
        producer on this thread (`receiver` owns `dsts[dst]`)."""
        flag = np.zeros(1, dtype=np.uint64)
        out = np.zeros(iters, dtype=np.uint64)
        check(
            lib.pplx_proxy_bench_roundtrip(
                self._handle(),
                receiver._handle(),
                dst,
                nbytes,
                imm,
                ffi.cast("uint64_t *", flag.ctypes.data),
                iters,
                ffi.cast("uint64_t *", out.ctypes.data),
                _timeout_us(timeout),
            ),
            "roundtrip",
        )
        self.submitted += iters
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, wait up to `timeout` for in-flight ops. Idempotent."""
        if self._h is None:
            return
        h, self._h = self._h, None
        self._finalizer.detach()
        lib.pplx_proxy_destroy(h, int(timeout * 1e6))
        self._ring_np = self._ctr_np = None
        self.ring = self.counters = None

    def __enter__(self) -> HostProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_echo(
    ping: torch.Tensor,
    pong: torch.Tensor,
    first: int,
    iters: int,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> None:
    """PCIe ping-pong partner (`pplx_proxy_bench_echo`): for v = first .. first + iters - 1,
    wait until `ping[0] >= v`, then store v into `pong[0]`; releases the GIL (run it on a
    thread beside a kernel that pings). `ping`, `pong`: host int64 tensors."""
    for t in (ping, pong):
        if t.dtype != torch.int64 or t.device.type != "cpu" or t.numel() < 1:
            raise InvalidArgument("bench_echo: ping and pong must be host int64 tensors")
    check(
        lib.pplx_proxy_bench_echo(
            ffi.cast("uint64_t *", ping.data_ptr()),
            ffi.cast("uint64_t *", pong.data_ptr()),
            first,
            iters,
            _timeout_us(timeout),
        ),
        "bench_echo",
    )


class ProxyPoster:
    """The inter-node protocol's poster (`pplx.moe.internode`) through a HostProxy."""

    name = "proxy"

    def __init__(self, proxy: HostProxy):
        self.proxy = proxy
        self.base = proxy.submitted

    def write(self, dst: int, src_off: int, dst_off: int, nbytes: int, imm: int) -> None:
        self.proxy.submit(dst, src_offset=src_off, dst_offset=dst_off, nbytes=nbytes, imm=imm)

    def scatter(self, dsts: list[int], src_off: int, dst_off: int, nbytes: int, imm: int) -> None:
        for d in dsts:
            self.write(d, src_off, dst_off, nbytes, imm)

    def imm(self, dst: int, imm: int) -> None:
        self.proxy.submit(dst, imm=imm, op=OP_IMM)

    def wait_all(self, timeout: float) -> None:
        self.proxy.wait(self.proxy.submitted, timeout)

    def close(self) -> None:
        pass
