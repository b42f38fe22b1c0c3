"""The one importer of the compiled extension pplx._native, and the one `check()`.

Sets IPATH_NO_BACKTRACE before libfabric loads: Debian's libfabric pulls in libinfinipath,
whose SIGSEGV/SIGTERM handlers deadlocked a Python+torch process in exit() (DESIGN.md).

`check(rc, what)` turns a negative return code of the C library into a typed exception whose
message joins `what`, the code's name and the C side's detail (`pplx_last_error()`, kept per
thread, so it belongs to this call). cffi releases the GIL around every call into the
library (out-of-line API mode), so the C waits never block other Python threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("IPATH_NO_BACKTRACE", "1")

from pplx._native import ffi, lib  # noqa: E402

__all__ = [
    "EngineClosed",
    "FabricError",
    "FabricTimeout",
    "HmemNotSupported",
    "InvalidArgument",
    "InvalidDescriptor",
    "MessageTooLarge",
    "OutOfBounds",
    "PeerDead",
    "ProviderNotFound",
    "TransferFailed",
    "TryAgain",
    "check",
    "ffi",
    "lib",
]


class FabricError(RuntimeError):
    """Base of every error the TransferEngine raises; `code` is the C return code."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class ProviderNotFound(FabricError):
    """The libfabric provider is absent or lacks what the engine needs (RDM, RMA, CQ data)."""


class OutOfBounds(FabricError, IndexError):
    """A local or remote range lies outside its registered region or descriptor."""


class InvalidDescriptor(FabricError, ValueError):
    """A descriptor or address is malformed or belongs to an incompatible engine."""


class InvalidArgument(FabricError, ValueError):
    """An argument is out of its documented range."""


class EngineClosed(FabricError):
    """The engine was closed, or the memory region unregistered."""


class FabricTimeout(FabricError, TimeoutError):
    """A wait ran out of time (a peer died, or never sent)."""


class HmemNotSupported(FabricError):
    """Device memory was given but this libfabric cannot register it (no FI_HMEM)."""


class TryAgain(FabricError):
    """A resource is busy (e.g. every send slot in flight); retry later."""


class MessageTooLarge(FabricError, ValueError):
    """A two-sided message exceeds the engine's msg_size."""


class TransferFailed(FabricError):
    """A request completed, but some of its operations failed."""


class PeerDead(TransferFailed):
    """Operations failed because the peer's process exited (shm: detected at once; later
    operations to it fail without being posted)."""


def _codes() -> dict[int, type[FabricError]]:
    return {
        lib.PPLX_ERR_NO_PROVIDER: ProviderNotFound,
        lib.PPLX_ERR_OUT_OF_BOUNDS: OutOfBounds,
        lib.PPLX_ERR_BAD_DESCRIPTOR: InvalidDescriptor,
        lib.PPLX_ERR_CLOSED: EngineClosed,
        lib.PPLX_ERR_TIMEOUT: FabricTimeout,
        lib.PPLX_ERR_NO_HMEM: HmemNotSupported,
        lib.PPLX_ERR_INVALID: InvalidArgument,
        lib.PPLX_ERR_AGAIN: TryAgain,
        lib.PPLX_ERR_MSG_SIZE: MessageTooLarge,
        lib.PPLX_ERR_FAILED: TransferFailed,
        lib.PPLX_ERR_PEER_DEAD: PeerDead,
    }


def strerror(rc: int) -> str:
    return ffi.string(lib.pplx_strerror(rc)).decode()


def last_error() -> str:
    return ffi.string(lib.pplx_last_error()).decode(errors="replace")


def check(rc: int, what: str = "") -> int:
    """Return rc if it is >= 0, else raise the exception class its code maps to."""
    if rc >= 0:
        return rc
    cls = _codes().get(rc, FabricError)
    detail = last_error()
    msg = f"{what + ': ' if what else ''}{strerror(rc)} ({rc})"
    if detail:
        msg += f": {detail}"
    raise cls(msg, rc)
