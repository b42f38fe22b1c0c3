"""Dispatch/combine across emulated nodes against the reference (`pplx.moe.internode`).

Ranks are processes on this machine; `ranks_per_node` splits them into nodes: inside a node
rows move over the node's gloo group, between nodes only through the TransferEngine (shm
or tcp) with fault injection on (immediates held, reordered and delayed up to 200 us, as
EFA delivers them). Spawning costs seconds, so each world size runs one spawn through every
case; a failing case names itself.

Tolerances: dispatch moves bytes: bit-exact. Combine does the reference's f32 operations in
the reference's order, so it matches exactly in practice; we allow one bf16 ulp (2^-8
relative; atol 1e-3 for sums that cancel near zero) as the torch-backend tests do.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

from pplx.fabric import FaultInjection
from pplx.moe import AllToAll
from pplx.moe import reference as R
from pplx.moe import testing as TT
from pplx.moe.internode import InterNodeAllToAll, InterNodeOptions
from pplx.moe.layout import hidden_dim_scale

COMBINE_RTOL = 2**-7
COMBINE_ATOL = 1e-3


@dataclass
class Case:
    why: str
    ranks_per_node: int
    tokens: int | tuple[int, ...] = 6
    hidden: int = 128
    experts_per_rank: int = 2
    topk: int = 3
    padding: int = 1
    fp8: bool = False
    distinct: bool = True
    bound_ms: tuple[int | None, ...] | None = None
    accumulate: bool = False
    split: bool = False
    one_expert: bool = False  # every slot names expert 0 (all rows to rank 0: overflow)
    max_private: int | None = None
    iters: int = 1  # rounds on the same object, fresh inputs each (buffer reuse)
    provider: str = "shm"
    nets: int = 1
    shard_threshold: int | None = None
    direct: bool = False  # InterNodeAllToAll itself (also for one node)
    proxy: bool = False
    backend: str = "torch"  # intra-node part: torch collectives or Triton kernels


def _run_case(rank: int, world: int, seed: int, c: Case) -> dict:
    experts = c.experts_per_rank * world
    dtype = TT.FP8 if c.fp8 else torch.bfloat16
    max_t = max(c.tokens) if isinstance(c.tokens, tuple) else c.tokens
    opts = InterNodeOptions(
        provider=c.provider,
        nets_per_gpu=c.nets,
        shard_threshold=c.shard_threshold,
        timeout_s=60.0,
        fault_injection=FaultInjection(window=16, max_delay_us=200, seed=seed + rank),
        use_proxy=c.proxy,
    )
    kw = dict(
        max_num_tokens=max_t,
        num_experts=experts,
        expert_padding=c.padding,
        hidden_dim=c.hidden,
        hidden_dim_scale=hidden_dim_scale(c.hidden) if c.fp8 else None,
        in_dtype=dtype,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32 if c.fp8 else None,
        num_experts_per_token=c.topk,
    )
    a2a = AllToAll(
        **kw,
        backend=c.backend,
        max_private_tokens=c.max_private,
        ranks_per_node=c.ranks_per_node,
        internode=opts,
    )
    impl = a2a
    if c.direct:
        impl = InterNodeAllToAll(
            **{**kw, "hidden_dim_scale": a2a.hidden_dim_scale, "scale_dtype": a2a.scale_dtype},
            group=None,
            device=torch.device("cpu"),
            ranks_per_node=c.ranks_per_node,
            max_private_tokens=c.max_private,
            options=opts,
        )
    info = {"overflowed": False}
    if isinstance(a2a._impl, InterNodeAllToAll):
        info["fabric_path"] = a2a._impl.fabric_path if a2a._impl.engine else "none"
        info["poster"] = a2a._impl._poster.name if a2a._impl._poster else "none"
        info["intra"] = a2a._impl.intra_backend
        info["triton_used"] = a2a._impl._tri is not None
    with a2a:
        for it in range(c.iters):
            inputs = TT.random_group_inputs(
                seed + 17 * it,
                world,
                c.tokens,
                c.hidden,
                experts,
                c.topk,
                dtype,
                distinct=c.distinct,
                bound_ms=c.bound_ms,
            )
            if c.one_expert:
                for i in inputs:
                    i.indices.fill_(0)
            me = inputs[rank]
            bound = None if me.bound_m is None else torch.tensor([me.bound_m], dtype=torch.int32)
            exp = TT.expect_group(
                inputs,
                rank,
                experts,
                c.padding,
                a2a.max_recv_tokens,
                c.hidden,
                seed + 1 + it,
                accumulate=c.accumulate,
            )
            want, ys, olds, want_out = exp.dispatch, exp.expert_ys, exp.outs_before, exp.combine
            outs = a2a.alloc_dispatch_outputs()
            TT.run_dispatch(impl, outs, me, bound, split=c.split)
            TT.assert_dispatch_matches(
                outs.expert_num_tokens,
                outs.expert_x,
                outs.expert_x_scale,
                want,
                c.padding,
                f"dispatch (iteration {it})",
            )
            out = olds[rank].clone()
            TT.run_combine(impl, out, me, ys[rank], bound, split=c.split, accumulate=c.accumulate)
            TT.assert_close(
                out, want_out, f"combine (iteration {it})", atol=COMBINE_ATOL, rtol=COMBINE_RTOL
            )
            inter = impl if isinstance(impl, InterNodeAllToAll) else a2a._impl
            if isinstance(inter, InterNodeAllToAll) and inter.engine is not None:
                st = inter._dispatch
                q = inter.max_private
                info["overflowed"] |= any(st.send_counts[d] > q for d in inter.remote_ranks)
    if impl is not a2a:
        impl.destroy()
    return info


def _run_cases(rank: int, world: int, cases: list[Case]) -> list[dict]:
    infos = []
    for n, c in enumerate(cases):
        try:
            infos.append(_run_case(rank, world, 1000 * world + 10 * n, c))
        except Exception as e:
            raise AssertionError(f"case {c.why!r} (world {world}, rank {rank}): {e}") from e
    return infos


CASES_4 = [
    Case("2x2 bf16, overflow, split, 3 rounds", 2, tokens=8, max_private=2, split=True, iters=3),
    Case(
        "4x1 fp8, bound_m, padding 16, 2 nets (sharded writes)",
        1,
        tokens=5,
        fp8=True,
        padding=16,
        bound_ms=(3, 5, 0, 2),
        nets=2,
        shard_threshold=256,
        max_private=3,
        iters=2,
    ),
    Case("2x2 tcp, accumulate, uneven T", 2, tokens=(4, 0, 6, 3), accumulate=True, provider="tcp"),
    Case("1x4 (one node: torch backend)", 4, tokens=5, fp8=True),
    Case("1x4 InterNodeAllToAll itself (no fabric)", 4, tokens=5, direct=True, split=True),
    Case(
        "2x2 every slot to expert 0, writes through the C host proxy",
        2,
        tokens=6,
        topk=2,
        distinct=False,
        one_expert=True,
        proxy=True,
        iters=2,
    ),
]
CASES_3 = [
    Case(
        "3x1 bf16 top-4 duplicates, overflow",
        1,
        tokens=7,
        topk=4,
        distinct=False,
        iters=2,
        max_private=1,
        padding=4,
    ),
    Case(
        "3x1 fp8 hidden 2880, split, accumulate",
        1,
        tokens=4,
        hidden=2880,
        fp8=True,
        split=True,
        accumulate=True,
    ),
]


CASES_TRITON = [
    Case(
        "2x2 Triton intra-node, bf16, overflow, split, 2 rounds",
        2,
        tokens=5,
        max_private=2,
        split=True,
        iters=2,
        backend="triton",
        padding=4,
    ),
    Case(
        "2x2 Triton intra-node, fp8, bound_m",
        2,
        tokens=4,
        fp8=True,
        bound_ms=(2, 4, 0, 3),
        backend="triton",
    ),
]


def _run_triton(rank: int, world: int) -> list[dict]:
    os.environ["TRITON_INTERPRET"] = "1"  # before pplx.moe.kernels is imported
    return _run_cases(rank, world, CASES_TRITON)


def test_internode_triton_intra_node_under_interpreter():
    infos = TT.spawn(_run_triton, 4, (), timeout_s=300)
    assert any(i[0]["overflowed"] for i in infos), infos
    assert all(i[0]["intra"] == "triton" and i[0]["triton_used"] for i in infos), infos


def _construction_errors(rank: int, world: int) -> list[str]:
    msgs = []
    kw = dict(
        max_num_tokens=8,
        num_experts=2 * world,
        expert_padding=1,
        hidden_dim=64,
        hidden_dim_scale=None,
        in_dtype=torch.bfloat16,
        out_dtype=torch.bfloat16,
        scale_dtype=None,
        num_experts_per_token=2,
        backend="torch",
    )
    for bad in (
        dict(ranks_per_node=3),
        dict(
            ranks_per_node=1,
            max_private_tokens=4,
            internode=InterNodeOptions(max_overflow_tokens=10),
        ),
    ):
        try:
            AllToAll(**kw, **bad).destroy()
            msgs.append("no error")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def _run_world4(rank: int, world: int) -> tuple[list[dict], list[str]]:
    return _run_cases(rank, world, CASES_4), _construction_errors(rank, world)


def test_internode_world4_splits_2x2_4x1_1x4():
    results = TT.spawn(_run_world4, 4, (), timeout_s=240)
    infos = [r[0] for r in results]
    # The overflow path ran (2x2 case with Q = 2, 8 tokens x top-3 spread over 4 ranks).
    assert any(i[0]["overflowed"] for i in infos), infos
    assert all(i[0].get("fabric_path") == "host memory" for i in infos), infos
    assert [i[0]["poster"] for i in infos] == ["python"] * 4, infos
    assert [i[-1]["poster"] for i in infos] == ["proxy"] * 4, infos
    for _, msgs in results:
        assert "ranks_per_node (3) must divide the world size (4)" in msgs[0], msgs
        # 3 remote ranks x (8 x 2 slots - 4 private) = 36 rows needed.
        assert "max_overflow_tokens=10 is too small" in msgs[1] and "36 rows" in msgs[1], msgs


def test_internode_world3_split_3x1():
    infos = TT.spawn(_run_cases, 3, (CASES_3,), timeout_s=240)
    assert any(i[0]["overflowed"] for i in infos), infos


def _dying_rank(rank: int, world: int, timeout_s: float) -> str:
    a2a = AllToAll(
        max_num_tokens=4,
        num_experts=4,
        expert_padding=1,
        hidden_dim=64,
        hidden_dim_scale=None,
        in_dtype=torch.bfloat16,
        out_dtype=torch.bfloat16,
        scale_dtype=None,
        num_experts_per_token=2,
        backend="torch",
        ranks_per_node=1,
        internode=InterNodeOptions(timeout_s=timeout_s),
    )
    if rank == 1:
        # Dies after construction, before its first dispatch; the pause lets the last
        # gloo message of the constructor reach rank 0 first.
        time.sleep(1.0)
        os._exit(0)
    inp = TT.random_group_inputs(5, world, 4, 64, 4, 2)[rank]
    outs = a2a.alloc_dispatch_outputs()
    t0 = time.monotonic()
    try:
        a2a.dispatch(
            outs.expert_num_tokens, outs.expert_x, None, inp.x, None, inp.indices, inp.weights
        )
    except TimeoutError as e:
        return f"{time.monotonic() - t0:.1f}|{e}"
    finally:
        a2a.destroy()
    return "no error"


def test_dead_rank_makes_peers_fail_within_timeout():
    from pplx.spawn import spawn

    res = spawn(_dying_rank, 2, (3.0,), timeout_s=120, may_exit=(1,))
    elapsed, msg = res[0].split("|", 1)
    assert "from rank 1 (node 1)" in msg and "peer died" in msg, msg
    assert float(elapsed) < 20.0, elapsed


@pytest.mark.gpu
@pytest.mark.parametrize(
    "world,per_node,backend",
    [(2, 1, "torch"), (4, 2, "triton"), (4, 2, "torch")],
    ids=["2gpus-2x1", "4gpus-2x2-triton", "4gpus-2x2-torch"],
)
def test_gpus_as_nodes(world, per_node, backend):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    paths = TT.spawn(_gpu_case, world, (per_node, backend), timeout_s=300, backend="nccl")
    # Rows cross the fabric through pinned host memory (no FI_HMEM here) or directly.
    assert all(p.startswith(("staged", "direct")) for p in paths), paths


def _gpu_case(rank: int, world: int, per_node: int, backend: str) -> str:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    experts, topk, hidden = 16, 4, 7168
    inputs = TT.random_group_inputs(7, world, 64, hidden, experts, topk, TT.FP8)
    a2a = AllToAll(
        64,
        experts,
        16,
        hidden,
        hidden_dim_scale(hidden),
        TT.FP8,
        torch.bfloat16,
        torch.float32,
        topk,
        device=dev,
        backend=backend,
        ranks_per_node=per_node,
        max_private_tokens=16,
    )
    path = a2a._impl.fabric_path
    want = R.reference_dispatch(
        [i.x for i in inputs],
        [i.x_scale for i in inputs],
        [i.indices for i in inputs],
        [i.weights for i in inputs],
        experts,
        16,
    )[rank]
    me = inputs[rank]
    with a2a:
        for _ in range(2):
            outs = a2a.alloc_dispatch_outputs()
            TT.poison_(outs.expert_x)
            a2a.dispatch(
                outs.expert_num_tokens,
                outs.expert_x,
                outs.expert_x_scale,
                me.x.to(dev),
                me.x_scale.to(dev),
                me.indices.to(dev),
                me.weights.to(dev),
            )
            TT.assert_dispatch_matches(
                outs.expert_num_tokens, outs.expert_x, outs.expert_x_scale, want, 16
            )
            y = TT.random_expert_y(
                a2a.max_recv_tokens, hidden, torch.bfloat16, torch.Generator().manual_seed(rank)
            )
            ys = [
                TT.random_expert_y(
                    a2a.max_recv_tokens, hidden, torch.bfloat16, torch.Generator().manual_seed(r)
                )
                for r in range(world)
            ]
            want_out = R.reference_combine(
                ys, [i.indices for i in inputs], [i.weights for i in inputs], experts, 16
            )[rank]
            out = a2a.alloc_combine_output()
            a2a.combine(out, me.indices.to(dev), me.weights.to(dev), y.to(dev))
            TT.assert_close(out, want_out, "combine", atol=COMBINE_ATOL, rtol=COMBINE_RTOL)
    return path
