"""Helpers shared by the MoE tests, benchmarks and notebooks.

- random routing and inputs (bf16, or fp8 e4m3 with f32 block scales), drawn fresh from a
  seeded generator and never all zeros;
- `poison_` to fill outputs before a run so that unwritten elements show;
- comparisons that print the first bad index, both values and the mismatch count;
- `Case` / `run_case`: one checked round of any backend with the TritonAllToAll API
  (dispatch bit-exact, combine within `combine_tolerance`), for tests and benchmarks;
- `spawn` (from `pplx.spawn`): run a function on R processes joined by a process group over
  a free local port, with a timeout, turning a child's exception into an error carrying
  its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pplx.moe import layout as L
from pplx.moe import reference as ref
from pplx.spawn import free_port, spawn  # noqa: F401 - re-exported for the MoE tests/benches

FP8 = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value: block scales map each block's absmax onto it.
FP8_MAX = 448.0


# ---------------------------------------------------------------------------------------
# Random inputs


def random_routing(
    num_tokens: int,
    num_experts: int,
    topk: int,
    generator: torch.Generator,
    *,
    distinct: bool = True,
    index_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing.

    Args:
        distinct: each token names K different experts (needs K <= E); otherwise experts
            are drawn with replacement (duplicates inside one token's top-k).

    Returns:
        indices `[T, K]` index_dtype: global expert per token and slot, and weights `[T, K]`
        torch.float32 in (0, 1) summing to one per token (never zero).
    """
    if distinct:
        if topk > num_experts:
            raise ValueError(f"distinct routing needs topk ({topk}) <= num_experts ({num_experts})")
        scores = torch.rand(num_tokens, num_experts, generator=generator)
        indices = scores.topk(topk, dim=1).indices
    else:
        indices = torch.randint(0, num_experts, (num_tokens, topk), generator=generator)
    logits = torch.randn(num_tokens, topk, generator=generator)
    weights = torch.softmax(logits, dim=1).float()
    return indices.to(index_dtype), weights


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise fp8 e4m3 quantisation: `[T, H]` float -> (`[T, H]` fp8, `[T, S]` f32 scales).

    S = ceil(H / 128); x ~= fp8.float() * scale of its block.
    """
    num_tokens, hidden = x.shape
    nblk = L.hidden_dim_scale(hidden)
    pad = nblk * L.SCALE_BLOCK - hidden
    xp = torch.nn.functional.pad(x.float(), (0, pad)).reshape(num_tokens, nblk, L.SCALE_BLOCK)
    amax = xp.abs().amax(dim=2).clamp(min=1e-6)  # [T, S]
    scale = (amax / FP8_MAX).float()
    q = (xp / scale.unsqueeze(2)).reshape(num_tokens, nblk * L.SCALE_BLOCK)[:, :hidden]
    return q.to(FP8).contiguous(), scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_fp8`: `[T, H]` fp8 and `[T, S]` scales -> `[T, H]` f32."""
    hidden = q.shape[1]
    s = scale.float().repeat_interleave(L.SCALE_BLOCK, dim=1)[:, :hidden]
    return q.float() * s


def random_tokens(
    num_tokens: int, hidden: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random tokens `[T, H]` of `dtype` and, for fp8, their `[T, S]` f32 scales (else None).

    Values are N(0, 1) times a per-token factor in [0.5, 4), so that scales differ by row.
    """
    x = torch.randn(num_tokens, hidden, generator=generator)
    x = x * (0.5 + 3.5 * torch.rand(num_tokens, 1, generator=generator))
    if dtype == FP8:
        return quantize_fp8(x)
    return x.to(dtype), None


@dataclass
class MoEInputs:
    """One rank's dispatch/combine inputs.

    Attributes:
        x: `[T, H]` bf16 or fp8: tokens.
        x_scale: `[T, S]` torch.float32 (fp8 only) or None.
        indices: `[T, K]` int32/int64: global expert per token and slot.
        weights: `[T, K]` torch.float32: combine weights.
        bound_m: live token count or None.
    """

    x: torch.Tensor
    x_scale: torch.Tensor | None
    indices: torch.Tensor
    weights: torch.Tensor
    bound_m: int | None = None


def random_group_inputs(
    seed: int,
    world_size: int,
    num_tokens: int | Sequence[int],
    hidden: int,
    num_experts: int,
    topk: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    distinct: bool = True,
    index_dtype: torch.dtype = torch.int64,
    bound_ms: Sequence[int | None] | None = None,
) -> list[MoEInputs]:
    """Every rank's inputs, reproducible from `seed` (each rank of a test rebuilds them all).

    `num_tokens` is one T for all ranks or one per rank.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = [num_tokens] * world_size if isinstance(num_tokens, int) else list(num_tokens)
    out = []
    for r in range(world_size):
        x, x_scale = random_tokens(sizes[r], hidden, dtype, g)
        idx, w = random_routing(
            sizes[r], num_experts, topk, g, distinct=distinct, index_dtype=index_dtype
        )
        bm = None if bound_ms is None else bound_ms[r]
        out.append(MoEInputs(x=x, x_scale=x_scale, indices=idx, weights=w, bound_m=bm))
    return out


def random_expert_y(
    num_rows: int, hidden: int, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """Random expert outputs `[rows, H]` of `dtype` (bf16 by default in the contract)."""
    return torch.randn(num_rows, hidden, generator=generator).to(dtype)


@dataclass
class GroupExpectation:
    """What the reference says one rank must get, for a group's inputs.

    Attributes:
        dispatch: the reference dispatch result of the rank (`reference.DispatchResult`).
        expert_ys: per rank `[max_recv_tokens, H]` bf16: fresh random expert outputs.
        outs_before: per rank `[T_r, H]` bf16: random combine outputs before the call
            (what `accumulate=True` adds into).
        combine: `[T, H]` bf16: the rank's reference combine output.
    """

    dispatch: Any
    expert_ys: list[torch.Tensor]
    outs_before: list[torch.Tensor]
    combine: torch.Tensor


def expect_group(
    inputs: Sequence[MoEInputs],
    rank: int,
    num_experts: int,
    expert_padding: int,
    max_recv_tokens: int,
    hidden: int,
    seed: int,
    *,
    accumulate: bool = False,
) -> GroupExpectation:
    """Reference dispatch and combine for `rank`, with expert outputs and prior combine
    outputs drawn from `seed` (every rank of a test draws the same ones)."""
    bms = [i.bound_m for i in inputs]
    idx = [i.indices for i in inputs]
    ws = [i.weights for i in inputs]
    want = ref.reference_dispatch(
        [i.x for i in inputs],
        [i.x_scale for i in inputs],
        idx,
        ws,
        num_experts,
        expert_padding,
        bms,
    )[rank]
    g = torch.Generator().manual_seed(seed)
    ys = [random_expert_y(max_recv_tokens, hidden, torch.bfloat16, g) for _ in inputs]
    olds = [random_expert_y(i.x.shape[0], hidden, torch.bfloat16, g) for i in inputs]
    want_out = ref.reference_combine(
        ys,
        idx,
        ws,
        num_experts,
        expert_padding,
        bms,
        torch.bfloat16,
        outs=olds,
        accumulate=accumulate,
    )[rank]
    return GroupExpectation(want, ys, olds, want_out)


# ---------------------------------------------------------------------------------------
# Poisoning and comparison


def poison_(t: torch.Tensor | None) -> torch.Tensor | None:
    """Fill `t` with a value no correct run writes: NaN for floats (0x7F bytes for fp8, a
    NaN in e4m3fn), 0x7F7F7F7F-like for integers. Returns `t`."""
    if t is None:
        return None
    if t.dtype == FP8 or t.element_size() == 1:
        t.view(torch.uint8).fill_(0x7F)
    elif t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).max // 3)
    return t


def _fmt_row(t: torch.Tensor, n: int = 6) -> str:
    vals = t.reshape(-1)[:n]
    if vals.dtype == FP8:
        vals = vals.float()
    return str(vals.tolist())


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """`torch.equal` on the bytes; on failure, report the first bad index, both values and
    how many elements differ."""
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise AssertionError(f"{name}: dtype {got.dtype} != expected {want.dtype}")
    g = got.detach().cpu().contiguous()
    w = want.detach().cpu().contiguous()
    gb = g.view(torch.uint8) if g.dtype != torch.bool else g
    wb = w.view(torch.uint8) if w.dtype != torch.bool else w
    if torch.equal(gb, wb):
        return
    bad = (gb != wb).reshape(g.shape[0], -1).any(dim=1) if g.dim() else (gb != wb)
    bad_rows = bad.nonzero().reshape(-1)
    first = int(bad_rows[0]) if g.dim() else 0
    raise AssertionError(
        f"{name}: {bad_rows.numel()} of {g.shape[0] if g.dim() else 1} rows differ; first "
        f"at index {first}: got {_fmt_row(g[first])}, expected {_fmt_row(w[first])}"
    )


def assert_close(
    got: torch.Tensor, want: torch.Tensor, name: str, *, atol: float, rtol: float
) -> None:
    """Elementwise |got - want| <= atol + rtol * |want| in f32; on failure, report the first
    bad index, both values, the worst error and how many elements fail."""
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    g = got.detach().cpu().float()
    w = want.detach().cpu().float()
    err = (g - w).abs()
    bad = ~(err <= atol + rtol * w.abs())  # NaN counts as bad
    if not bool(bad.any()):
        return
    idx = tuple(int(i) for i in bad.nonzero()[0])
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {bad.numel()} elements outside atol={atol} rtol={rtol}; "
        f"first at {idx}: got {g[idx].item()}, expected {w[idx].item()}; "
        f"max abs err {err.nan_to_num(float('inf')).max().item():.3g}"
    )


def assert_dispatch_matches(
    expert_num_tokens: torch.Tensor,
    expert_x: torch.Tensor,
    expert_x_scale: torch.Tensor | None,
    want: Any,
    expert_padding: int,
    name: str = "dispatch",
) -> None:
    """Compare one rank's dispatch outputs with a `reference.DispatchResult`, bit-exact, on
    the rows that hold tokens (padding rows and rows past the blocks are unspecified)."""
    assert_bitwise_equal(
        expert_num_tokens.cpu().to(torch.int32), want.expert_num_tokens, f"{name}.expert_num_tokens"
    )
    rows = int(want.expert_offsets[-1])
    if expert_x.shape[0] < rows:
        raise AssertionError(f"{name}.expert_x has {expert_x.shape[0]} rows, needs {rows}")
    mask = L.valid_row_mask(want.expert_num_tokens, expert_padding, rows)
    counts = want.expert_num_tokens.tolist()
    assert_bitwise_equal(
        expert_x.cpu()[:rows][mask],
        want.expert_x[:rows][mask],
        f"{name}.expert_x (counts {counts})",
    )
    if want.expert_x_scale is not None:
        if expert_x_scale is None:
            raise AssertionError(f"{name}.expert_x_scale is None, expected scales")
        assert_bitwise_equal(
            expert_x_scale.cpu()[:rows][mask],
            want.expert_x_scale[:rows][mask],
            f"{name}.expert_x_scale (counts {counts})",
        )


# ---------------------------------------------------------------------------------------
# One round through an implementation (AllToAll, TritonAllToAll, InterNodeAllToAll, ...)


def run_dispatch(
    impl: Any,
    outs: Any,
    inputs: MoEInputs,
    bound_m: torch.Tensor | None,
    *,
    split: bool = False,
) -> None:
    """Poison `outs` (a `DispatchOutputs`), then `impl.dispatch` `inputs` into it: in one
    call, or with `split` as a do_send-only call followed by a do_recv-only call."""
    for t in (outs.expert_num_tokens, outs.expert_x, outs.expert_x_scale):
        poison_(t)
    args = (
        outs.expert_num_tokens,
        outs.expert_x,
        outs.expert_x_scale,
        inputs.x,
        inputs.x_scale,
        inputs.indices,
        inputs.weights,
        bound_m,
    )
    if split:
        impl.dispatch(*args, do_send=True, do_recv=False)
        impl.dispatch(*args, do_send=False, do_recv=True)
    else:
        impl.dispatch(*args)


def run_combine(
    impl: Any,
    out: torch.Tensor,
    inputs: MoEInputs,
    expert_y: torch.Tensor,
    bound_m: torch.Tensor | None,
    *,
    split: bool = False,
    accumulate: bool = False,
) -> None:
    """`impl.combine` `expert_y` back into `out`, in one call or split (as `run_dispatch`)."""
    args = (out, inputs.indices, inputs.weights, expert_y, bound_m)
    if split:
        impl.combine(*args, do_send=True, do_recv=False, accumulate=accumulate)
        impl.combine(*args, do_send=False, do_recv=True, accumulate=accumulate)
    else:
        impl.combine(*args, accumulate=accumulate)


# ---------------------------------------------------------------------------------------
# One checked round of a backend against the reference (every rank rebuilds every rank's
# inputs from the seed, runs the backend on its own and compares with the single-process
# reference: dispatch bit-exact, combine within the bound of combine_kernels.py)


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


def run_case(
    at,
    case: Case,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    errors: list[str] | None = None,
) -> None:
    """Run `case` for `iters` iterations on the backend object `at` (TritonAllToAll API).

    A mismatch raises AssertionError, or, with `errors` given, is appended to it and the
    round goes on, so that this rank still takes part in every collective step of it
    (a rank that stopped halfway would leave its peers waiting)."""

    def fail(msg: str) -> None:
        if errors is None:
            raise AssertionError(msg)
        errors.append(msg)

    max_t = at.max_num_tokens
    for it in range(case.iters):
        s = seed * 1000 + it
        ins = random_group_inputs(
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
        x_scales = [i.x_scale for i in ins] if case.dtype == FP8 else None
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
        ent = poison_(torch.empty(e_local, dtype=torch.int32, device=device))
        ex = poison_(torch.empty(rows, case.hidden, dtype=case.dtype, device=device))
        exs = None
        if case.dtype == FP8:
            exs = poison_(
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
        try:
            assert_dispatch_matches(
                ent,
                ex,
                exs,
                want,
                case.expert_padding,
                name=f"[{case.why}] it{it} rank{rank} dispatch",
            )
        except AssertionError as e:
            fail(str(e))

        # Combine: fresh expert outputs on every rank, at the reference's row positions.
        g = torch.Generator().manual_seed(s + 7)
        ys = [random_expert_y(rows, case.hidden, torch.bfloat16, g) for _ in range(world_size)]
        outs0 = [random_expert_y(i.x.shape[0], case.hidden, torch.bfloat16, g) for i in ins]
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
            fail(
                f"[{case.why}] it{it} rank{rank} combine: {int(bad.sum())} elements outside "
                f"the bound; first at {i}: got {got[i].item()}, expected "
                f"{want_out.float()[i].item()}, bound {tol[i].item():.3g}"
            )
