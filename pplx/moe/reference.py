"""The MoE dispatch/combine contract, in plain torch.

Shape legend: T tokens per rank, K experts per token (top-k), E experts, R ranks,
E_local = E / R, H hidden, S = ceil(H / 128) fp8 scales per token.

The contract (every backend, test, benchmark and notebook follows it):

- Placement: rank r owns the global experts [r * E_local, (r + 1) * E_local).
- Dispatch inputs on each rank: `x [T, H]` (bf16, or float8_e4m3fn with f32 block scales
  `x_scale [T, S]`), `indices [T, K]` (global expert per token and slot), `weights [T, K]`
  f32, and `bound_m` (live token count; rows >= bound_m are ignored).
- Dispatch outputs on each rank: `expert_num_tokens [E_local]` int32 = number of
  (source rank, t, k) slots routed to local expert e; `expert_x [rows, H]`: expert e's
  block starts at row off[e], off[0] = 0, off[e + 1] = off[e] + round_up(count[e],
  expert_padding); inside a block, rows are ordered by (source rank, token t, slot k);
  padding rows are unspecified (zero here). `expert_x_scale` rows travel with their rows.
  Each (t, k) slot is its own row, also when a token names one expert twice.
- Combine: `expert_y` has the same row positions as `expert_x` on each rank; on the
  source rank, `out[t] = sum_{k = 0..K-1} weights[t, k] * expert_y[row(t, k)]`,
  accumulated in f32 in k order, then cast to the output dtype; with `accumulate=True`,
  `out = (out.float() + sum).to(out dtype)`. Rows t >= bound_m of `out` are untouched.

Two forms:
- single process (`reference_dispatch`, `reference_combine`): every rank's inputs in, every
  rank's outputs out. Kernels' tests compare against these.
- process group (`pg_dispatch_send`/`pg_dispatch_recv`, `pg_combine_send`/`pg_combine_recv`):
  each rank passes its own tensors; counts are all-gathered, rows move with one
  `all_to_all_single` per tensor. Works with gloo on CPU and NCCL on CUDA (fp8 and bf16
  rows move as uint8 bytes, since gloo has no fp8). This is `AllToAll(backend="torch")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pplx.moe import layout as L

BoundM = torch.Tensor | int | None


@dataclass
class DispatchResult:
    """One rank's dispatch outputs and the row map of its own slots.

    Attributes:
        expert_num_tokens: `[E_local]` torch.int32: rows received per local expert.
        expert_x: `[rows, H]` x dtype: received rows in the contract layout; padding rows
            are zero.
        expert_x_scale: `[rows, S]` torch.float32 scales of those rows, or None (bf16 input).
        expert_offsets: `[E_local + 1]` torch.int64: first row of each expert's block.
        dst_rank: `[T, K]` torch.int64: rank that received this rank's slot (t, k); -1 for
            t >= bound_m.
        dst_row: `[T, K]` torch.int64: row of that slot on `dst_rank`; -1 for t >= bound_m.
    """

    expert_num_tokens: torch.Tensor
    expert_x: torch.Tensor
    expert_x_scale: torch.Tensor | None
    expert_offsets: torch.Tensor
    dst_rank: torch.Tensor
    dst_row: torch.Tensor


def _check_routing(indices: torch.Tensor, num_experts: int, m: int, name: str) -> None:
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"{name} must be [T, K], got shape {tuple(indices.shape)}")
    live = indices[:m]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= num_experts):
        bad = ((live < 0) | (live >= num_experts)).nonzero()[0].tolist()
        raise ValueError(
            f"{name}[{bad[0]}, {bad[1]}] = {int(live[bad[0], bad[1]])} is out of range: "
            f"expert indices must be in [0, {num_experts})"
        )


def _bound(bound_ms: Sequence[BoundM] | None, rank: int) -> BoundM:
    return None if bound_ms is None else bound_ms[rank]


def reference_layout(
    indices: Sequence[torch.Tensor],
    num_experts: int,
    expert_padding: int,
    bound_ms: Sequence[BoundM] | None = None,
) -> tuple[L.GroupLayout, list[L.RowMap]]:
    """The group layout and every rank's row map, from every rank's `indices [T_r, K]`."""
    world_size = len(indices)
    L.num_local_experts(num_experts, world_size)
    for r, idx in enumerate(indices):
        _check_routing(
            idx, num_experts, L.live_tokens(_bound(bound_ms, r), idx.shape[0]), f"indices[{r}]"
        )
    counts = torch.stack(
        [
            L.count_per_expert(idx.cpu(), num_experts, _bound(bound_ms, r))
            for r, idx in enumerate(indices)
        ]
    )
    layout = L.group_layout(counts, expert_padding)
    maps = [L.row_map(idx.cpu(), layout, r, _bound(bound_ms, r)) for r, idx in enumerate(indices)]
    return layout, maps


def reference_dispatch(
    xs: Sequence[torch.Tensor],
    x_scales: Sequence[torch.Tensor | None] | None,
    indices: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None,
    num_experts: int,
    expert_padding: int,
    bound_ms: Sequence[BoundM] | None = None,
    num_rows: int | None = None,
) -> list[DispatchResult]:
    """Dispatch for a whole group in one process.

    Args:
        xs: per rank `[T_r, H]` bf16 or float8_e4m3fn: tokens.
        x_scales: per rank `[T_r, S]` torch.float32 (fp8) or None; None for all bf16.
        indices: per rank `[T_r, K]` int32/int64: global expert index per token and slot.
        weights: per rank `[T_r, K]` torch.float32; unused by dispatch (kept for symmetry).
        num_experts: E; the number of ranks is len(xs) and must divide E.
        expert_padding: each expert's block is padded to a multiple of this many rows.
        bound_ms: per rank live token count (int, 1-element tensor or None).
        num_rows: rows of each rank's `expert_x` (e.g. `max_recv_tokens`); default: the
            rows in use on that rank.

    Returns:
        one DispatchResult per rank (on the CPU).
    """
    world_size = len(xs)
    if len(indices) != world_size:
        raise ValueError(f"indices has {len(indices)} ranks, xs has {world_size}")
    layout, maps = reference_layout(indices, num_experts, expert_padding, bound_ms)
    hidden = xs[0].shape[1]
    dtype = xs[0].dtype
    has_scale = x_scales is not None and x_scales[0] is not None
    results = []
    for d in range(world_size):
        rows = layout.num_rows(d) if num_rows is None else num_rows
        if rows < layout.num_rows(d):
            raise ValueError(f"num_rows={num_rows} < {layout.num_rows(d)} rows needed on rank {d}")
        # Work on uint8 views: fp8 copies are plain byte moves, and equal bytes is the bar.
        expert_x = torch.zeros(rows, hidden, dtype=dtype)
        x_bytes = expert_x.view(torch.uint8)
        expert_x_scale = None
        if has_scale:
            expert_x_scale = torch.zeros(rows, x_scales[0].shape[1], dtype=torch.float32)
        for s in range(world_size):
            sel = maps[s].dst_rank == d  # [T_s, K]
            t_idx = sel.nonzero()[:, 0]
            dst = maps[s].dst_row[sel]
            x_bytes[dst] = xs[s].detach().cpu().contiguous().view(torch.uint8)[t_idx]
            if has_scale:
                expert_x_scale[dst] = x_scales[s].detach().cpu().float()[t_idx]
        results.append(
            DispatchResult(
                expert_num_tokens=layout.expert_num_tokens[d].to(torch.int32),
                expert_x=expert_x,
                expert_x_scale=expert_x_scale,
                expert_offsets=layout.expert_offsets[d].clone(),
                dst_rank=maps[d].dst_rank,
                dst_row=maps[d].dst_row,
            )
        )
    return results


def weighted_sum(slot_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The combine arithmetic: `[m, K, H]` rows, `[m, K]` f32 weights -> `[m, H]` f32.

    Accumulates `weights[:, k] * rows[:, k]` in f32 in k order (k = 0 first), starting from
    zero; each product is rounded to f32 before it is added.
    """
    acc = torch.zeros(
        slot_rows.shape[0], slot_rows.shape[2], dtype=torch.float32, device=slot_rows.device
    )
    for k in range(slot_rows.shape[1]):
        acc = acc + weights[:, k : k + 1].float() * slot_rows[:, k].float()
    return acc


def finish_combine(sums: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """Write `[m, H]` f32 sums into the first m rows of `out` (adding when accumulating)."""
    m = sums.shape[0]
    if accumulate:
        out[:m] = (out[:m].float() + sums).to(out.dtype)
    else:
        out[:m] = sums.to(out.dtype)


def reference_combine(
    expert_ys: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    num_experts: int,
    expert_padding: int,
    bound_ms: Sequence[BoundM] | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    outs: Sequence[torch.Tensor] | None = None,
    accumulate: bool = False,
) -> list[torch.Tensor]:
    """Combine for a whole group in one process.

    Args:
        expert_ys: per rank `[rows, H]`: expert outputs at the rows of that rank's
            `expert_x` (same layout as `reference_dispatch`).
        indices: per rank `[T_r, K]`: the routing that dispatch used.
        weights: per rank `[T_r, K]` torch.float32: combine weight per token and slot.
        num_experts, expert_padding, bound_ms: as for `reference_dispatch`.
        out_dtype: dtype of the outputs.
        outs: per rank `[T_r, H]` previous outputs: rows >= bound_m are kept from them, and
            `accumulate=True` adds into them. Default: zeros. They are not modified.

    Returns:
        per rank `[T_r, H]` out_dtype on the CPU.
    """
    world_size = len(indices)
    _, maps = reference_layout(indices, num_experts, expert_padding, bound_ms)
    hidden = expert_ys[0].shape[1]
    results = []
    for s in range(world_size):
        num_tokens = indices[s].shape[0]
        m = L.live_tokens(_bound(bound_ms, s), num_tokens)
        if outs is None:
            out = torch.zeros(num_tokens, hidden, dtype=out_dtype)
        else:
            out = outs[s].detach().cpu().clone().to(out_dtype)
        dst_rank = maps[s].dst_rank[:m]
        dst_row = maps[s].dst_row[:m]
        topk = dst_rank.shape[1]
        slot_rows = torch.empty(m, topk, hidden, dtype=expert_ys[0].dtype)
        for d in range(world_size):
            sel = dst_rank == d
            slot_rows[sel] = expert_ys[d].detach().cpu()[dst_row[sel]]
        sums = weighted_sum(slot_rows, weights[s].detach().cpu()[:m])
        finish_combine(sums, out, accumulate)
        results.append(out)
    return results


# ---------------------------------------------------------------------------------------
# Process-group form: each rank passes its own tensors.


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def pg_layout(
    indices: torch.Tensor,
    num_experts: int,
    expert_padding: int,
    bound_m: BoundM,
    group: dist.ProcessGroup | None,
) -> tuple[L.GroupLayout, L.RowMap, int]:
    """All-gather every rank's `[E]` counts; returns (layout, this rank's row map, rank).

    Warning: synchronises with the device (counts are read on the host).
    """
    rank, world_size = group_rank_size(group)
    counts = L.count_per_expert(indices, num_experts, bound_m)  # [E] on indices' device
    if world_size > 1:
        gathered = [torch.empty_like(counts) for _ in range(world_size)]
        dist.all_gather(gathered, counts, group=group)
    else:
        gathered = [counts]
    layout = L.group_layout(torch.stack(gathered).cpu(), expert_padding)
    return layout, L.row_map(indices, layout, rank, bound_m), rank


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`[N, C]` tensor -> `[N, C * itemsize]` uint8 view (gloo and NCCL move these for fp8)."""
    return t.contiguous().view(torch.uint8)


def exchange_rows(
    send: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """`all_to_all_single` of `[N_send, C]` rows; returns `[N_recv, C]` of the same dtype.

    Rows go as bytes, so any dtype (fp8 included) moves over gloo and NCCL.
    """
    send_bytes = _as_bytes(send)
    recv = torch.empty(sum(recv_counts), send_bytes.shape[1], dtype=torch.uint8, device=send.device)
    if group_rank_size(group)[1] == 1:
        recv.copy_(send_bytes)
    else:
        dist.all_to_all_single(recv, send_bytes, list(recv_counts), list(send_counts), group=group)
    return recv.view(send.dtype)


@dataclass
class PendingDispatch:
    """Rows received by `pg_dispatch_send`, waiting to be placed by `pg_dispatch_recv`.

    Attributes:
        expert_num_tokens: `[E_local]` torch.int64 counts of this rank's local experts.
        recv_x: `[N_recv, H * itemsize]` torch.uint8: received rows (as bytes) in arrival
            order (source rank, expert, t, k).
        recv_x_scale: `[N_recv, S]` torch.float32 or None.
        recv_rows: `[N_recv]` torch.int64: row of `expert_x` for each received row.
    """

    expert_num_tokens: torch.Tensor
    recv_x: torch.Tensor
    recv_x_scale: torch.Tensor | None
    recv_rows: torch.Tensor


def pg_dispatch_send(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    indices: torch.Tensor,
    num_experts: int,
    expert_padding: int,
    bound_m: BoundM = None,
    group: dist.ProcessGroup | None = None,
) -> PendingDispatch:
    """The exchange half of dispatch: counts all-gather, then rows (and scales) all-to-all.

    A collective: every rank of `group` must call it. Arguments as for `reference_dispatch`
    but for this rank only.
    """
    layout, rmap, rank = pg_layout(indices, num_experts, expert_padding, bound_m, group)
    topk = indices.shape[1]
    tok = rmap.send_order.to(x.device) // topk  # [N_send]: token of each sent slot
    send_counts = rmap.send_counts.tolist()
    e_local = layout.num_local_experts
    recv_counts = layout.counts[:, rank * e_local : (rank + 1) * e_local].sum(1).tolist()
    # Gather rows as bytes: fp8 indexing is not implemented on every device/version.
    recv_x = exchange_rows(_as_bytes(x)[tok], send_counts, recv_counts, group)
    recv_x_scale = None
    if x_scale is not None:
        recv_x_scale = exchange_rows(x_scale.float()[tok], send_counts, recv_counts, group)
    return PendingDispatch(
        expert_num_tokens=layout.expert_num_tokens[rank],
        recv_x=recv_x,
        recv_x_scale=recv_x_scale,
        recv_rows=L.recv_rows(layout, rank).to(x.device),
    )


def pg_dispatch_recv(
    pending: PendingDispatch,
    out_expert_num_tokens: torch.Tensor,
    out_expert_x: torch.Tensor,
    out_expert_x_scale: torch.Tensor | None,
) -> None:
    """The placement half of dispatch: write received rows into the contract layout."""
    out_expert_num_tokens.copy_(pending.expert_num_tokens.to(out_expert_num_tokens.dtype))
    rows = pending.recv_rows.to(out_expert_x.device)
    out_expert_x.view(torch.uint8)[rows] = _as_bytes(pending.recv_x).to(out_expert_x.device)
    if out_expert_x_scale is not None and pending.recv_x_scale is not None:
        out_expert_x_scale[rows] = pending.recv_x_scale.to(out_expert_x_scale)


@dataclass
class PendingCombine:
    """Expert outputs received by `pg_combine_send`, waiting for `pg_combine_recv`.

    Attributes:
        slot_rows: `[m, K, H]`: expert output row for each live slot (t, k) of this rank.
    """

    slot_rows: torch.Tensor


def pg_combine_send(
    expert_y: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    expert_padding: int,
    bound_m: BoundM = None,
    group: dist.ProcessGroup | None = None,
) -> PendingCombine:
    """The exchange half of combine: send each received row back to its source rank.

    A collective. The layout is recomputed from `indices` (one counts all-gather), so
    combine depends only on its own arguments.
    """
    layout, rmap, rank = pg_layout(indices, num_experts, expert_padding, bound_m, group)
    e_local = layout.num_local_experts
    rows = L.recv_rows(layout, rank).to(expert_y.device)  # arrival order of dispatch
    back_counts = layout.counts[:, rank * e_local : (rank + 1) * e_local].sum(1).tolist()
    recv_counts = rmap.send_counts.tolist()
    got = exchange_rows(expert_y[rows], back_counts, recv_counts, group)  # [N_send, H]
    num_tokens, topk = indices.shape
    m = L.live_tokens(bound_m, num_tokens)
    flat = torch.empty(m * topk, expert_y.shape[1], dtype=expert_y.dtype, device=expert_y.device)
    flat[rmap.send_order.to(expert_y.device)] = got
    return PendingCombine(slot_rows=flat.reshape(m, topk, expert_y.shape[1]))


def pg_combine_recv(
    pending: PendingCombine,
    out_tokens: torch.Tensor,
    weights: torch.Tensor,
    accumulate: bool = False,
) -> None:
    """The reduction half of combine: weighted sum in f32 into `out_tokens[:m]`."""
    m = pending.slot_rows.shape[0]
    sums = weighted_sum(pending.slot_rows, weights[:m].to(pending.slot_rows.device))
    finish_combine(sums.to(out_tokens.device), out_tokens, accumulate)
