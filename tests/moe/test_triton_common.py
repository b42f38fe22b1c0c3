"""Shared checks of the Triton all-to-all against `pplx.moe.reference` (no tests here: the
CPU and GPU test files import it).

Every rank rebuilds every rank's inputs from the seed, runs the backend on its own, and
compares its outputs with the single-process reference (dispatch bit-exact, combine within
the bound of combine_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pplx.moe import layout as L
from pplx.moe import reference as ref
from pplx.moe import testing as mt


@dataclass
class Case:
    """One dispatch+combine check; `why` says what the shape exercises."""

    why: str
    num_tokens: int | list[int]
    hidden: int
    num_experts: int
    topk: int
    dtype: torch.dtype = torch.bfloat16
    expert_padding: int = 1
    bound_ms: list[int] | None = None
    distinct: bool = True
    all_to_one: bool = False
    split: bool = False  # do_send / do_recv halves
    accumulate: bool = False
    iters: int = 1
    index_dtype: torch.dtype = torch.int64


def combine_tolerance(slot_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for the Triton combine versus the reference.

    A bf16 rounding errs by at most 2^-8 of the magnitude rounded. The Triton result rounds
    each per-rank partial (together <= 2^-8 * sum_k |w y|) and the total (<= 2^-8 * the
    same), the reference rounds its total once more: |got - want| <= 3 * 2^-8 * sum_k |w y|.
    We allow 4 * 2^-8 = 2^-6 (f32 summation error is ~2^-24, negligible)."""
    mag = (weights[:, :, None].abs().float() * slot_rows.float().abs()).sum(1)
    return mag * 2.0**-6 + 1e-6


def run_case(at, case: Case, seed: int, rank: int, world_size: int, device: torch.device) -> None:
    """Run `case` for `iters` iterations on the backend object `at` (TritonAllToAll API)."""
    max_t = at.max_num_tokens
    for it in range(case.iters):
        s = seed * 1000 + it
        ins = mt.random_group_inputs(
            s,
            world_size,
            case.num_tokens,
            case.hidden,
            case.num_experts,
            case.topk,
            case.dtype,
            distinct=case.distinct,
            index_dtype=case.index_dtype,
            bound_ms=case.bound_ms,
        )
        if case.all_to_one:
            for i in ins:
                i.indices.fill_(case.num_experts - 1 - (s % case.num_experts))
        me = ins[rank]
        xs = [i.x for i in ins]
        x_scales = [i.x_scale for i in ins] if case.dtype == mt.FP8 else None
        idx = [i.indices for i in ins]
        w = [i.weights for i in ins]
        bms = [i.bound_m for i in ins] if case.bound_ms is not None else None
        rows = (
            at.max_recv_tokens
            if hasattr(at, "max_recv_tokens")
            else L.max_recv_tokens(
                max_t, world_size, case.topk, case.num_experts // world_size, case.expert_padding
            )
        )
        want = ref.reference_dispatch(
            xs, x_scales, idx, w, case.num_experts, case.expert_padding, bms, num_rows=rows
        )[rank]
        e_local = case.num_experts // world_size
        ent = mt.poison_(torch.empty(e_local, dtype=torch.int32, device=device))
        ex = mt.poison_(torch.empty(rows, case.hidden, dtype=case.dtype, device=device))
        exs = None
        if case.dtype == mt.FP8:
            exs = mt.poison_(
                torch.empty(
                    rows, L.hidden_dim_scale(case.hidden), dtype=torch.float32, device=device
                )
            )
        bm = (
            None
            if me.bound_m is None
            else torch.tensor([me.bound_m], dtype=torch.int32, device=device)
        )
        args = (
            ent,
            ex,
            exs,
            me.x.to(device),
            None if me.x_scale is None else me.x_scale.to(device),
            me.indices.to(device),
            me.weights.to(device),
        )
        if case.split:
            at.dispatch(*args, bound_m=bm, do_send=True, do_recv=False)
            at.dispatch(*args, bound_m=bm, do_send=False, do_recv=True)
        else:
            at.dispatch(*args, bound_m=bm)
        mt.assert_dispatch_matches(
            ent, ex, exs, want, case.expert_padding, name=f"[{case.why}] it{it} rank{rank} dispatch"
        )

        # Combine: fresh expert outputs on every rank, at the reference's row positions.
        g = torch.Generator().manual_seed(s + 7)
        ys = [mt.random_expert_y(rows, case.hidden, torch.bfloat16, g) for _ in range(world_size)]
        outs0 = [mt.random_expert_y(i.x.shape[0], case.hidden, torch.bfloat16, g) for i in ins]
        want_out = ref.reference_combine(
            ys,
            idx,
            w,
            case.num_experts,
            case.expert_padding,
            bms,
            outs=outs0,
            accumulate=case.accumulate,
        )[rank]
        out = outs0[rank].clone().to(device)
        cargs = (out, me.indices.to(device), me.weights.to(device), ys[rank].to(device))
        if case.split:
            at.combine(*cargs, bound_m=bm, do_send=True, do_recv=False, accumulate=case.accumulate)
            at.combine(*cargs, bound_m=bm, do_send=False, do_recv=True, accumulate=case.accumulate)
        else:
            at.combine(*cargs, bound_m=bm, accumulate=case.accumulate)
        # Tolerance from the slot rows this rank's tokens gather.
        _, maps = ref.reference_layout(idx, case.num_experts, case.expert_padding, bms)
        m = L.live_tokens(me.bound_m, me.x.shape[0])
        slot = torch.zeros(m, case.topk, case.hidden)
        for d in range(world_size):
            sel = maps[rank].dst_rank[:m] == d
            slot[sel] = ys[d][maps[rank].dst_row[:m][sel]].float()
        tol = torch.zeros(me.x.shape[0], case.hidden)
        tol[:m] = combine_tolerance(slot, me.weights[:m])
        if case.accumulate:
            tol[:m] += outs0[rank][:m].float().abs() * 2.0**-6
        got = out.cpu().float()
        err = (got - want_out.float()).abs()
        bad = ~(err <= tol)
        if bool(bad.any()):
            i = tuple(int(v) for v in bad.nonzero()[0])
            raise AssertionError(
                f"[{case.why}] it{it} rank{rank} combine: {int(bad.sum())} elements outside "
                f"the bound; first at {i}: got {got[i].item()}, expected "
                f"{want_out.float()[i].item()}, bound {tol[i].item():.3g}"
            )
