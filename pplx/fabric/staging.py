"""Staging CUDA tensors through pinned host memory for libfabric builds without FI_HMEM.

The Debian/Ubuntu libfabric on our machines cannot register GPU memory (DESIGN.md, facts),
so GPU data crosses the fabric through a registered, pinned host mirror:

    staged = StagedTensor(engine, x_cuda)   # registers the host mirror
    staged.to_host()                        # before sending: device -> host (synchronous)
    engine.submit_write(staged.mr, peer_desc, ...).wait()
    ...
    staged.to_device()                      # after the receiver's imm count: host -> device

Each copy moves `nbytes` over PCIe (about 25 GB/s on an H100 host, pinned); a CUDA-enabled
libfabric (AWS EFA installer) registers the tensor directly (`register_tensor_or_stage`).
"""

from __future__ import annotations

import torch

from pplx._ffi import HmemNotSupported
from pplx.fabric.descriptor import MrDescriptor
from pplx.fabric.engine import MemoryRegion, TransferEngine


class StagedTensor:
    """A tensor (usually CUDA) with a registered host mirror of the same shape and dtype.

    Attributes:
        tensor: the device tensor.
        host: the mirror, pinned when CUDA is available.
        mr, descriptor: the mirror's registration (write from `mr`, peers write to
            `descriptor`).
    """

    def __init__(self, engine: TransferEngine, tensor: torch.Tensor):
        if not tensor.is_contiguous():
            raise ValueError("StagedTensor: tensor must be contiguous")
        self.engine = engine
        self.tensor = tensor
        pin = tensor.is_cuda and torch.cuda.is_available()
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        self.mr, self.descriptor = engine.register_tensor(self.host)

    def to_host(self) -> None:
        """Copy device -> mirror and wait for it (call before writes from `mr`)."""
        self.host.copy_(self.tensor)
        if self.tensor.is_cuda:
            torch.cuda.current_stream(self.tensor.device).synchronize()

    def to_device(self) -> None:
        """Copy mirror -> device (call once the writes into `descriptor` were counted)."""
        self.tensor.copy_(self.host, non_blocking=False)

    def close(self) -> None:
        self.engine.unregister_memory(self.mr)


def register_tensor_or_stage(
    engine: TransferEngine, tensor: torch.Tensor
) -> tuple[MemoryRegion, MrDescriptor, StagedTensor | None]:
    """Register `tensor` directly if the engine can (host memory, or CUDA with FI_HMEM),
    else stage it: returns (mr, descriptor, staged or None)."""
    try:
        mr, desc = engine.register_tensor(tensor)
        return mr, desc, None
    except HmemNotSupported:
        staged = StagedTensor(engine, tensor)
        return staged.mr, staged.descriptor, staged
