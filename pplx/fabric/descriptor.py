"""MrDescriptor: what a peer needs to write into a registered region.

A descriptor is a value: the owner's main address (every domain's endpoint name), the
region's base pointer and length at the owner, and per domain the remote address and key.
It is hashable, picklable, and serialises to a compact byte string (`to_bytes`), so it can
travel over torch.distributed, a socket, or a file.
"""

from __future__ import annotations

import dataclasses
import struct

from pplx._ffi import InvalidDescriptor

_MAGIC = b"PXMR"
_VERSION = 1
_HEAD = struct.Struct("<4sHHQQI")  # magic, version, num_domains, ptr, nbytes, address length
_DOMAIN = struct.Struct("<QQ")  # remote address, key


@dataclasses.dataclass(frozen=True)
class MrDescriptor:
    """Remote view of a registered region.

    Attributes:
        address: the owning engine's `main_address`.
        ptr: base address of the region in the owner's process.
        nbytes: length of the region in bytes; every remote range is checked against it.
        remote: per domain `(remote_address, key)`; `remote_address` is the virtual address
            of the region's first byte where the provider addresses by virtual address
            (FI_MR_VIRT_ADDR, e.g. EFA) and 0 where it addresses by offset.
    """

    address: bytes
    ptr: int
    nbytes: int
    remote: tuple[tuple[int, int], ...]

    @property
    def num_domains(self) -> int:
        return len(self.remote)

    def to_bytes(self) -> bytes:
        head = _HEAD.pack(
            _MAGIC, _VERSION, len(self.remote), self.ptr, self.nbytes, len(self.address)
        )
        return head + self.address + b"".join(_DOMAIN.pack(a, k) for a, k in self.remote)

    @classmethod
    def from_bytes(cls, data: bytes) -> MrDescriptor:
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise InvalidDescriptor(
                f"MrDescriptor.from_bytes: {len(data)} bytes, expected at least {_HEAD.size}"
            )
        magic, version, n, ptr, nbytes, alen = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise InvalidDescriptor(
                f"MrDescriptor.from_bytes: magic/version {magic!r}/{version}, "
                f"expected {_MAGIC!r}/{_VERSION}"
            )
        need = _HEAD.size + alen + n * _DOMAIN.size
        if len(data) != need:
            raise InvalidDescriptor(
                f"MrDescriptor.from_bytes: {len(data)} bytes, expected {need} "
                f"for {n} domains and a {alen}-byte address"
            )
        pos = _HEAD.size + alen
        remote = tuple(_DOMAIN.unpack_from(data, pos + i * _DOMAIN.size) for i in range(n))
        return cls(data[_HEAD.size : pos], ptr, nbytes, remote)
