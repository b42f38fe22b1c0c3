"""The dispatch/combine a user writes by hand with `torch.distributed.all_to_all_single`.

Shape legend: T tokens per rank, K experts per token, E experts, R ranks, E_local = E / R,
H hidden, S scales per token.

Steps (each its own function so that a benchmark can time them apart):
1. `plan_dispatch`: count slots per expert, exchange the `[R, E_local]` counts with one
   `all_to_all_single`, sort this rank's slots by expert (hence by destination rank), and
   work out where each received row goes.
2. `permute_rows`: gather the rows to send, grouped by destination.
3. `all_to_all_rows`: the payload exchange alone (one `all_to_all_single`; fp8 and bf16
   move as bytes).
4. `unpermute_dispatch`: scatter received rows into the contract layout of
   `pplx.moe.reference` (rows per expert padded, ordered by source rank, t, k).
Combine runs the same exchange backwards and sums `weights * rows` per token.

The outputs equal `pplx.moe.reference`'s (dispatch bit-exact; combine up to f32 summation
order, since `sum(dim=1)` is what one writes here).

Warning: every call reads the counts on the host (split sizes must be Python ints), so it
synchronises with the device and cannot be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pplx.moe.layout import expert_offsets, live_tokens, num_local_experts
from pplx.moe.reference import group_rank_size


@dataclass
class BaselinePlan:
    """What both phases need, computed once per routing.

    Attributes:
        send_slots: `[N_send]` torch.int64: flat slot index t * K + k of the live slots,
            sorted by expert (stable), hence grouped by destination rank.
        send_splits: rows sent to each rank.
        recv_splits: rows received from each rank.
        recv_rows: `[N_recv]` torch.int64: row of `expert_x` for each received row.
        expert_num_tokens: `[E_local]` torch.int32: rows received per local expert.
        num_live: live tokens (bound_m) on this rank.
        topk: K.
    """

    send_slots: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_rows: torch.Tensor
    expert_num_tokens: torch.Tensor
    num_live: int
    topk: int


def all_to_all_rows(
    send: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The payload exchange alone: `[N_send, C]` rows out, `[N_recv, C]` rows in.

    Any dtype: rows travel as uint8 (gloo and NCCL have no fp8).
    """
    send_b = send.contiguous().view(torch.uint8)
    recv_b = torch.empty(sum(recv_splits), send_b.shape[1], dtype=torch.uint8, device=send.device)
    if group_rank_size(group)[1] == 1:
        recv_b.copy_(send_b)
    else:
        dist.all_to_all_single(recv_b, send_b, recv_splits, send_splits, group=group)
    return recv_b.view(send.dtype)


def plan_dispatch(
    indices: torch.Tensor,
    num_experts: int,
    expert_padding: int,
    bound_m: torch.Tensor | int | None = None,
    group: dist.ProcessGroup | None = None,
) -> BaselinePlan:
    """Counts exchange and the permutations (see the module docstring, step 1)."""
    rank, world = group_rank_size(group)
    e_local = num_local_experts(num_experts, world)
    num_tokens, topk = indices.shape
    m = live_tokens(bound_m, num_tokens)
    device = indices.device
    flat = indices[:m].reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)  # [E] slots per global expert
    recv_counts = all_to_all_rows(counts.reshape(world, e_local), [1] * world, [1] * world, group)
    # recv_counts[s, e]: slots source s sends to my local expert e.
    send_slots = torch.sort(flat, stable=True).indices
    send_splits = counts.reshape(world, e_local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    # Received rows arrive ordered (source, expert, t, k). The contract wants (expert,
    # source, t, k): a stable sort by local expert gives that order.
    recv_expert = torch.repeat_interleave(
        torch.arange(e_local, device=device).repeat(world), recv_counts.reshape(-1)
    )
    order = torch.sort(recv_expert, stable=True).indices  # received row ids, contract order
    per_expert = recv_counts.sum(0)  # [E_local]
    offsets = expert_offsets(per_expert, expert_padding)
    first = per_expert.cumsum(0) - per_expert
    pos = torch.arange(order.numel(), device=device)
    sorted_expert = recv_expert[order]
    recv_rows = torch.empty_like(order)
    recv_rows[order] = offsets[sorted_expert] + pos - first[sorted_expert]
    return BaselinePlan(
        send_slots=send_slots,
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_rows=recv_rows,
        expert_num_tokens=per_expert.to(torch.int32),
        num_live=m,
        topk=topk,
    )


def permute_rows(x: torch.Tensor, plan: BaselinePlan) -> torch.Tensor:
    """`[T, C]` per-token rows -> `[N_send, C * itemsize]` uint8 rows grouped by destination
    rank (bytes: fp8 indexing is not implemented on every device/version)."""
    return x.contiguous().view(torch.uint8)[plan.send_slots // plan.topk]


def unpermute_dispatch(recv: torch.Tensor, plan: BaselinePlan, out: torch.Tensor) -> None:
    """Scatter `[N_recv, C]` received rows into `out` at their contract rows (bytes)."""
    out.view(torch.uint8)[plan.recv_rows] = recv.view(torch.uint8)


def baseline_dispatch(
    out_expert_num_tokens: torch.Tensor,
    out_expert_x: torch.Tensor,
    out_expert_x_scale: torch.Tensor | None,
    dp_x: torch.Tensor,
    dp_x_scale: torch.Tensor | None,
    indices: torch.Tensor,
    num_experts: int,
    expert_padding: int,
    bound_m: torch.Tensor | int | None = None,
    group: dist.ProcessGroup | None = None,
) -> BaselinePlan:
    """Dispatch with `all_to_all_single`; outputs as in `AllToAll.dispatch`.

    Returns the plan, which `baseline_combine` reuses.
    """
    plan = plan_dispatch(indices, num_experts, expert_padding, bound_m, group)
    out_expert_num_tokens.copy_(plan.expert_num_tokens)
    recv_x = all_to_all_rows(permute_rows(dp_x, plan), plan.send_splits, plan.recv_splits, group)
    unpermute_dispatch(recv_x, plan, out_expert_x)
    if dp_x_scale is not None and out_expert_x_scale is not None:
        recv_s = all_to_all_rows(
            permute_rows(dp_x_scale, plan), plan.send_splits, plan.recv_splits, group
        )
        unpermute_dispatch(recv_s, plan, out_expert_x_scale)
    return plan


def combine_exchange(
    expert_y: torch.Tensor, plan: BaselinePlan, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Send expert outputs back: `[N, H]` -> `[N_send, H]` rows in `send_slots` order."""
    back = expert_y[plan.recv_rows]
    return all_to_all_rows(back, plan.recv_splits, plan.send_splits, group)


def combine_reduce(
    got: torch.Tensor,
    plan: BaselinePlan,
    weights: torch.Tensor,
    out_tokens: torch.Tensor,
    accumulate: bool = False,
) -> None:
    """`out[t] = sum_k weights[t, k] * y(t, k)` in f32 for the live tokens."""
    m, k, h = plan.num_live, plan.topk, got.shape[1]
    ys = torch.empty(m * k, h, dtype=got.dtype, device=got.device)
    ys[plan.send_slots] = got
    sums = (ys.reshape(m, k, h).float() * weights[:m].unsqueeze(2)).sum(dim=1)
    if accumulate:
        sums = out_tokens[:m].float() + sums
    out_tokens[:m] = sums.to(out_tokens.dtype)


def baseline_combine(
    out_tokens: torch.Tensor,
    weights: torch.Tensor,
    expert_y: torch.Tensor,
    plan: BaselinePlan,
    group: dist.ProcessGroup | None = None,
    accumulate: bool = False,
) -> None:
    """Combine with `all_to_all_single`, reusing the plan of the matching dispatch."""
    got = combine_exchange(expert_y, plan, group)
    combine_reduce(got, plan, weights, out_tokens, accumulate)
