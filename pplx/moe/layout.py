"""Where dispatched rows land: expert placement, buffer sizes, offsets and the row map.

Shape legend: T tokens per rank, K experts per token (top-k), E experts, R ranks,
E_local = E / R local experts per rank, H hidden.

Placement: rank r owns the global experts [r * E_local, (r + 1) * E_local) (contiguous
blocks; any R that divides E, not only powers of two).

On a destination rank, the rows for local expert e form one block of `expert_x` that
starts at `off[e]`: `off[0] = 0`, `off[e + 1] = off[e] + round_up(count[e], expert_padding)`.
Inside a block, rows are ordered by (source rank, token index t, top-k slot k). Every
(t, k) slot is its own row, also when a token names the same expert twice.

Everything here is plain torch on whatever device the inputs live on; functions that take
the counts of every rank (`[R, E]`) are what the single-process reference, the
process-group reference and the kernels' tests share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Block size of fp8 scales along the hidden dimension (one f32 scale per 128 values, as
# in DeepSeek-V3's fp8 recipe and pplx-garden's kernels).
SCALE_BLOCK = 128


def num_local_experts(num_experts: int, world_size: int) -> int:
    """Experts per rank, E / R; raises ValueError naming both when R does not divide E."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts % world_size != 0:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the world size ({world_size}): "
            "experts are placed on ranks in contiguous blocks of num_experts / world_size"
        )
    return num_experts // world_size


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return (n + multiple - 1) // multiple * multiple


def hidden_dim_scale(hidden_dim: int) -> int:
    """Number of f32 fp8 block scales per token: ceil(H / 128) (56 for H = 7168)."""
    return (hidden_dim + SCALE_BLOCK - 1) // SCALE_BLOCK


def max_recv_tokens(
    max_num_tokens: int,
    world_size: int,
    num_experts_per_token: int,
    num_local_experts: int,
    expert_padding: int,
) -> int:
    """Rows of `expert_x` to allocate on every rank (the worst case).

    Every one of the R * T * K slots of the group may land on one rank, and each of the
    E_local blocks may add up to `expert_padding - 1` padding rows.
    """
    return world_size * max_num_tokens * num_experts_per_token + num_local_experts * (
        expert_padding - 1
    )


def live_tokens(bound_m: torch.Tensor | int | None, num_tokens: int) -> int:
    """The live token count on the host: min(bound_m, T), or T when bound_m is None.

    Warning: reading a CUDA `bound_m` synchronises with the device.
    """
    if bound_m is None:
        return num_tokens
    m = int(bound_m.reshape(-1)[0].item()) if isinstance(bound_m, torch.Tensor) else int(bound_m)
    if m < 0:
        raise ValueError(f"bound_m must be >= 0, got {m}")
    return min(m, num_tokens)


def count_per_expert(
    indices: torch.Tensor, num_experts: int, bound_m: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Slots routed to each global expert from one rank.

    Args:
        indices: `[T, K]` int32/int64: global expert index per token and slot.
        bound_m: live token count; rows >= bound_m are ignored.

    Returns:
        `[E]` torch.int64: number of (t, k) slots with t < bound_m that name expert g.
    """
    m = live_tokens(bound_m, indices.shape[0])
    flat = indices[:m].reshape(-1).long()
    return torch.bincount(flat, minlength=num_experts)[:num_experts]


@dataclass
class GroupLayout:
    """The placement of every rank's rows, computed from every rank's counts.

    Attributes:
        counts: `[R, E]` torch.int64: slots that source rank s routes to global expert g.
        expert_num_tokens: `[R, E_local]` torch.int64: rows received per local expert on
            each destination rank (unpadded).
        expert_offsets: `[R, E_local + 1]` torch.int64: first row of each expert's block on
            each destination rank; the last column is the rows in use (padded).
        src_base: `[R, E]` torch.int64: on the rank that owns global expert g, the row of
            the first slot that source rank s sends to g.
    """

    counts: torch.Tensor
    expert_num_tokens: torch.Tensor
    expert_offsets: torch.Tensor
    src_base: torch.Tensor

    @property
    def world_size(self) -> int:
        return self.counts.shape[0]

    @property
    def num_local_experts(self) -> int:
        return self.expert_num_tokens.shape[1]

    def num_rows(self, rank: int) -> int:
        """Rows of `expert_x` in use on `rank` (sum of padded blocks)."""
        return int(self.expert_offsets[rank, -1].item())


def expert_offsets(expert_num_tokens: torch.Tensor, expert_padding: int) -> torch.Tensor:
    """Block starts from counts: `[..., E_local]` counts -> `[..., E_local + 1]` int64 offsets.

    off[0] = 0 and off[e + 1] = off[e] + round_up(count[e], expert_padding).
    """
    if expert_padding < 1:
        raise ValueError(f"expert_padding must be >= 1, got {expert_padding}")
    c = expert_num_tokens.long()
    padded = (c + expert_padding - 1) // expert_padding * expert_padding
    zero = torch.zeros(*c.shape[:-1], 1, dtype=torch.int64, device=c.device)
    return torch.cat([zero, padded.cumsum(-1)], dim=-1)


def group_layout(counts: torch.Tensor, expert_padding: int) -> GroupLayout:
    """Place every rank's rows.

    Args:
        counts: `[R, E]` integer: slots that source rank s routes to global expert g (the
            stack of every rank's `count_per_expert`).
        expert_padding: each expert's block is padded to a multiple of this many rows.
    """
    if counts.dim() != 2:
        raise ValueError(f"counts must be [R, E], got shape {tuple(counts.shape)}")
    counts = counts.long()
    world_size, num_experts = counts.shape
    e_local = num_local_experts(num_experts, world_size)
    # [R_dst, E_local]: sum over source ranks of the slots for each expert of rank d.
    per_dst = counts.sum(0).reshape(world_size, e_local)
    offsets = expert_offsets(per_dst, expert_padding)  # [R_dst, E_local + 1]
    block_start = offsets[:, :-1].reshape(num_experts)  # [E]: row of expert g's block
    # Rows of expert g are ordered by source rank first: rank s starts after ranks < s.
    before = counts.cumsum(0) - counts  # [R, E] exclusive prefix over sources
    src_base = block_start.unsqueeze(0) + before
    return GroupLayout(
        counts=counts, expert_num_tokens=per_dst, expert_offsets=offsets, src_base=src_base
    )


@dataclass
class RowMap:
    """Where one source rank's (t, k) slots land: the row(t, k) map combine reads.

    Attributes:
        dst_rank: `[T, K]` torch.int64: rank that owns the slot's expert; -1 for t >= bound_m.
        dst_row: `[T, K]` torch.int64: row of `expert_x` / `expert_y` on that rank; -1 for
            t >= bound_m.
        send_order: `[N]` torch.int64: flat slot index (t * K + k) of the live slots sorted
            by (expert, t, k), i.e. in the order their rows appear on the destination ranks;
            a destination rank's slots are contiguous in it.
        send_counts: `[R]` torch.int64: how many of those slots go to each rank.
    """

    dst_rank: torch.Tensor
    dst_row: torch.Tensor
    send_order: torch.Tensor
    send_counts: torch.Tensor


def row_map(
    indices: torch.Tensor,
    layout: GroupLayout,
    rank: int,
    bound_m: torch.Tensor | int | None = None,
) -> RowMap:
    """The row(t, k) map of source rank `rank`.

    Args:
        indices: `[T, K]` int32/int64: global expert index per token and slot, of `rank`.
        layout: the group's layout (its counts must include this rank's `indices`).
        rank: the source rank that owns `indices`.
        bound_m: live token count; slots of rows >= bound_m map to -1.
    """
    num_tokens, topk = indices.shape
    m = live_tokens(bound_m, num_tokens)
    device = indices.device
    num_experts = layout.counts.shape[1]
    e_local = layout.num_local_experts
    flat = indices[:m].reshape(-1).long()  # [m * K]
    # A stable sort by expert keeps (t, k) order inside each expert: the contract's order.
    send_order = torch.sort(flat, stable=True).indices
    sorted_expert = flat[send_order]
    counts = layout.counts[rank].to(device)
    first = counts.cumsum(0) - counts  # [E] position of expert g's first slot in the sort
    pos = torch.arange(flat.numel(), device=device) - first[sorted_expert]
    rows_sorted = layout.src_base[rank].to(device)[sorted_expert] + pos
    dst_row = torch.full((num_tokens * topk,), -1, dtype=torch.int64, device=device)
    dst_row[send_order] = rows_sorted
    dst_rank = torch.full((num_tokens * topk,), -1, dtype=torch.int64, device=device)
    dst_rank[: m * topk] = flat // e_local
    send_counts = counts.reshape(layout.world_size, e_local).sum(1)
    assert num_experts == layout.world_size * e_local
    return RowMap(
        dst_rank=dst_rank.reshape(num_tokens, topk),
        dst_row=dst_row.reshape(num_tokens, topk),
        send_order=send_order,
        send_counts=send_counts,
    )


def recv_rows(layout: GroupLayout, rank: int) -> torch.Tensor:
    """Rows of `expert_x` on `rank` for the slots it receives, in arrival order.

    The arrival order is source rank, then (local expert, t, k): the concatenation of each
    source's `send_order` slice for `rank`. Returns `[N_recv]` torch.int64.
    """
    e_local = layout.num_local_experts
    lo, hi = rank * e_local, (rank + 1) * e_local
    cnt = layout.counts[:, lo:hi]  # [R_src, E_local]
    base = layout.src_base[:, lo:hi]  # [R_src, E_local]
    total = int(cnt.sum().item())
    seg_len = cnt.reshape(-1)
    seg_base = base.reshape(-1)
    seg_start = seg_len.cumsum(0) - seg_len
    device = cnt.device
    seg_id = torch.repeat_interleave(torch.arange(seg_len.numel(), device=device), seg_len)
    pos = torch.arange(total, device=device) - seg_start[seg_id]
    return seg_base[seg_id] + pos


def valid_row_mask(
    expert_num_tokens: torch.Tensor, expert_padding: int, num_rows: int
) -> torch.Tensor:
    """`[num_rows]` bool: True on rows that hold a token (not padding, not past the blocks)."""
    counts = expert_num_tokens.long().cpu()
    offsets = expert_offsets(counts, expert_padding)
    mask = torch.zeros(num_rows, dtype=torch.bool)
    for e in range(counts.numel()):
        start = int(offsets[e])
        mask[start : start + int(counts[e])] = True
    return mask
