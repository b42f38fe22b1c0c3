"""`Tuning`: the knobs of the Triton all-to-all kernels, in one place.

Every field left at None takes the default measured for the shape and device
(`TritonAllToAll._configure` says which measurement chose it; the numbers are in
experiments/PERFORMANCE.md). `Tuning.from_env()` reads the `PPLX_MOE_*` variables, which is
how the benchmark's `--variant NAME:KEY=VAL` times variants side by side in one process:

| field             | variable                 | meaning                                  |
|-------------------|--------------------------|------------------------------------------|
| fused             | PPLX_MOE_FUSED=0/1       | one launch per phase (send, then receive) |
| sync              | PPLX_MOE_SYNC=v1/v2      | signalling protocol (sync_kernels.py)     |
| max_spin          | PPLX_MOE_MAX_SPIN=N      | polls of a flag before a wait gives up    |
| tiles             | PPLX_MOE_TILES=bt,rb,cb,tb[,cap] | tokens per program: dispatch send, |
|                   |                          | dispatch recv, combine send, combine recv; |
|                   |                          | cap: elements per row tile                |
| rows_split        | PPLX_MOE_ROWS_SPLIT=N    | dispatch rows programs per (chunk, dest), |
|                   |                          | each with its part of the row             |
| acker             | PPLX_MOE_ACKER=0/1       | a program of its own acks the sources     |
|                   |                          | once all receive programs are done        |
| ack_next          | PPLX_MOE_ACK_NEXT=0/1    | those acks go out from the first program  |
|                   |                          | of the rank's next launch                 |
| comb_block_h      | PPLX_MOE_COMB_BH=N       | columns per combine-send tile             |
| comb_block_h_recv | PPLX_MOE_COMB_BHR=N      | columns per combine-receive tile          |
| comb_split_h      | PPLX_MOE_COMB_HS=N       | combine programs per token block along H  |
| comb_recv_split_h | PPLX_MOE_COMB_RHS=N      | combine-receive programs per token block  |
|                   |                          | along H (send side unsplit, or = COMB_HS) |
| num_warps         | PPLX_MOE_NUM_WARPS=N     | warps of a dispatch program               |
| comb_warps        | PPLX_MOE_COMB_WARPS=N    | warps of a combine program                |
| comb_recv_warps   | PPLX_MOE_COMB_RECV_WARPS=N | warps of a separate combine-recv launch |
| prof              | PPLX_MOE_PROF=1          | per-program clock stamps (CUDA; profile()) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

_PREFIX = "PPLX_MOE_"
_ENV = {
    "fused": "FUSED",
    "sync": "SYNC",
    "max_spin": "MAX_SPIN",
    "tiles": "TILES",
    "rows_split": "ROWS_SPLIT",
    "acker": "ACKER",
    "ack_next": "ACK_NEXT",
    "comb_block_h": "COMB_BH",
    "comb_block_h_recv": "COMB_BHR",
    "comb_split_h": "COMB_HS",
    "comb_recv_split_h": "COMB_RHS",
    "num_warps": "NUM_WARPS",
    "comb_warps": "COMB_WARPS",
    "comb_recv_warps": "COMB_RECV_WARPS",
    "prof": "PROF",
}


@dataclass(frozen=True)
class Tuning:
    """Kernel knobs of `TritonAllToAll` (None: the measured default; see the module)."""

    fused: bool | None = None
    sync: str | None = None
    max_spin: int | None = None
    tiles: tuple[int, ...] | None = None
    rows_split: int | None = None
    acker: bool | None = None
    ack_next: bool | None = None
    comb_block_h: int | None = None
    comb_block_h_recv: int | None = None
    comb_split_h: int | None = None
    comb_recv_split_h: int | None = None
    num_warps: int | None = None
    comb_warps: int | None = None
    comb_recv_warps: int | None = None
    prof: bool = False

    def __post_init__(self) -> None:
        if self.sync not in (None, "v1", "v2"):
            raise ValueError(f"sync must be 'v1' or 'v2', got {self.sync!r}")
        if self.ack_next and self.acker is False:
            raise ValueError("ack_next needs the acker program (acker must not be off)")
        if self.tiles is not None and len(self.tiles) not in (4, 5):
            raise ValueError(f"tiles must be (bt, rb, cb, tb[, cap]), got {self.tiles!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("fused", "sync", "prof", "acker", "ack_next") or v is None:
                continue
            vals = v if isinstance(v, tuple) else (v,)
            if any(int(x) < 1 for x in vals):
                raise ValueError(f"{f.name} must be >= 1, got {v!r}")

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> Tuning:
        """The knobs set by `PPLX_MOE_*` variables (unset or empty: None / off)."""
        env = os.environ if env is None else env
        kw: dict[str, object] = {}
        for name, suffix in _ENV.items():
            var = _PREFIX + suffix
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                if name in ("fused", "prof", "acker", "ack_next"):
                    if raw not in ("0", "1"):
                        raise ValueError("expected 0 or 1")
                    kw[name] = raw == "1"
                elif name == "sync":
                    kw[name] = raw
                elif name == "tiles":
                    kw[name] = tuple(int(x) for x in raw.split(","))
                else:
                    kw[name] = int(raw)
            except ValueError as e:
                raise ValueError(f"{var}={raw!r}: {e}") from None
        try:
            return Tuning(**kw)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"PPLX_MOE_* environment: {e}") from None
