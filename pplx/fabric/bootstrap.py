"""Exchange engine addresses and memory descriptors over a torch.distributed group.

Every rank calls the same function (a collective); gloo works on CPU and GPU machines alike,
and the payload is a few hundred bytes per rank.
"""

from __future__ import annotations

import torch.distributed as dist

from pplx.fabric.descriptor import MrDescriptor
from pplx.fabric.engine import TransferEngine


def _all_gather(obj, group) -> list:
    if not dist.is_initialized():
        raise RuntimeError("pplx.fabric.bootstrap: torch.distributed is not initialized")
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def exchange_addresses(engine: TransferEngine, group=None) -> list[bytes]:
    """Every rank's `engine.main_address`, indexed by rank in `group`."""
    return _all_gather(engine.main_address, group)


def exchange_descriptors(desc: MrDescriptor, group=None) -> list[MrDescriptor]:
    """Every rank's descriptor, indexed by rank in `group` (sent as `to_bytes()`)."""
    if not isinstance(desc, MrDescriptor):
        raise TypeError(f"exchange_descriptors: desc must be an MrDescriptor, got {type(desc)}")
    return [MrDescriptor.from_bytes(b) for b in _all_gather(desc.to_bytes(), group)]
