"""`AllToAll(backend="torch")` and the `all_to_all_single` baseline against the reference.

Ranks are processes joined by gloo on 127.0.0.1. Spawning costs seconds, so each world
size runs one spawn that goes through many cases; a failing case names itself.

Tolerances: dispatch moves bytes, so it is compared bit-exactly. Combine sums K products
in f32: the torch backend does the reference's operations in the reference's order, the
baseline sums with `sum(dim=1)` (another order, a few f32 ulps apart); both then round to
bf16, where such a difference can flip one bf16 ulp (2^-8 relative). Hence rtol 2^-7 and
atol 1e-3 (for sums that cancel to near zero; inputs are O(1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pplx.moe import AllToAll, baseline
from pplx.moe import testing as TT
from pplx.moe.layout import hidden_dim_scale

COMBINE_RTOL = 2**-7
COMBINE_ATOL = 1e-3


@dataclass
class Case:
    why: str
    tokens: int | tuple[int, ...]  # per rank T (one value for all ranks or one per rank)
    hidden: int = 128
    experts_per_rank: int = 2
    topk: int = 2
    padding: int = 1
    fp8: bool = False
    distinct: bool = True
    bound_ms: tuple[int | None, ...] | None = None
    accumulate: bool = False
    split: bool = False  # do_send / do_recv in two calls
    int32: bool = False
    one_expert: bool = False  # every slot names expert 1
    max_num_tokens: int | None = None


def _run_case(rank: int, world: int, seed: int, c: Case) -> None:
    experts = c.experts_per_rank * world
    dtype = TT.FP8 if c.fp8 else torch.bfloat16
    inputs = TT.random_group_inputs(
        seed,
        world,
        c.tokens,
        c.hidden,
        experts,
        c.topk,
        dtype,
        distinct=c.distinct,
        index_dtype=torch.int32 if c.int32 else torch.int64,
        bound_ms=c.bound_ms,
    )
    if c.one_expert:
        for i in inputs:
            i.indices.fill_(1)
    me = inputs[rank]
    max_t = c.max_num_tokens or max(i.x.shape[0] for i in inputs) or 1
    a2a = AllToAll(
        max_num_tokens=max_t,
        num_experts=experts,
        expert_padding=c.padding,
        hidden_dim=c.hidden,
        hidden_dim_scale=hidden_dim_scale(c.hidden) if c.fp8 else None,
        in_dtype=dtype,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32 if c.fp8 else None,
        num_experts_per_token=c.topk,
        backend="torch",
    )
    bound = None if me.bound_m is None else torch.tensor([me.bound_m], dtype=torch.int32)
    exp = TT.expect_group(
        inputs,
        rank,
        experts,
        c.padding,
        a2a.max_recv_tokens,
        c.hidden,
        seed + 1,
        accumulate=c.accumulate,
    )
    want, ys, olds, want_out = exp.dispatch, exp.expert_ys, exp.outs_before, exp.combine

    with a2a:
        # AllToAll, torch backend.
        outs = a2a.alloc_dispatch_outputs()
        TT.run_dispatch(a2a, outs, me, bound, split=c.split)
        TT.assert_dispatch_matches(
            outs.expert_num_tokens,
            outs.expert_x,
            outs.expert_x_scale,
            want,
            c.padding,
            "AllToAll.dispatch",
        )
        out = olds[rank].clone()
        TT.run_combine(a2a, out, me, ys[rank], bound, split=c.split, accumulate=c.accumulate)
        TT.assert_close(out, want_out, "AllToAll.combine", atol=COMBINE_ATOL, rtol=COMBINE_RTOL)

    # Baseline.
    outs = a2a.alloc_dispatch_outputs()
    for t in (outs.expert_num_tokens, outs.expert_x, outs.expert_x_scale):
        TT.poison_(t)
    plan = baseline.baseline_dispatch(
        outs.expert_num_tokens,
        outs.expert_x,
        outs.expert_x_scale,
        me.x,
        me.x_scale,
        me.indices,
        experts,
        c.padding,
        me.bound_m,
    )
    TT.assert_dispatch_matches(
        outs.expert_num_tokens,
        outs.expert_x,
        outs.expert_x_scale,
        want,
        c.padding,
        "baseline_dispatch",
    )
    out = olds[rank].clone()
    baseline.baseline_combine(out, me.weights, ys[rank], plan, accumulate=c.accumulate)
    TT.assert_close(out, want_out, "baseline_combine", atol=COMBINE_ATOL, rtol=COMBINE_RTOL)


def _run_cases(rank: int, world: int, cases: list[Case]) -> tuple[int, str]:
    for n, c in enumerate(cases):
        try:
            _run_case(rank, world, 100 * world + n, c)
        except Exception as e:
            raise AssertionError(f"case {c.why!r} (world {world}, rank {rank}): {e}") from e
    # E = 2 * world + 1 experts cannot be split over the group: a clear error, no exchange.
    try:
        AllToAll(4, 2 * world + 1, 1, 128, None, torch.bfloat16, torch.bfloat16, None, 2)
    except ValueError as e:
        return len(cases), str(e)
    return len(cases), "no error"


CASES_2 = [
    Case("bf16 basic", 5),
    Case("zero tokens on every rank", 0, max_num_tokens=4),
    Case("one token", 1, padding=16),
    Case("uneven T per rank, int32 indices", (6, 2), int32=True),
    Case("every slot to one expert (duplicates)", 4, topk=3, distinct=False, one_expert=True),
    Case("K == E", 3, experts_per_rank=2, topk=4),
    Case("top-1, padding 128", 6, topk=1, padding=128),
    Case("hidden 7168 fp8, top-8, E 16", 2, hidden=7168, experts_per_rank=8, topk=8, fp8=True),
    Case("bound_m < T, accumulate", 6, bound_ms=(3, 0), accumulate=True, padding=16),
    Case("do_send / do_recv split, fp8", 5, fp8=True, split=True, padding=16),
]
CASES_3 = [
    Case("3 ranks bf16, top-4 duplicates", 5, topk=4, distinct=False, padding=16),
    Case("3 ranks hidden 2880 fp8, bound_m", 4, hidden=2880, fp8=True, bound_ms=(2, 4, None)),
    Case("3 ranks split + accumulate", (3, 0, 5), split=True, accumulate=True),
]
CASES_4 = [
    Case("4 ranks top-8 E 16, padding 16", 4, experts_per_rank=4, topk=8, padding=16),
    Case("4 ranks fp8 hidden 7168 top-4", 2, hidden=7168, topk=4, fp8=True, padding=128),
]


@pytest.mark.parametrize(
    "world,cases", [(2, CASES_2), (3, CASES_3), (4, CASES_4)], ids=["world2", "world3", "world4"]
)
def test_torch_backend_and_baseline_match_reference(world, cases):
    results = TT.spawn(_run_cases, world, (cases,), timeout_s=240)
    assert [n for n, _ in results] == [len(cases)] * world
    # Experts not divisible by the world size.
    want = f"num_experts ({2 * world + 1}) must be divisible by the world size ({world})"
    assert all(want in msg for _, msg in results), results


def test_single_rank_without_process_group():
    # No torch.distributed: one rank holds every expert.
    _run_case(0, 1, 5, Case("single rank", 4, padding=16, fp8=True))
    _run_case(0, 1, 6, Case("single rank, split, accumulate", 3, split=True, accumulate=True))


# ---------------------------------------------------------------------------------------
# Bad input: clear errors, raised before any exchange.


def _a2a(**kw) -> AllToAll:
    args = dict(
        max_num_tokens=4,
        num_experts=4,
        expert_padding=1,
        hidden_dim=128,
        hidden_dim_scale=1,
        in_dtype=TT.FP8,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32,
        num_experts_per_token=2,
    )
    args.update(kw)
    return AllToAll(**args)


def _dispatch_args(a2a: AllToAll, tokens: int = 3):
    inp = TT.random_group_inputs(9, 1, tokens, 128, 4, 2, a2a.in_dtype)[0]
    outs = a2a.alloc_dispatch_outputs()
    return dict(
        out_expert_num_tokens=outs.expert_num_tokens,
        out_expert_x=outs.expert_x,
        out_expert_x_scale=outs.expert_x_scale,
        dp_x=inp.x,
        dp_x_scale=inp.x_scale,
        indices=inp.indices,
        weights=inp.weights,
    )


BAD_DISPATCH = [
    (
        "dp_x dtype",
        lambda a: a.update(dp_x=a["dp_x"].to(torch.bfloat16)),
        TypeError,
        r"dp_x must have dtype torch.float8_e4m3fn, got torch.bfloat16",
    ),
    (
        "dp_x shape",
        lambda a: a.update(dp_x=torch.zeros(3, 64).to(TT.FP8)),
        ValueError,
        r"dp_x must have shape \('\*', 128\), got \(3, 64\)",
    ),
    (
        "dp_x device",
        lambda a: a.update(dp_x=torch.empty(3, 128, dtype=TT.FP8, device="meta")),
        ValueError,
        r"dp_x must be on cpu, got meta",
    ),
    (
        "index out of range",
        lambda a: a["indices"].__setitem__((1, 1), 4),
        ValueError,
        r"indices\[1, 1\] = 4 is out of range: expected expert indices in \[0, 4\)",
    ),
    (
        "negative index",
        lambda a: a["indices"].__setitem__((0, 0), -1),
        ValueError,
        r"indices\[0, 0\] = -1 is out of range",
    ),
    (
        "indices dtype",
        lambda a: a.update(indices=a["indices"].float()),
        TypeError,
        r"indices must have dtype torch.int32 or torch.int64, got torch.float32",
    ),
    (
        "weights shape",
        lambda a: a.update(weights=a["weights"][:2]),
        ValueError,
        r"weights must have shape \(3, 2\), got \(2, 2\)",
    ),
    (
        "scale shape",
        lambda a: a.update(dp_x_scale=torch.ones(3, 2)),
        ValueError,
        r"dp_x_scale must have shape \(3, 1\), got \(3, 2\)",
    ),
    (
        "missing scale",
        lambda a: a.update(dp_x_scale=None),
        TypeError,
        r"dp_x_scale must be a torch.Tensor, got NoneType",
    ),
    (
        "expert_x too small",
        lambda a: a.update(out_expert_x=a["out_expert_x"][:5]),
        ValueError,
        r"out_expert_x must have at least 8 rows \(max_recv_tokens\), got 5",
    ),
    (
        "counts dtype",
        lambda a: a.update(out_expert_num_tokens=torch.zeros(4, dtype=torch.int64)),
        TypeError,
        r"out_expert_num_tokens must have dtype torch.int32, got torch.int64",
    ),
    (
        "bound_m dtype",
        lambda a: a.update(bound_m=torch.tensor([2])),
        TypeError,
        r"bound_m must have dtype torch.int32, got torch.int64",
    ),
    (
        "bound_m > T",
        lambda a: a.update(bound_m=torch.tensor([5], dtype=torch.int32)),
        ValueError,
        r"bound_m must be in \[0, 3\] \(T\), got 5",
    ),
    (
        "no phase",
        lambda a: a.update(do_send=False, do_recv=False),
        ValueError,
        r"at least one of do_send and do_recv",
    ),
]


@pytest.mark.parametrize("why,edit,exc,match", BAD_DISPATCH, ids=[b[0] for b in BAD_DISPATCH])
def test_dispatch_rejects_bad_input(why, edit, exc, match):
    a2a = _a2a()
    args = _dispatch_args(a2a)
    edit(args)
    with pytest.raises(exc, match=match):
        a2a.dispatch(**args)


def test_too_many_tokens():
    a2a = _a2a(max_num_tokens=2)
    args = _dispatch_args(_a2a(), tokens=3)
    with pytest.raises(ValueError, match=r"indices has 3 tokens, more than max_num_tokens=2"):
        a2a.dispatch(**args)


def test_combine_rejects_bad_input():
    a2a = _a2a(in_dtype=torch.bfloat16, hidden_dim_scale=None, scale_dtype=None)
    inp = TT.random_group_inputs(9, 1, 3, 128, 4, 2)[0]
    y = a2a.alloc_expert_y()
    out = a2a.alloc_combine_output(3)
    with pytest.raises(TypeError, match=r"expert_y must have dtype torch.bfloat16, got "):
        a2a.combine(out, inp.indices, inp.weights, y.float())
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 2\), got \(3, 2\)"):
        a2a.combine(out[:2], inp.indices, inp.weights, y)
    with pytest.raises(TypeError, match=r"accumulate must be a bool"):
        a2a.combine(out, inp.indices, inp.weights, y, accumulate=1)
    with pytest.raises(RuntimeError, match=r"without a preceding do_send"):
        a2a.combine(out, inp.indices, inp.weights, y, do_send=False)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"in_dtype must be one of"):
        _a2a(in_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"expert_padding must be >= 1, got 0"):
        _a2a(expert_padding=0)
    with pytest.raises(TypeError, match=r"max_num_tokens must be an int, got float"):
        _a2a(max_num_tokens=4.0)
    with pytest.raises(ValueError, match=r"hidden_dim_scale must be None or 0 for"):
        _a2a(in_dtype=torch.bfloat16, hidden_dim_scale=1)
    with pytest.raises(TypeError, match=r"scale_dtype must be torch.float32 for fp8"):
        _a2a(scale_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        _a2a(backend="cuda")
    with pytest.raises(ValueError, match=r"ranks_per_node \(2\) must divide the world size \(1\)"):
        _a2a(ranks_per_node=2)
    a2a = _a2a(ranks_per_node=1)
    a2a.destroy()
    with pytest.raises(RuntimeError, match=r"destroyed"):
        a2a.dispatch(**_dispatch_args(_a2a()))
