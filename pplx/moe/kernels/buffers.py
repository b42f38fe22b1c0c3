"""Peer-visible buffers of the Triton all-to-all: layout, CUDA symmetric memory, CPU /dev/shm.

Shape legend: T = max_num_tokens, K top-k, E_local experts per rank, H hidden, S scales per
token, R ranks.

Every rank allocates one byte buffer of the same size and layout (`BufferLayout`); each
rank then knows the address of every rank's buffer *in its own address space* (an `[R]`
int64 table): on CUDA through torch symmetric memory (peer memory mapped over NVLink), on
CPU by mapping every rank's /dev/shm file. Kernels turn `table[d] + byte offset` into a
typed pointer and store straight into rank d's buffer.

Regions (per rank; "src" indexes the rank that wrote the data):

| region          | shape             | dtype   | written by                  |
|-----------------|-------------------|---------|-----------------------------|
| disp_flag       | [R, NC]           | int32   | dispatch send of src        |
| disp_ack        | [R]               | int32   | dispatch recv of peer       |
| comb_flag       | [R, CC]           | int32   | combine send of src         |
| comb_ack        | [R]               | int32   | combine recv of peer        |
| counts          | [R, NC, E_local]  | int64   | dispatch send of src (tagged)|
| tok_eq          | [R, T, K]         | int64   | dispatch send of src (tagged)|
| tok_w           | [R, T, K]         | int64   | dispatch send of src (tagged)|
| rows            | [R, T, row_bytes] | bytes   | dispatch send of src        |
| scales          | [R, T, S]         | float32 | dispatch send of src (fp8)  |
| comb_rows       | [R, T, H]         | out     | combine send of src         |

NC / CC: token chunks per destination of dispatch / combine (with the "v2" protocol one
flag slot per sender program that moves rows; "v1" uses the first R slots as per-source
counters). Tagged regions hold 64-bit words `(epoch + 1) << 32 | payload`, stored with no
fence and polled by the receiver (`store_tagged` in sync_kernels.py). Payloads:
`counts[src, c, e]`: slots of src's token chunk c for local expert e; `tok_eq[src, t, k]`:
`e * 65536 + q` (q: rank of the slot among chunk c's slots of expert e) or -1;
`tok_w[src, t, k]`: the weight's f32 bits. Rows, scales, tok_* and comb_rows are indexed
by the source's token index t (the slot of token t).

Each region starts on a 128-byte boundary, so rows can move as 8-byte words.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ALIGN = 128


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class BufferLayout:
    """Byte offsets of the regions of one rank's peer-visible buffer (see module docstring)."""

    disp_flag: int
    disp_ack: int
    comb_flag: int
    comb_ack: int
    counts: int
    tok_eq: int
    tok_w: int
    rows: int
    scales: int
    comb_rows: int
    row_bytes: int
    nbytes: int

    @staticmethod
    def build(
        world_size: int,
        max_num_tokens: int,
        num_experts_per_token: int,
        num_local_experts: int,
        hidden_dim: int,
        in_elem_bytes: int,
        hidden_dim_scale: int,
        has_scale: bool,
        out_elem_bytes: int,
        disp_signals: int = 1,
        comb_signals: int = 1,
        disp_chunks: int = 1,
    ) -> BufferLayout:
        r, t, k = world_size, max_num_tokens, num_experts_per_token
        # Row stride rounded to 16 bytes: aligned 8-byte words and 16-byte vector stores.
        row_bytes = _align(hidden_dim * in_elem_bytes, 16)
        sizes = [
            ("disp_flag", 4 * r * disp_signals),
            ("disp_ack", 4 * r),
            ("comb_flag", 4 * r * comb_signals),
            ("comb_ack", 4 * r),
            ("counts", 8 * r * disp_chunks * num_local_experts),
            ("tok_eq", 8 * r * t * k),
            ("tok_w", 8 * r * t * k),
            ("rows", r * t * row_bytes),
            ("scales", 4 * r * t * hidden_dim_scale if has_scale else 0),
            ("comb_rows", r * t * _align(hidden_dim * out_elem_bytes, 16)),
        ]
        offs = {}
        pos = 0
        for name, size in sizes:
            offs[name] = pos
            pos += _align(max(size, 1))
        return BufferLayout(row_bytes=row_bytes, nbytes=pos, **offs)


class PeerBuffers:
    """One byte buffer per rank, mapped into every rank; `ptrs` is the `[R]` int64 table.

    Attributes:
        local: `[nbytes]` torch.uint8: this rank's buffer.
        ptrs: `[R]` torch.int64 on the kernels' device: address of rank d's buffer as seen
            by this process.

    Warning: the buffers must stay alive while kernels may touch them; `close()` only drops
    references (peers may still be writing until every rank has finished its last call).
    """

    def __init__(self, nbytes: int, group: dist.ProcessGroup | None, device: torch.device):
        self.nbytes = nbytes
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._keep: list[object] = []
        if device.type == "cuda":
            ptrs = self._init_cuda(device)
        elif device.type == "cpu":
            ptrs = self._init_shm()
        else:
            raise ValueError(f"device must be cuda or cpu, got {device}")
        self.ptrs = torch.tensor(ptrs, dtype=torch.int64, device=device)

    def _init_cuda(self, device: torch.device) -> list[int]:
        import torch.distributed._symmetric_memory as symm_mem

        group = self.group if self.group is not None else dist.group.WORLD
        # Older torch (< 2.9) needs the group registered before rendezvous; newer ones
        # deprecate the call, so it is only made where it still exists and is needed.
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            try:
                enable(group.group_name)
            except Exception:  # noqa: BLE001 - deprecated no-op or already enabled
                pass
        buf = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=device)
        buf.zero_()
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(buf, group.group_name)
        self.local = buf
        self._keep += [buf, handle]
        self.handle = handle
        ptrs = [int(p) for p in handle.buffer_ptrs]
        dist.barrier(group)
        return ptrs

    def _init_shm(self) -> list[int]:
        # A fresh name per buffer set, broadcast from rank 0: concurrent tests never collide.
        names = [uuid.uuid4().hex if self.rank == 0 else ""]
        dist.broadcast_object_list(
            names, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group
        )
        paths = [f"/dev/shm/pplx-moe-{names[0]}-r{r}" for r in range(self.world_size)]
        mine = paths[self.rank]
        with open(mine, "wb") as f:
            f.truncate(self.nbytes)  # sparse file of zeros: flags start at 0
        dist.barrier(self.group)
        maps = [torch.from_file(p, shared=True, size=self.nbytes, dtype=torch.uint8) for p in paths]
        dist.barrier(self.group)
        os.unlink(mine)  # every rank has it mapped; the memory lives until the last unmap
        self._keep += maps
        self.local = maps[self.rank]
        return [m.data_ptr() for m in maps]

    def close(self) -> None:
        self._keep.clear()
        self.local = None  # type: ignore[assignment]
