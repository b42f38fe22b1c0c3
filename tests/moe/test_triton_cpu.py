"""The Triton all-to-all on CPU: kernels under Triton's interpreter, ranks as processes,
buffers in /dev/shm. Dispatch must match `pplx.moe.reference` bit for bit, combine within
the bound of `pplx.moe.testing.combine_tolerance`.

The interpreter is slow (one Python step per op), so shapes are tiny and one spawn runs many
cases; each TritonAllToAll object serves several cases and iterations, which also checks
buffer reuse (epochs, acks) across calls.
"""

from __future__ import annotations

import os

import pytest
import torch

from pplx.moe import testing as mt

FP8 = torch.float8_e4m3fn


def _cases(world_size: int):
    from pplx.moe.testing import Case

    if world_size == 2:
        return [
            # (constructor kwargs, cases run on that object, in order)
            (
                # block_tokens=2: several programs per kernel, so the receivers' prefix
                # over (source, chunk) counts and the cross-program counters are exercised.
                dict(
                    max_num_tokens=6,
                    num_experts=8,
                    expert_padding=1,
                    hidden_dim=64,
                    in_dtype=torch.bfloat16,
                    num_experts_per_token=3,
                    block_tokens=2,
                    fused=False,  # a send launch and a receive launch per phase
                ),
                [
                    Case("bf16 basic, 2 iterations reuse the buffers", 6, 64, 8, 3, iters=2),
                    Case("zero tokens on rank 0, ragged T", [0, 5], 64, 8, 3),
                    Case("one token per rank", 1, 64, 8, 3),
                    Case("bound_m below T (3 and 0 live rows)", 6, 64, 8, 3, bound_ms=[3, 0]),
                    Case(
                        "do_send/do_recv split, accumulate",
                        6,
                        64,
                        8,
                        3,
                        split=True,
                        accumulate=True,
                        iters=1,
                    ),
                    Case(
                        "duplicate experts in one token's top-k",
                        6,
                        64,
                        8,
                        3,
                        distinct=False,
                        index_dtype=torch.int32,
                    ),
                ],
            ),
            (
                dict(
                    max_num_tokens=5,
                    num_experts=8,
                    expert_padding=16,
                    hidden_dim=256,
                    in_dtype=FP8,
                    num_experts_per_token=3,
                    block_tokens=2,  # 3 chunks of 2 tokens
                    fused=True,  # one launch per phase: send programs, then receive ones
                    # combine split in 3 parts along H: 128 + 128 + an empty one; rows
                    # sent by 3 programs per (chunk, destination): 12 + 12 + 8 words, the
                    # scales with the last; sources acked by the last receive program
                    # to finish (no acker program)
                    env={
                        "PPLX_MOE_COMB_HS": "3",
                        "PPLX_MOE_ROWS_SPLIT": "3",
                        "PPLX_MOE_ACKER": "0",
                    },
                ),
                [
                    Case("fp8 + scales, padding 16", 5, 256, 8, 3, FP8, 16, iters=2),
                    Case("every token to one expert", 5, 256, 8, 3, FP8, 16, all_to_one=True),
                    Case("fp8 with bound_m", 5, 256, 8, 3, FP8, 16, bound_ms=[2, 5]),
                ],
            ),
            (
                dict(
                    max_num_tokens=4,
                    num_experts=4,
                    expert_padding=1,
                    hidden_dim=32,
                    in_dtype=torch.bfloat16,
                    num_experts_per_token=4,
                    sync="v1",  # the previous signalling protocol stays covered
                    # its counters with 2 rows programs, its acks from the last program
                    env={"PPLX_MOE_ROWS_SPLIT": "2", "PPLX_MOE_ACKER": "0"},
                ),
                [Case("K == E (every token to every expert), sync v1", 4, 32, 4, 4)],
            ),
        ]
    return [
        (
            dict(
                max_num_tokens=5,
                num_experts=6,
                expert_padding=1,
                hidden_dim=48,
                in_dtype=torch.bfloat16,
                num_experts_per_token=2,
                fused=True,
                # 2 rows programs of 6 words each; acks sent by the next launch
                env={"PPLX_MOE_ROWS_SPLIT": "2", "PPLX_MOE_ACK_NEXT": "1"},
            ),
            [
                Case("3 ranks (not a power of two)", 5, 48, 6, 2, iters=2),
                Case("3 ranks, ragged and zero tokens", [5, 0, 2], 48, 6, 2),
                Case("3 ranks, bound_m", 5, 48, 6, 2, bound_ms=[1, 5, 0]),
            ],
        ),
        (
            dict(
                max_num_tokens=4,
                num_experts=6,
                expert_padding=16,
                hidden_dim=256,
                in_dtype=FP8,
                num_experts_per_token=4,
                fused=False,
                # rows moved in 2 tiles after the waits (not one tile loaded early),
                # received in 2 tiles too (the receive path that acks after its stores),
                # receive programs of 2 slots inside send chunks of 4 tokens; combine
                # receive split in 2 parts along H (128 + 128, 4 tiles each), its send
                # side not split; receive launches of their own, each with its acker
                # program (the default), acks sent by the next launch (of 4 per step)
                env={
                    "PPLX_MOE_TILES": "4,2,2,2,32",
                    "PPLX_MOE_COMB_RHS": "2",
                    "PPLX_MOE_ACK_NEXT": "1",
                },
                expect_one_tile=False,
            ),
            [Case("3 ranks fp8, padding 16, split", 4, 256, 6, 4, FP8, 16, split=True)],
        ),
    ]


def _worker(rank: int, world_size: int) -> int:
    # The interpreter must be chosen before any kernel module is imported in this process.
    os.environ["TRITON_INTERPRET"] = "1"
    from pplx.moe import layout as L
    from pplx.moe.kernels import TritonAllToAll
    from pplx.moe.testing import run_case

    done = 0
    for n, (kw, cases) in enumerate(_cases(world_size)):
        kw = dict(kw)
        env = kw.pop("env", {})  # PPLX_MOE_* tuning hooks read at construction
        one_tile = kw.pop("expect_one_tile", True)
        in_dtype = kw["in_dtype"]
        os.environ.update(env)
        try:
            at = TritonAllToAll(
                hidden_dim_scale=L.hidden_dim_scale(kw["hidden_dim"]) if in_dtype == FP8 else 0,
                out_dtype=torch.bfloat16,
                scale_dtype=torch.float32 if in_dtype == FP8 else None,
                device="cpu",
                timeout_s=60.0,
                **kw,
            )
        finally:
            for k in env:
                os.environ.pop(k, None)
        # Both send paths are covered: rows in one tile loaded before the waits, or in tiles.
        assert at.one_tile == one_tile, (at.one_tile, at.block_w_send, at.words)
        # Rows programs per (chunk, destination) as asked (each part of the row moved once).
        assert at.rows_split == int(env.get("PPLX_MOE_ROWS_SPLIT", 1)), at.rows_split
        assert at.acker == int(env.get("PPLX_MOE_ACKER", 1)), at.acker
        assert at.ack_next == int(env.get("PPLX_MOE_ACK_NEXT", 0)), at.ack_next
        for i, case in enumerate(cases):
            run_case(at, case, 100 * n + i, rank, world_size, torch.device("cpu"))
            done += 1
        at.destroy()
    lost = ""
    if world_size == 2:
        _check_all_to_all(rank, world_size)
        lost = _check_lost_peer(rank)
    return done, lost


def _check_all_to_all(rank: int, world_size: int) -> None:
    """Through the public `AllToAll(backend="triton")`, which validates then calls us."""
    from pplx.moe import AllToAll
    from pplx.moe.testing import Case, run_case

    a2a = AllToAll(
        4, 8, 1, 64, None, torch.bfloat16, torch.bfloat16, None, 2, device="cpu", backend="triton"
    )
    run_case(
        a2a,
        Case("AllToAll(backend='triton') on CPU", 4, 64, 8, 2),
        7,
        rank,
        world_size,
        torch.device("cpu"),
    )
    a2a.destroy()


def _check_lost_peer(rank: int) -> str:
    """Rank 1 skips a dispatch: rank 0's receive must raise TimeoutError, not hang."""
    from pplx.moe.kernels import TritonAllToAll

    at = TritonAllToAll(
        max_num_tokens=2,
        num_experts=4,
        expert_padding=1,
        hidden_dim=16,
        hidden_dim_scale=0,
        in_dtype=torch.bfloat16,
        out_dtype=torch.bfloat16,
        scale_dtype=None,
        num_experts_per_token=1,
        device="cpu",
        timeout_s=1.0,
    )
    if rank == 1:
        return "skipped"
    x = torch.randn(2, 16).to(torch.bfloat16)
    ent = torch.empty(2, dtype=torch.int32)
    ex = torch.empty(4, 16, dtype=torch.bfloat16)
    try:
        at.dispatch(ent, ex, None, x, None, torch.tensor([[0], [3]]), torch.ones(2, 1))
    except TimeoutError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("world_size", [2, 3])
def test_triton_dispatch_combine_interpreter(world_size: int) -> None:
    done = mt.spawn(_worker, world_size, timeout_s=240.0)
    want = sum(len(c) for _, c in _cases(world_size))
    assert [d[0] for d in done] == [want] * world_size
    if world_size == 2:
        # The last step of the 2-rank worker: a lost peer ends in TimeoutError.
        assert "did not signal" in done[0][1], done
