"""Triton dispatch/combine kernels inside one node (NVLink on CUDA, /dev/shm on CPU).

`TritonAllToAll` is imported lazily so that `import pplx.moe.kernels.buffers` does not
decorate kernels: on CPU, set TRITON_INTERPRET=1 before the first access to it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TritonAllToAll"]


def __getattr__(name: str) -> Any:
    if name == "TritonAllToAll":
        from pplx.moe.kernels.triton_all_to_all import TritonAllToAll

        return TritonAllToAll
    raise AttributeError(f"module 'pplx.moe.kernels' has no attribute {name!r}")
