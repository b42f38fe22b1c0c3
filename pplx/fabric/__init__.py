"""TransferEngine: RDMA writes with immediates over libfabric (pplx-garden's vocabulary)."""

from pplx._ffi import (
    EngineClosed,
    FabricError,
    FabricTimeout,
    HmemNotSupported,
    InvalidArgument,
    InvalidDescriptor,
    MessageTooLarge,
    OutOfBounds,
    PeerDead,
    ProviderNotFound,
    TransferFailed,
    TryAgain,
)
from pplx.fabric.descriptor import MrDescriptor
from pplx.fabric.engine import (
    FaultInjection,
    ImmCounter,
    ImmExpectation,
    MemoryRegion,
    RecvHandle,
    ScatterDst,
    TransferEngine,
    TransferRequest,
)

__all__ = [
    "EngineClosed",
    "FabricError",
    "FabricTimeout",
    "FaultInjection",
    "HmemNotSupported",
    "ImmCounter",
    "ImmExpectation",
    "InvalidArgument",
    "InvalidDescriptor",
    "MemoryRegion",
    "MessageTooLarge",
    "MrDescriptor",
    "OutOfBounds",
    "PeerDead",
    "ProviderNotFound",
    "RecvHandle",
    "ScatterDst",
    "TransferEngine",
    "TransferFailed",
    "TransferRequest",
    "TryAgain",
]
