"""TransferEngine: one-sided writes with 32-bit immediates over libfabric (pplx-garden's API).

One engine per process (per GPU on a cluster). It owns `num_domains` libfabric domains
(NICs; on shm/tcp, endpoints standing for NICs) and one C progress thread. Writes go from a
local `MemoryRegion` to a peer's `MrDescriptor`; the receiver counts arrivals per immediate
(`imm_counter(imm).wait(n)`), never looking at the data, so the same code is correct on
ordered (ConnectX RC) and unordered (EFA SRD) fabrics.

Example (two processes; exchange descriptors with `pplx.fabric.bootstrap`)::

    with TransferEngine("shm") as engine:
        mr, desc = engine.register_tensor(buf)        # [N] torch.uint8, host memory
        peer_desc = exchange(desc)                    # the peer's MrDescriptor
        engine.submit_write(mr, peer_desc, 4096, imm=7).wait()
        engine.imm_counter(7).wait(1)                 # on the peer: one arrival of imm 7

Every `submit_*` returns a `TransferRequest` (sender completion; `.wait(timeout)`) and takes
optional pplx-garden style callbacks `on_done()` / `on_error(exc)`, run on a Python thread
("pplx-callbacks"), never on the C progress thread.

Warning: MemoryRegions, descriptors imported into this engine, and `imm_table()` views are
valid until `close()`; close() unregisters every region of the engine.
Warning: on shm, do not write to an engine of the same process after closing it (libfabric
shm shares the peer's mapping within a process and faults); peers in other processes may die.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pplx._ffi import (
    EngineClosed,
    FabricError,
    InvalidArgument,
    TryAgain,
    check,
    ffi,
    lib,
)
from pplx.fabric.descriptor import MrDescriptor

DEFAULT_TIMEOUT_S = 30.0
FAULTS_ENV = "PPLX_FABRIC_FAULTS"


def _timeout_us(timeout: float | None) -> int:
    if timeout is None:
        return -1
    if timeout < 0:
        raise InvalidArgument(f"timeout must be >= 0 seconds or None, got {timeout}")
    return int(timeout * 1e6)


def _check_int(name: str, value: int, lo: int, hi: int) -> int:
    if type(value) is int and lo <= value < hi:  # the hot path: one type check, one range
        return value
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value < hi:
        raise InvalidArgument(f"{name} must be in [{lo}, {hi}), got {value}")
    return int(value)


def _imm(imm: int) -> int:
    return _check_int("imm", imm, 0, 1 << 32)


@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """Hold up to `window` arriving immediates; release each after 0..`max_delay_us`
    microseconds, in random (seeded) order: EFA-like late and unordered completion."""

    window: int = 16
    max_delay_us: int = 200
    seed: int = 1

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        """`PPLX_FABRIC_FAULTS=window:max_delay_us:seed` turns it on for every engine."""
        spec = os.environ.get(FAULTS_ENV, "")
        if not spec:
            return None
        try:
            parts = [int(p) for p in spec.split(":")]
            return cls(*parts)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"{FAULTS_ENV}={spec!r}: expected 'window[:max_delay_us[:seed]]' integers"
            ) from exc


@dataclasses.dataclass(frozen=True)
class ScatterDst:
    """One destination of `submit_scatter`: `length` bytes from the source region at
    `src_offset` to `dst` at `dst_offset`."""

    dst: MrDescriptor
    length: int
    src_offset: int = 0
    dst_offset: int = 0


class TransferRequest:
    """Sender-side completion of one submission: counters of its libfabric operations.

    Complete means libfabric completed every operation at the sender: the source bytes
    may be reused. It does not prove delivery (tcp completes at transmit); the receiver
    learns that the data is in place from its immediate count (`ImmCounter`)."""

    def __init__(self, handle):
        self._h = handle

    def counts(self) -> tuple[int, int, int, int]:
        """(total ops, done, failed, first error code)."""
        total, done, failed = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        err = ffi.new("int *")
        lib.pplx_req_counts(self._h, total, done, failed, err)
        return total[0], done[0], failed[0], err[0]

    @property
    def done(self) -> bool:
        """True once every operation completed (successfully or not)."""
        total, done, failed, _ = self.counts()
        return done + failed == total

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        """Wait until every operation completed; raise TransferFailed if any failed,
        FabricTimeout after `timeout` seconds (None: forever). Releases the GIL."""
        check(lib.pplx_req_wait(self._h, _timeout_us(timeout)), "TransferRequest.wait")


class MemoryRegion:
    """A region registered on every domain of an engine. Obtain from `register_*`."""

    def __init__(self, engine: TransferEngine, handle, ptr: int, nbytes: int, device, owner):
        self._engine = engine
        self._h = handle
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device
        self._owner = owner  # keeps a registered tensor alive

    @property
    def registered(self) -> bool:
        return self._h is not None

    def _handle(self):
        if self._h is None:
            raise EngineClosed(
                f"memory region at {self.ptr:#x} ({self.nbytes} bytes) was unregistered"
            )
        return self._h

    def __repr__(self) -> str:
        state = "registered" if self._h is not None else "unregistered"
        return f"MemoryRegion(ptr={self.ptr:#x}, nbytes={self.nbytes}, {state})"


class ImmCounter:
    """Arrival count of one immediate at this engine."""

    def __init__(self, engine: TransferEngine, imm: int):
        self._engine = engine
        self.imm = imm

    @property
    def count(self) -> int:
        return check(lib.pplx_imm_count(self._engine._handle(), self.imm), "ImmCounter.count")

    def wait(
        self, n: int, timeout: float | None = DEFAULT_TIMEOUT_S, consume: bool = False
    ) -> None:
        """Wait until the immediate arrived at least `n` times; with `consume`, subtract `n`
        (so the next round waits for `n` again). FabricTimeout after `timeout` seconds."""
        n = _check_int("n", n, 0, 1 << 63)
        check(
            lib.pplx_imm_wait(self._engine._handle(), self.imm, n, consume, _timeout_us(timeout)),
            f"ImmCounter({self.imm}).wait({n})",
        )

    def consume(self, n: int) -> None:
        """Subtract `n` arrivals (at most the current count)."""
        n = _check_int("n", n, 0, 1 << 63)
        check(lib.pplx_imm_consume(self._engine._handle(), self.imm, n), "ImmCounter.consume")


class ImmExpectation:
    """A trigger: when the immediate has arrived `n` times, the engine's progress thread
    stores `value` to the 64-bit word `flag_ptr` (a GPU kernel may poll it)."""

    def __init__(self, engine: TransferEngine, imm: int, n: int, flag_ptr: int, value: int, keep):
        self._engine = engine
        self.imm, self.n, self.flag_ptr, self.value = imm, n, flag_ptr, value
        self._keep = keep

    @property
    def done(self) -> bool:
        return int(ffi.cast("uint64_t *", self.flag_ptr)[0]) == self.value

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        """Wait until the flag holds `value`; FabricTimeout after `timeout` seconds."""
        check(
            lib.pplx_wait_u64(
                self._engine._handle(),
                ffi.cast("uint64_t *", self.flag_ptr),
                self.value,
                _timeout_us(timeout),
            ),
            f"imm {self.imm}: expecting {self.n} arrivals",
        )


class RecvHandle:
    """Background receiver started by `submit_recvs`; callbacks run on its Python thread."""

    def __init__(self, thread: threading.Thread, errors: list[BaseException]):
        self._thread = thread
        self._errors = errors

    def join(self, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        self._thread.join(timeout)
        if self._errors:
            raise self._errors[0]
        if self._thread.is_alive():
            raise TimeoutError(f"submit_recvs: receiver still running after {timeout} s")


class _CallbackThread:
    """Runs `on_done` / `on_error` of requests on a Python thread, never on the C progress
    thread: it blocks in C (GIL released) on the oldest request for up to 1 ms at a time.
    A callback's exception is kept and re-raised by `TransferEngine.close()`."""

    def __init__(self, engine: TransferEngine):
        self._engine = engine
        self._items: list[tuple[TransferRequest, Callable | None, Callable | None]] = []
        self._lock = threading.Lock()
        self.c_lock = threading.Lock()  # held around C waits; close() takes it to destroy
        self._wake = threading.Event()
        self._stopping = False
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="pplx-callbacks", daemon=True)
        self._thread.start()

    def add(self, req: TransferRequest, on_done, on_error) -> None:
        with self._lock:
            self._items.append((req, on_done, on_error))
        self._wake.set()

    def _run(self, req: TransferRequest, on_done, on_error) -> None:
        try:
            try:
                req.wait(timeout=0)
            except FabricError as exc:
                if on_error is not None:
                    on_error(exc)
                return
            if on_done is not None:
                on_done()
        except BaseException as exc:  # noqa: BLE001 - re-raised by close()
            self.errors.append(exc)

    def _loop(self) -> None:
        while True:
            with self._lock:
                items = list(self._items)
            if not items:
                if self._stopping:
                    return
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            ready = [it for it in items if it[0].done]
            if ready:
                with self._lock:
                    for it in ready:
                        self._items.remove(it)
                for it in ready:
                    self._run(*it)
                continue
            with self.c_lock:
                if self._engine._h is not None:
                    lib.pplx_req_wait(items[0][0]._h, 1000)  # rc ignored: polled above
                    continue
            time.sleep(1e-3)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=DEFAULT_TIMEOUT_S)
        if self.errors:
            raise self.errors[0]


class TransferEngine:
    """RDMA-write engine over a libfabric provider.

    Args:
        provider: "shm" (one host), "tcp" (tcp;ofi_rxm), "efa", "verbs" (verbs;ofi_rxm), or
            a libfabric provider string. ProviderNotFound if absent.
        num_domains: NICs per engine (1..16); writes of at least `shard_threshold` bytes are
            split over all of them, one immediate per shard (see `num_shards`). Peers must
            use the same value.
        fault_injection: hold and reorder arriving immediates (testing); None reads
            `PPLX_FABRIC_FAULTS` ("window:max_delay_us:seed"), unset means off.
        node: source address for the provider (e.g. "127.0.0.1" for tcp on loopback).
        imm_table_size: immediates must be below this (the ImmCounter table's length).
        msg_size, num_send_slots, num_recv_slots: two-sided message slots.
        spin_us, sleep_us: the progress thread spins `spin_us` after each event or
            submission, then naps `sleep_us`, doubling per idle nap up to 250 us (sleep_us 0:
            spin forever, one core busy). Waits spin `spin_us` past their last progress,
            driving progress themselves while the progress thread steps aside.
        busy_poll_us: past `spin_us`, while writes or sends are in flight or a thread waits,
            the progress thread keeps polling (yielding the core between polls) this long
            after the last event before it naps; 0: nap at once (see pplx_fabric.h).
        aside_us: while a waiter spins (driving progress itself), and this long after one
            succeeded, the progress thread naps `aside_us` at a time instead of polling; 0:
            never step aside (it polls beside the waiter and competes for the lock).
        inflight_spin_us: while this engine's own writes or sends are outstanding, waits
            keep spinning (yielding the core) this long without progress instead of
            `spin_us`: their completion is coming (shm: when the target has copied a large
            write), and a sleeping waiter hears of it late; 0: `spin_us` always.
        hmem: ask for FI_HMEM so CUDA memory registers directly (needs a CUDA-enabled
            libfabric, as the AWS EFA installer's).
    """

    def __init__(
        self,
        provider: str = "shm",
        num_domains: int = 1,
        fault_injection: FaultInjection | None = None,
        *,
        node: str | None = None,
        imm_table_size: int = 1 << 16,
        shard_threshold: int = 1 << 20,
        msg_size: int = 8192,
        num_send_slots: int = 64,
        num_recv_slots: int = 64,
        spin_us: int = 1000,
        sleep_us: int = 20,
        busy_poll_us: int = 0,
        aside_us: int = 1000,
        inflight_spin_us: int = 20000,
        hmem: bool = False,
    ):
        if not isinstance(provider, str) or not provider:
            raise InvalidArgument(f"provider must be a non-empty str, got {provider!r}")
        if fault_injection is None:
            fault_injection = FaultInjection.from_env()
        cfg = ffi.new("struct pplx_engine_config *")
        lib.pplx_engine_config_init(cfg)
        keep = [ffi.new("char[]", provider.encode())]
        cfg.provider = keep[0]
        if node is not None:
            keep.append(ffi.new("char[]", node.encode()))
            cfg.node = keep[-1]
        cfg.num_domains = _check_int("num_domains", num_domains, 1, 17)
        cfg.imm_table_size = _check_int("imm_table_size", imm_table_size, 1, 1 << 32)
        cfg.shard_threshold = _check_int("shard_threshold", shard_threshold, 1, 1 << 63)
        cfg.msg_size = _check_int("msg_size", msg_size, 1, 1 << 32)
        cfg.num_send_slots = _check_int("num_send_slots", num_send_slots, 0, 1 << 20)
        cfg.num_recv_slots = _check_int("num_recv_slots", num_recv_slots, 0, 1 << 20)
        cfg.spin_us = _check_int("spin_us", spin_us, 0, 1 << 32)
        cfg.sleep_us = _check_int("sleep_us", sleep_us, 0, 1 << 20)
        cfg.busy_poll_us = _check_int("busy_poll_us", busy_poll_us, 0, 1 << 32)
        cfg.aside_us = _check_int("aside_us", aside_us, 0, 1 << 32)
        cfg.inflight_spin_us = _check_int("inflight_spin_us", inflight_spin_us, 0, 1 << 32)
        cfg.hmem = bool(hmem)
        if fault_injection is not None:
            cfg.fault_window = _check_int(
                "fault_injection.window", fault_injection.window, 0, 1 << 20
            )
            cfg.fault_max_delay_us = _check_int(
                "fault_injection.max_delay_us", fault_injection.max_delay_us, 0, 1 << 32
            )
            cfg.fault_seed = _check_int("fault_injection.seed", fault_injection.seed, 0, 1 << 64)
        out = ffi.new("struct pplx_engine **")
        check(lib.pplx_engine_create(cfg, out), f"TransferEngine(provider={provider!r})")
        self._h = ffi.gc(out[0], lib.pplx_engine_destroy)
        self.fault_injection = fault_injection
        self.msg_size = msg_size
        self.shard_threshold = shard_threshold
        self.imm_table_size = imm_table_size
        self._regions: dict[int, MemoryRegion] = {}
        self._rdescs: dict[MrDescriptor, object] = {}
        self._last_dst: MrDescriptor | None = None  # _rdesc's one-entry identity cache
        self._last_dh = None
        self._peers: dict[bytes, int] = {}
        self._cb: _CallbackThread | None = None
        n = lib.pplx_engine_address_len(self._h)
        buf = ffi.new("uint8_t[]", n)
        size = ffi.new("size_t *", n)
        check(lib.pplx_engine_address(self._h, buf, size), "engine address")
        self._main_address = bytes(ffi.buffer(buf, size[0]))
        self._provider = ffi.string(lib.pplx_engine_provider(self._h)).decode()
        self._num_domains = num_domains

    # ---- identity ----
    @property
    def main_address(self) -> bytes:
        """This engine's address (every domain's endpoint name); peers send to it."""
        return self._main_address

    @property
    def num_domains(self) -> int:
        return self._num_domains

    @property
    def provider(self) -> str:
        """The libfabric provider in use, e.g. "tcp;ofi_rxm"."""
        return self._provider

    @property
    def peer_watch(self) -> int:
        """0: peers' processes are not watched (tcp, efa, ...); 1: on shm, a peer process that
        exits fails the operations to it (PeerDead) at once; 2: that, and a shm region lock the
        dead process left held is released (libfabric 1.17's shm; see native/src/peers.c)."""
        return lib.pplx_engine_peer_watch(self._handle())

    @property
    def closed(self) -> bool:
        return self._h is None

    def _handle(self):
        if self._h is None:
            raise EngineClosed("TransferEngine is closed")
        return self._h

    def num_shards(self, nbytes: int) -> int:
        """Arrivals of the immediate that one `submit_write` of `nbytes` produces."""
        return lib.pplx_engine_num_shards(self._handle(), nbytes)

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct pplx_engine_stats *")
        check(lib.pplx_engine_stats(self._handle(), s), "stats")
        return {f: getattr(s, f) for f, _ in ffi.typeof("struct pplx_engine_stats").fields}

    # ---- memory ----
    def register_memory(
        self, ptr: int, nbytes: int, device: str | torch.device = "cpu"
    ) -> tuple[MemoryRegion, MrDescriptor]:
        """Register `nbytes` at address `ptr` (host, or CUDA with an FI_HMEM libfabric)."""
        return self._register(ptr, nbytes, torch.device(device), owner=None)

    def register_tensor(self, t: torch.Tensor) -> tuple[MemoryRegion, MrDescriptor]:
        """Register a contiguous tensor's storage; the region keeps the tensor alive.

        Raises HmemNotSupported for a CUDA tensor where libfabric lacks FI_HMEM (the Debian
        and Ubuntu builds): stage it through pinned host memory (`pplx.fabric.staging`).
        """
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(f"register_tensor: t must be a torch.Tensor, got {type(t)}")
        if not t.is_contiguous():
            raise InvalidArgument("register_tensor: t must be contiguous")
        return self._register(t.data_ptr(), t.numel() * t.element_size(), t.device, owner=t)

    def _register(self, ptr: int, nbytes: int, device: torch.device, owner):
        ptr = _check_int("ptr", ptr, 1, 1 << 64)
        nbytes = _check_int("nbytes", nbytes, 1, 1 << 63)
        if device.type == "cpu":
            kind, index = lib.PPLX_DEVICE_HOST, 0
        elif device.type == "cuda":
            kind, index = lib.PPLX_DEVICE_CUDA, device.index or 0
        else:
            raise InvalidArgument(f"device must be cpu or cuda, got {device}")
        out = ffi.new("struct pplx_mr **")
        check(
            lib.pplx_mr_reg(self._handle(), ffi.cast("void *", ptr), nbytes, kind, index, out),
            f"register {nbytes} bytes at {ptr:#x} on {device}",
        )
        h = ffi.gc(out[0], lib.pplx_mr_dereg)
        mr = MemoryRegion(self, h, ptr, nbytes, device, owner)
        self._regions[id(mr)] = mr
        a, k = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        remote = []
        for d in range(self._num_domains):
            check(lib.pplx_mr_remote(h, d, a, k), "descriptor")
            remote.append((a[0], k[0]))
        return mr, MrDescriptor(self._main_address, ptr, nbytes, tuple(remote))

    def unregister_memory(self, mr: MemoryRegion) -> None:
        """Unregister; ops in flight finish first, new ones from `mr` raise EngineClosed."""
        if not isinstance(mr, MemoryRegion):
            raise InvalidArgument(f"unregister_memory: expected a MemoryRegion, got {type(mr)}")
        if mr._h is None:
            return
        self._regions.pop(id(mr), None)
        ffi.release(mr._h)
        mr._h = None
        mr._owner = None

    def _rdesc(self, d: MrDescriptor):
        """The imported handle of a remote descriptor (imported once per descriptor)."""
        # The last descriptor asked for, by identity: skips the dataclass hash on the hot
        # path of every submit_* (a caller usually writes to one peer buffer many times).
        if d is self._last_dst and d is not None:
            return self._last_dh
        h = self._rdescs.get(d)
        if h is not None:
            self._last_dst, self._last_dh = d, h
            return h
        if not isinstance(d, MrDescriptor):
            raise InvalidArgument(f"expected an MrDescriptor, got {type(d).__name__}")
        addrs = ffi.new("uint64_t[]", [a for a, _ in d.remote])
        keys = ffi.new("uint64_t[]", [k for _, k in d.remote])
        out = ffi.new("struct pplx_rdesc **")
        check(
            lib.pplx_rdesc_import(
                self._handle(),
                d.address,
                len(d.address),
                d.ptr,
                d.nbytes,
                d.num_domains,
                addrs,
                keys,
                out,
            ),
            "import descriptor",
        )
        h = ffi.gc(out[0], lib.pplx_rdesc_free)
        self._rdescs[d] = h
        self._last_dst, self._last_dh = d, h
        return h

    # ---- writes ----
    def _req(self, rc: int, out, what: str, on_done=None, on_error=None) -> TransferRequest:
        check(rc, what)
        req = TransferRequest(ffi.gc(out[0], lib.pplx_req_release))
        if on_done is not None or on_error is not None:
            self._callbacks().add(req, on_done, on_error)
        return req

    def _callbacks(self) -> _CallbackThread:
        if self._cb is None:
            self._cb = _CallbackThread(self)
        return self._cb

    def submit_write(
        self,
        src_mr: MemoryRegion,
        dst_mr: MrDescriptor,
        length: int | None = None,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        imm: int | None = None,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[FabricError], None] | None = None,
    ) -> TransferRequest:
        """Write `length` bytes (default: the rest of the source region) from `src_mr` at
        `src_offset` to `dst_mr` at `dst_offset`; with `imm`, the receiver counts
        `num_shards(length)` arrivals of it once the data is in place."""
        h = self._handle()
        src_h = src_mr._handle() if type(src_mr) is MemoryRegion else None
        if src_h is None:
            raise InvalidArgument(f"src_mr must be a MemoryRegion, got {type(src_mr).__name__}")
        # The hot path (8 B writes cost ~2 us of Python here): plain ints in range pass
        # with one type check and one comparison each; anything else goes through
        # _check_int for its error message. The C side checks every range again.
        if not (type(src_offset) is int and 0 <= src_offset < 1 << 64):
            src_offset = _check_int("src_offset", src_offset, 0, 1 << 64)
        if not (type(dst_offset) is int and 0 <= dst_offset < 1 << 64):
            dst_offset = _check_int("dst_offset", dst_offset, 0, 1 << 64)
        if length is None:
            length = max(0, src_mr.nbytes - src_offset)
        elif not (type(length) is int and 0 <= length < 1 << 64):
            length = _check_int("length", length, 0, 1 << 64)
        if imm is None:
            has_imm, imm_v = 0, 0
        elif type(imm) is int and 0 <= imm < 1 << 32:
            has_imm, imm_v = 1, imm
        else:
            has_imm, imm_v = 1, _imm(imm)
        dh = self._rdesc(dst_mr)
        out = ffi.new("struct pplx_req **")
        rc = lib.pplx_write(h, src_h, src_offset, dh, dst_offset, length, has_imm, imm_v, out)
        if rc < 0:
            check(rc, "submit_write")
        req = TransferRequest(ffi.gc(out[0], lib.pplx_req_release))
        if on_done is not None or on_error is not None:
            self._callbacks().add(req, on_done, on_error)
        return req

    def submit_imm(
        self,
        imm: int,
        dst_mr: MrDescriptor,
        *,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[FabricError], None] | None = None,
    ) -> TransferRequest:
        """An immediate with no data (a zero-byte write to `dst_mr`'s owner)."""
        out = ffi.new("struct pplx_req **")
        rc = lib.pplx_write_imm(self._handle(), self._rdesc(dst_mr), _imm(imm), out)
        return self._req(rc, out, "submit_imm", on_done, on_error)

    def submit_barrier(
        self,
        imm: int,
        dst_mrs: Sequence[MrDescriptor],
        *,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[FabricError], None] | None = None,
    ) -> TransferRequest:
        """`imm` to each descriptor's owner (one per peer); each peer waits for
        `len(peers)` arrivals of `imm`."""
        hs = [self._rdesc(d) for d in dst_mrs]
        arr = ffi.new("struct pplx_rdesc *[]", hs)
        out = ffi.new("struct pplx_req **")
        rc = lib.pplx_barrier(self._handle(), len(hs), arr, _imm(imm), out)
        return self._req(rc, out, "submit_barrier", on_done, on_error)

    def submit_paged_writes(
        self,
        page_len: int,
        src_mr: MemoryRegion,
        src_page_indices: Sequence[int] | np.ndarray | torch.Tensor,
        src_stride: int,
        dst_mr: MrDescriptor,
        dst_page_indices: Sequence[int] | np.ndarray | torch.Tensor,
        dst_stride: int,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        imm: int | None = None,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[FabricError], None] | None = None,
    ) -> TransferRequest:
        """Copy pages: page i moves `page_len` bytes from
        `src_offset + src_page_indices[i] * src_stride` to
        `dst_offset + dst_page_indices[i] * dst_stride` (KV-cache layout: stride may
        exceed page_len). With `imm`, every page carries it: the receiver expects
        `len(src_page_indices)` arrivals.

        `src_page_indices`, `dst_page_indices`: `[P]` integers in [0, 2**32).
        """
        src = self._indices("src_page_indices", src_page_indices)
        dst = self._indices("dst_page_indices", dst_page_indices)
        if len(src) != len(dst):
            raise InvalidArgument(
                f"src_page_indices has {len(src)} pages, dst_page_indices {len(dst)}: "
                "they must match"
            )
        out = ffi.new("struct pplx_req **")
        rc = lib.pplx_write_paged(
            self._handle(),
            src_mr._handle(),
            self._rdesc(dst_mr),
            len(src),
            ffi.from_buffer("uint32_t[]", src),
            ffi.from_buffer("uint32_t[]", dst),
            _check_int("page_len", page_len, 0, 1 << 64),
            _check_int("src_stride", src_stride, 0, 1 << 64),
            _check_int("src_offset", src_offset, 0, 1 << 64),
            _check_int("dst_stride", dst_stride, 0, 1 << 64),
            _check_int("dst_offset", dst_offset, 0, 1 << 64),
            imm is not None,
            _imm(imm) if imm is not None else 0,
            out,
        )
        return self._req(rc, out, "submit_paged_writes", on_done, on_error)

    @staticmethod
    def _indices(name: str, idx) -> np.ndarray:
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        a = np.asarray(idx)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise InvalidArgument(
                f"{name} must be a 1-D sequence of integers, got {a.dtype}{a.shape}"
            )
        if a.size and (a.min() < 0 or a.max() >= 1 << 32):
            raise InvalidArgument(f"{name} must be in [0, 2**32), got [{a.min()}, {a.max()}]")
        return np.ascontiguousarray(a, dtype=np.uint32)

    def submit_scatter(
        self,
        src_mr: MemoryRegion,
        dsts: Sequence[ScatterDst],
        *,
        imm: int | None = None,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[FabricError], None] | None = None,
    ) -> TransferRequest:
        """One source, many destinations (peers); with `imm`, each destination's owner
        receives one arrival per ScatterDst addressed to it."""
        hs = [self._rdesc(d.dst) for d in dsts]
        arr = ffi.new("struct pplx_scatter_dst[]", len(dsts))
        for i, (d, h) in enumerate(zip(dsts, hs)):
            arr[i].rdesc = h
            arr[i].src_offset = _check_int(f"dsts[{i}].src_offset", d.src_offset, 0, 1 << 64)
            arr[i].dst_offset = _check_int(f"dsts[{i}].dst_offset", d.dst_offset, 0, 1 << 64)
            arr[i].len = _check_int(f"dsts[{i}].length", d.length, 0, 1 << 64)
        out = ffi.new("struct pplx_req **")
        rc = lib.pplx_write_scatter(
            self._handle(),
            src_mr._handle(),
            len(dsts),
            arr,
            imm is not None,
            _imm(imm) if imm is not None else 0,
            out,
        )
        return self._req(rc, out, "submit_scatter", on_done, on_error)

    # ---- two-sided ----
    def _peer(self, addr: bytes) -> int:
        p = self._peers.get(addr)
        if p is None:
            p = check(lib.pplx_peer_import(self._handle(), addr, len(addr)), "peer address")
            self._peers[bytes(addr)] = p
        return p

    def submit_send(
        self,
        addr: bytes,
        message: bytes,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        *,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[FabricError], None] | None = None,
    ) -> TransferRequest:
        """Send a small message (<= msg_size bytes) to the engine at `addr`; the buffer is
        copied, so `message` is free on return. Waits up to `timeout` for a free slot."""
        peer = self._peer(addr)
        data = bytes(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        out = ffi.new("struct pplx_req **")
        while True:
            try:
                rc = lib.pplx_send(self._handle(), peer, data, len(data), out)
                return self._req(rc, out, "submit_send", on_done, on_error)
            except TryAgain:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                time.sleep(50e-6)

    def recv(self, timeout: float | None = DEFAULT_TIMEOUT_S) -> bytes:
        """The oldest received message; FabricTimeout after `timeout` seconds."""
        buf = ffi.new("uint8_t[]", self.msg_size)
        n = check(lib.pplx_recv(self._handle(), buf, self.msg_size, _timeout_us(timeout)), "recv")
        return bytes(ffi.buffer(buf, min(n, self.msg_size)))

    def submit_recvs(
        self,
        num_recvs: int,
        on_recv: Callable[[bytes], None],
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> RecvHandle:
        """Deliver the next `num_recvs` messages to `on_recv` on a Python thread (callbacks
        never run on the C progress thread). `join()` the handle to see errors."""
        num_recvs = _check_int("num_recvs", num_recvs, 0, 1 << 62)
        errors: list[BaseException] = []

        def loop() -> None:
            try:
                for _ in range(num_recvs):
                    on_recv(self.recv(timeout))
            except BaseException as exc:  # noqa: BLE001 - handed to join()
                errors.append(exc)

        t = threading.Thread(target=loop, name="pplx-recvs", daemon=True)
        t.start()
        return RecvHandle(t, errors)

    # ---- immediates ----
    def imm_counter(self, imm: int) -> ImmCounter:
        return ImmCounter(self, _check_int("imm", imm, 0, self.imm_table_size))

    def imm_table(self) -> torch.Tensor:
        """`[imm_table_size]` torch.int64: arrivals per immediate, a view of the C table
        (page-aligned host memory; `cudaHostRegister` it so a GPU kernel can poll it).

        Warning: the view dangles after `close()`."""
        ptr, nbytes = ffi.new("uint64_t **"), ffi.new("uint64_t *")
        check(lib.pplx_imm_table(self._handle(), ptr, nbytes), "imm_table")
        return torch.frombuffer(ffi.buffer(ptr[0], nbytes[0]), dtype=torch.int64)

    @property
    def imm_table_ptr(self) -> int:
        ptr, nbytes = ffi.new("uint64_t **"), ffi.new("uint64_t *")
        check(lib.pplx_imm_table(self._handle(), ptr, nbytes), "imm_table")
        return int(ffi.cast("uintptr_t", ptr[0]))

    def set_imm_count_expected(
        self,
        imm: int,
        n: int,
        *,
        flag: torch.Tensor | int | None = None,
        value: int = 1,
        consume: bool = True,
    ) -> ImmExpectation:
        """When `imm` has arrived `n` times, store `value` into `flag` (and, with `consume`,
        subtract `n` from the count so the next round starts at 0).

        `flag`: `[1]` torch.int64 host tensor (pinned or host-mapped for a GPU poller), a raw
        address of a 64-bit word, or None for an internal word. One expectation per imm.
        """
        imm = _check_int("imm", imm, 0, self.imm_table_size)
        n = _check_int("n", n, 0, 1 << 63)
        value = _check_int("value", value, 0, 1 << 64)
        keep = None
        if flag is None:
            keep = np.zeros(1, dtype=np.uint64)
            flag_ptr = keep.ctypes.data
            if value == 0:
                raise InvalidArgument(
                    "value must be nonzero with the internal flag (it starts at 0)"
                )
        elif isinstance(flag, torch.Tensor):
            if flag.dtype not in (torch.int64, torch.uint64) or flag.numel() != 1:
                raise InvalidArgument(
                    f"flag must be a [1] torch.int64 tensor, got {flag.dtype}{tuple(flag.shape)}"
                )
            if flag.device.type != "cpu":
                raise InvalidArgument(
                    f"flag must be in host memory (pinned for a GPU), got {flag.device}"
                )
            flag_ptr, keep = flag.data_ptr(), flag
        else:
            flag_ptr = _check_int("flag", flag, 1, 1 << 64)
        if flag_ptr % 8:
            raise InvalidArgument(f"flag address {flag_ptr:#x} must be 8-byte aligned")
        check(
            lib.pplx_imm_set_trigger(
                self._handle(), imm, n, ffi.cast("uint64_t *", flag_ptr), value, consume
            ),
            "set_imm_count_expected",
        )
        return ImmExpectation(self, imm, n, flag_ptr, value, keep)

    # ---- measuring ----
    def measure_pingpong(
        self,
        src_mr: MemoryRegion,
        dst_mr: MrDescriptor,
        iters: int,
        *,
        initiator: bool,
        length: int = 8,
        imm_ping: int = 0xFFF0,
        imm_pong: int = 0xFFF1,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> list[float] | None:
        """Write+imm ping-pong run in C (no Python per iteration): the engine's own latency.

        Both sides call it with the same `iters`; the initiator returns `[iters]` one-way
        times in microseconds (round trip / 2), the responder None. Consumes the arrivals
        of `imm_ping` / `imm_pong` it waits for."""
        iters = _check_int("iters", iters, 0, 1 << 31)
        out = ffi.new("double[]", max(1, iters)) if initiator else ffi.NULL
        check(
            lib.pplx_bench_pingpong(
                self._handle(),
                src_mr._handle(),
                self._rdesc(dst_mr),
                iters,
                _check_int("length", length, 0, 1 << 63),
                bool(initiator),
                _imm(imm_ping),
                _imm(imm_pong),
                _timeout_us(timeout),
                out,
            ),
            "measure_pingpong",
        )
        return list(out[0:iters]) if initiator else None

    def measure_stream(
        self,
        src_mr: MemoryRegion,
        dst_mr: MrDescriptor,
        reps: int,
        writes: int,
        length: int,
        *,
        initiator: bool,
        window: int = 16,
        slots: int = 1,
        imm_data: int = 0xFFF2,
        imm_ack: int = 0xFFF3,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> list[float] | None:
        """Streaming writes run in C (no Python per write): the engine's own bandwidth.

        Per rep the initiator posts `writes` writes of `length` bytes with `imm_data`, write
        k from and to offset `(k % slots) * length`, at most `window` in flight, then waits
        for one `imm_ack`; the responder counts the arrivals and acks with an 8-byte write.
        Both sides call it with the same arguments; the initiator returns `[reps]`
        microseconds per rep, the responder None."""
        reps = _check_int("reps", reps, 0, 1 << 31)
        out = ffi.new("double[]", max(1, reps)) if initiator else ffi.NULL
        check(
            lib.pplx_bench_stream(
                self._handle(),
                src_mr._handle(),
                self._rdesc(dst_mr),
                reps,
                _check_int("writes", writes, 1, 1 << 31),
                _check_int("length", length, 0, 1 << 63),
                _check_int("window", window, 1, 1 << 31),
                _check_int("slots", slots, 1, 1 << 31),
                bool(initiator),
                _imm(imm_data),
                _imm(imm_ack),
                _timeout_us(timeout),
                out,
            ),
            "measure_stream",
        )
        return list(out[0:reps]) if initiator else None

    # ---- lifetime ----
    def close(self) -> None:
        """Fail queued and in-flight requests, unregister every region, stop the progress
        thread and free the engine; then run the callbacks still due (their requests failed
        with EngineClosed) and re-raise the first exception a callback raised. Idempotent."""
        if self._h is None:
            return
        for mr in list(self._regions.values()):
            self.unregister_memory(mr)
        for h in self._rdescs.values():
            ffi.release(h)
        self._rdescs.clear()
        self._last_dst = self._last_dh = None
        self._peers.clear()
        cb = self._cb
        if cb is not None:
            with cb.c_lock:  # the callback thread is not inside a C wait now
                h, self._h = self._h, None
                ffi.release(h)
            cb.stop()  # runs the remaining callbacks (requests failed by the close)
        else:
            h, self._h = self._h, None
            ffi.release(h)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._h is None else "open"
        return (
            f"TransferEngine(provider={self._provider!r}, num_domains={self._num_domains}, {state})"
        )
