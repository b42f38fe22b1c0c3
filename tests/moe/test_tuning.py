"""`pplx.moe.kernels.tuning.Tuning`: the PPLX_MOE_* variables parse into knobs, bad values
raise an error naming the variable, and unset variables leave the measured defaults."""

from __future__ import annotations

import re

import pytest

from pplx.moe.kernels.tuning import Tuning


def test_from_env_parses_every_knob() -> None:
    env = {
        "PPLX_MOE_FUSED": "0",
        "PPLX_MOE_SYNC": "v1",
        "PPLX_MOE_MAX_SPIN": "1000",
        "PPLX_MOE_TILES": "8,4,1,1,2048",
        "PPLX_MOE_ROWS_SPLIT": "2",
        "PPLX_MOE_ACKER": "1",
        "PPLX_MOE_ACK_NEXT": "1",
        "PPLX_MOE_COMB_BH": "2048",
        "PPLX_MOE_COMB_BHR": "4096",
        "PPLX_MOE_COMB_HS": "3",
        "PPLX_MOE_COMB_RHS": "3",
        "PPLX_MOE_NUM_WARPS": "4",
        "PPLX_MOE_COMB_WARPS": "8",
        "PPLX_MOE_COMB_RECV_WARPS": "16",
        "PPLX_MOE_PROF": "1",
        "UNRELATED": "x",
    }
    t = Tuning.from_env(env)
    assert t == Tuning(
        fused=False,
        sync="v1",
        max_spin=1000,
        tiles=(8, 4, 1, 1, 2048),
        rows_split=2,
        acker=True,
        ack_next=True,
        comb_block_h=2048,
        comb_block_h_recv=4096,
        comb_split_h=3,
        comb_recv_split_h=3,
        num_warps=4,
        comb_warps=8,
        comb_recv_warps=16,
        prof=True,
    )


def test_unset_or_empty_means_default() -> None:
    assert Tuning.from_env({}) == Tuning()
    assert Tuning.from_env({"PPLX_MOE_TILES": "", "PPLX_MOE_FUSED": " "}) == Tuning()


@pytest.mark.parametrize(
    "var, value, words",
    [
        ("PPLX_MOE_FUSED", "yes", "PPLX_MOE_FUSED='yes'"),
        ("PPLX_MOE_NUM_WARPS", "four", "PPLX_MOE_NUM_WARPS='four'"),
        ("PPLX_MOE_TILES", "8,4,1", "tiles must be (bt, rb, cb, tb[, cap])"),
        ("PPLX_MOE_SYNC", "v3", "sync must be 'v1' or 'v2'"),
        ("PPLX_MOE_COMB_BH", "0", "comb_block_h must be >= 1"),
    ],
)
def test_bad_values_name_the_variable_or_knob(var: str, value: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        Tuning.from_env({var: value})


def test_ack_next_without_the_acker_is_refused() -> None:
    env = {"PPLX_MOE_ACK_NEXT": "1", "PPLX_MOE_ACKER": "0"}
    with pytest.raises(ValueError, match="ack_next needs the acker program"):
        Tuning.from_env(env)
    assert Tuning.from_env({"PPLX_MOE_ACK_NEXT": "1"}).ack_next is True
