"""The Triton all-to-all on GPUs (NVLink, torch symmetric memory), against the reference.

Dispatch bit-exact, combine within `pplx.moe.testing.combine_tolerance`, at EP2 and EP4
(when 4 GPUs exist), decode and prefill-like shapes, hidden 7168 and 2880, and a CUDA graph
of a whole dispatch + combine step replayed with changing inputs and `bound_m`.
"""

from __future__ import annotations

import pytest
import torch

from pplx.moe import testing as mt

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


def _num_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _make(world_size: int, **kw):
    from pplx.moe import layout as L
    from pplx.moe.kernels import TritonAllToAll

    fp8 = kw["in_dtype"] == FP8
    return TritonAllToAll(
        hidden_dim_scale=L.hidden_dim_scale(kw["hidden_dim"]) if fp8 else 0,
        out_dtype=torch.bfloat16,
        scale_dtype=torch.float32 if fp8 else None,
        device=torch.device("cuda", torch.cuda.current_device()),
        **kw,
    )


def _cases_worker(rank: int, world_size: int) -> int:
    torch.cuda.set_device(rank)
    from pplx.moe.testing import Case, run_case

    dev = torch.device("cuda", rank)
    done = 0
    configs = [
        # Decode as in the benchmark: fp8 + 56 scales, 256 experts, top-8, 3 iterations
        # (buffer reuse), then a bound_m step and a split send/recv step.
        (
            dict(
                max_num_tokens=128,
                num_experts=256,
                expert_padding=1,
                hidden_dim=7168,
                in_dtype=FP8,
                num_experts_per_token=8,
            ),
            [
                Case("decode fp8 H7168 E256 K8", 128, 7168, 256, 8, FP8, iters=3),
                Case(
                    "decode bound_m",
                    128,
                    7168,
                    256,
                    8,
                    FP8,
                    bound_ms=[17 * (r + 1) % 129 for r in range(world_size)],
                ),
                Case(
                    "decode split + accumulate", 128, 7168, 256, 8, FP8, split=True, accumulate=True
                ),
            ],
        ),
        # Prefill-like: 1024 tokens, hidden 2880 (gpt-oss), bf16, padding 16, ragged T.
        (
            dict(
                max_num_tokens=1024,
                num_experts=32 * world_size,
                expert_padding=16,
                hidden_dim=2880,
                in_dtype=torch.bfloat16,
                num_experts_per_token=4,
            ),
            [
                Case("prefill bf16 H2880", 1024, 2880, 32 * world_size, 4, torch.bfloat16, 16),
                Case(
                    "prefill ragged T, every token to one expert",
                    [1024 - 300 * r for r in range(world_size)],
                    2880,
                    32 * world_size,
                    4,
                    torch.bfloat16,
                    16,
                    all_to_one=True,
                ),
            ],
        ),
    ]
    for n, (kw, cases) in enumerate(configs):
        at = _make(world_size, **kw)
        for i, case in enumerate(cases):
            run_case(at, case, 10 * n + i, rank, world_size, dev)
            done += 1
        at.destroy()
    return done


def _graph_worker(rank: int, world_size: int) -> int:
    """Capture dispatch + combine once; replay with new inputs and bound_m each time."""
    torch.cuda.set_device(rank)
    from pplx.moe import layout as L
    from pplx.moe import reference as ref
    from pplx.moe.testing import combine_tolerance

    dev = torch.device("cuda", rank)
    T, H, E, K = 128, 7168, 256, 8
    at = _make(
        world_size,
        max_num_tokens=T,
        num_experts=E,
        expert_padding=1,
        hidden_dim=H,
        in_dtype=FP8,
        num_experts_per_token=K,
    )
    rows, S, e_local = at.max_recv_tokens, L.hidden_dim_scale(H), E // world_size
    x = torch.zeros(T, H, dtype=FP8, device=dev)
    xs = torch.zeros(T, S, device=dev)
    idx = torch.zeros(T, K, dtype=torch.int64, device=dev)
    w = torch.zeros(T, K, device=dev)
    bm = torch.full((1,), T, dtype=torch.int32, device=dev)
    ent = torch.zeros(e_local, dtype=torch.int32, device=dev)
    ex = torch.zeros(rows, H, dtype=FP8, device=dev)
    exs = torch.zeros(rows, S, device=dev)
    y = torch.zeros(rows, H, dtype=torch.bfloat16, device=dev)
    out = torch.zeros(T, H, dtype=torch.bfloat16, device=dev)

    def step():
        at.dispatch(ent, ex, exs, x, xs, idx, w, bound_m=bm)
        at.combine(out, idx, w, y, bound_m=bm)

    # Warm-up outside the graph compiles the kernels (routing must be in range).
    idx.copy_(torch.arange(T * K, device=dev).reshape(T, K) % E)
    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for it, bms in enumerate(
        [[T] * world_size, [5, 128, 0, 77][:world_size], [1, 0, 64, 128][:world_size]]
    ):
        ins = mt.random_group_inputs(500 + it, world_size, T, H, E, K, FP8, bound_ms=bms)
        gen = torch.Generator().manual_seed(600 + it)
        ys = [mt.random_expert_y(rows, H, torch.bfloat16, gen) for _ in range(world_size)]
        me = ins[rank]
        x.copy_(me.x)
        xs.copy_(me.x_scale)
        idx.copy_(me.indices)
        w.copy_(me.weights)
        bm.fill_(bms[rank])
        y.copy_(ys[rank])
        out0 = mt.random_expert_y(T, H, torch.bfloat16, gen)
        out.copy_(out0)
        mt.poison_(ex)
        mt.poison_(exs)
        g.replay()
        torch.cuda.synchronize()
        at.check()
        idxs = [i.indices for i in ins]
        ws = [i.weights for i in ins]
        want = ref.reference_dispatch(
            [i.x for i in ins], [i.x_scale for i in ins], idxs, ws, E, 1, bms, num_rows=rows
        )[rank]
        mt.assert_dispatch_matches(ent, ex, exs, want, 1, name=f"graph replay {it} dispatch")
        outs0 = [
            out0 if r == rank else torch.zeros(T, H, dtype=torch.bfloat16)
            for r in range(world_size)
        ]
        want_out = ref.reference_combine(ys, idxs, ws, E, 1, bms, outs=outs0)[rank]
        _, maps = ref.reference_layout(idxs, E, 1, bms)
        m = bms[rank]
        slot = torch.zeros(m, K, H)
        for d in range(world_size):
            sel = maps[rank].dst_rank[:m] == d
            slot[sel] = ys[d][maps[rank].dst_row[:m][sel]].float()
        tol = torch.zeros(T, H)
        tol[:m] = combine_tolerance(slot, me.weights[:m])
        err = (out.cpu().float() - want_out.float()).abs()
        assert bool((err <= tol).all()), (
            f"graph replay {it}: combine off by up to {err.max().item()} "
            f"({int((err > tol).sum())} elements outside the bound)"
        )
    at.destroy()
    return 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_gpu_dispatch_combine_vs_reference(world_size: int) -> None:
    if _num_gpus() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, found {_num_gpus()}")
    assert mt.spawn(_cases_worker, world_size, timeout_s=400.0, backend="nccl") == [5] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_gpu_cuda_graph_replay_with_changing_bound_m(world_size: int) -> None:
    if _num_gpus() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, found {_num_gpus()}")
    assert mt.spawn(_graph_worker, world_size, timeout_s=300.0, backend="nccl") == [1] * world_size
