"""The one importer of the compiled extension pplx._native.

Sets IPATH_NO_BACKTRACE before libfabric loads: Debian's libfabric pulls in libinfinipath,
whose SIGSEGV/SIGTERM handlers deadlocked a Python+torch process in exit() (DESIGN.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("IPATH_NO_BACKTRACE", "1")

from pplx._native import ffi, lib  # noqa: E402

__all__ = ["ffi", "lib"]
