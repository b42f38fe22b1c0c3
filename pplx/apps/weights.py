"""RL weight transfer: a static schedule of one-sided writes from training to inference GPUs.

The setting of the paper (Kimi-K2, 1T parameters, 256 training GPUs in bf16 -> 128
inference GPUs in fp8, 1.3 s): every parameter tensor has one owner among the training
ranks (after the training job has gathered it; that gather is not part of the schedule),
which quantizes it to fp8 e4m3 with one float32 scale per 128 columns of a row, and writes
each destination's rows straight into that inference GPU's weight buffer, once per
inference replica. The schedule is computed once (static) and replayed at every update:

- `plan(params, num_src, num_replicas, ranks_per_replica)` -> `Schedule`: owners balanced
  by bytes (largest first onto the least loaded rank), destination layout (experts by
  expert parallelism inside a replica, dense tensors split by rows over the replica's
  ranks), and one write for the fp8 rows plus one for their scales per (tensor, piece).
- `modelled_time_s(schedule, nic)`: per-rank sent/received bytes over the NIC bandwidth,
  posting cost per write, one latency; the slowest rank sets the time.
- `execute_memcpy` / `expected_destination`: run a schedule on host buffers with plain
  copies, and the expected destination contents computed directly from the tensors
  (used by the measured small-scale run and the tests).

Shapes: a parameter is `[rows, cols]`; its fp8 form is `[rows, cols]` bytes plus
`[rows, ceil(cols / 128)]` float32 scales.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128  # columns per scale


@dataclass(frozen=True)
class ParamSpec:
    """One weight tensor `[rows, cols]`; `expert` is its global expert index (None = dense)."""

    name: str
    rows: int
    cols: int
    expert: int | None = None

    @property
    def fp8_bytes(self) -> int:
        return self.rows * self.cols + self.rows * math.ceil(self.cols / BLOCK) * 4


def kimi_k2_params(
    num_layers: int = 61,
    num_dense_layers: int = 1,
    num_experts: int = 384,
    hidden: int = 7168,
    moe_inter: int = 2048,
    dense_inter: int = 18432,
    vocab: int = 163840,
    attn_params_per_layer: int = 101_000_000,
) -> list[ParamSpec]:
    """Kimi-K2-shaped tensors (public config: 61 layers, the first dense, 384 routed experts
    of 3 x [2048, 7168] plus one shared expert per MoE layer, hidden 7168, vocab 163840).
    Attention (MLA) is lumped into one [rows, hidden] tensor of ~101M parameters per layer.
    Total ~1.03e12 parameters."""
    out: list[ParamSpec] = [ParamSpec("embed", vocab, hidden), ParamSpec("lm_head", vocab, hidden)]
    attn_rows = attn_params_per_layer // hidden
    for layer in range(num_layers):
        out.append(ParamSpec(f"l{layer}.attn", attn_rows, hidden))
        if layer < num_dense_layers:
            out += [ParamSpec(f"l{layer}.mlp.w{i}", dense_inter, hidden) for i in (1, 3)]
            out.append(ParamSpec(f"l{layer}.mlp.w2", hidden, dense_inter))
            continue
        out += [ParamSpec(f"l{layer}.shared.w{i}", moe_inter, hidden) for i in (1, 3)]
        out.append(ParamSpec(f"l{layer}.shared.w2", hidden, moe_inter))
        for e in range(num_experts):
            out += [ParamSpec(f"l{layer}.e{e}.w{i}", moe_inter, hidden, e) for i in (1, 3)]
            out.append(ParamSpec(f"l{layer}.e{e}.w2", hidden, moe_inter, e))
    return out


def tiny_params(num_layers: int = 2, num_experts: int = 8, hidden: int = 256, inter: int = 96):
    """A small model of the same structure for measured runs and tests."""
    return kimi_k2_params(
        num_layers=num_layers,
        num_dense_layers=1,
        num_experts=num_experts,
        hidden=hidden,
        moe_inter=inter,
        dense_inter=2 * inter,
        vocab=300,
        attn_params_per_layer=hidden * 40,
    )


@dataclass
class Schedule:
    """A static write schedule. Each write copies `nbytes` from `src_offset` of source rank
    `src`'s fp8 staging buffer to `dst_offset` of destination rank `dst`'s weight buffer
    (destination ranks numbered replica * ranks_per_replica + rank).

    Arrays (one entry per write, int64): src, dst, src_offset, dst_offset, nbytes, param
    (index into params), row0, row1 (rows of the param), is_scale (0 rows, 1 scales).
    owner: `[len(params)]` source rank of each param; src_offset_of: `[len(params), 2]`
    offsets of the param's fp8 rows and scales in its owner's staging buffer;
    src_bytes / dst_bytes: buffer size per source / destination rank.
    """

    params: list[ParamSpec]
    num_src: int
    num_replicas: int
    ranks_per_replica: int
    src: np.ndarray
    dst: np.ndarray
    src_offset: np.ndarray
    dst_offset: np.ndarray
    nbytes: np.ndarray
    param: np.ndarray
    row0: np.ndarray
    row1: np.ndarray
    is_scale: np.ndarray
    owner: np.ndarray
    src_offset_of: np.ndarray
    src_bytes: np.ndarray
    dst_bytes: np.ndarray

    @property
    def num_dst(self) -> int:
        return self.num_replicas * self.ranks_per_replica

    @property
    def num_writes(self) -> int:
        return int(self.src.size)


def _dest_pieces(
    p: ParamSpec, num_experts: int, ranks_per_replica: int
) -> list[tuple[int, int, int]]:
    """(rank in replica, row0, row1) pieces of one param inside one replica."""
    if p.expert is not None:
        e_local = math.ceil(num_experts / ranks_per_replica)
        return [(p.expert // e_local, 0, p.rows)]
    step = math.ceil(p.rows / ranks_per_replica)
    return [
        (r, r * step, min(p.rows, (r + 1) * step))
        for r in range(ranks_per_replica)
        if r * step < p.rows
    ]


def plan(
    params: Sequence[ParamSpec], num_src: int, num_replicas: int, ranks_per_replica: int
) -> Schedule:
    """The static schedule (see module docstring)."""
    if num_src < 1 or num_replicas < 1 or ranks_per_replica < 1:
        raise ValueError(
            "plan: num_src, num_replicas and ranks_per_replica must be >= 1, got "
            f"{num_src}, {num_replicas}, {ranks_per_replica}"
        )
    params = list(params)
    experts = [p.expert for p in params if p.expert is not None]
    num_experts = max(experts) + 1 if experts else 0
    if experts and num_experts < ranks_per_replica:
        raise ValueError(
            f"plan: ranks_per_replica ({ranks_per_replica}) exceeds the number of experts "
            f"({num_experts})"
        )
    sizes = np.array([p.fp8_bytes for p in params], np.int64)
    # Owners: largest first onto the least loaded source rank (LPT).
    owner = np.empty(len(params), np.int64)
    load = np.zeros(num_src, np.int64)
    src_offset_of = np.empty((len(params), 2), np.int64)
    for i in np.argsort(-sizes, kind="stable"):
        r = int(np.argmin(load))
        owner[i] = r
        p = params[i]
        src_offset_of[i] = (load[r], load[r] + p.rows * p.cols)
        load[r] += sizes[i]
    cols: dict[str, list[int]] = {
        k: [] for k in ("src", "dst", "so", "do", "n", "param", "r0", "r1", "sc")
    }
    dst_fill = np.zeros(num_replicas * ranks_per_replica, np.int64)
    for i, p in enumerate(params):
        s = math.ceil(p.cols / BLOCK) * 4  # scale bytes per row
        pieces = _dest_pieces(p, num_experts, ranks_per_replica)
        for rep in range(num_replicas):
            for rank, r0, r1 in pieces:
                d = rep * ranks_per_replica + rank
                data, scales = (r1 - r0) * p.cols, (r1 - r0) * s
                for is_scale, so, n in (
                    (0, src_offset_of[i, 0] + r0 * p.cols, data),
                    (1, src_offset_of[i, 1] + r0 * s, scales),
                ):
                    cols["src"].append(int(owner[i]))
                    cols["dst"].append(d)
                    cols["so"].append(int(so))
                    cols["do"].append(int(dst_fill[d]))
                    cols["n"].append(n)
                    cols["param"].append(i)
                    cols["r0"].append(r0)
                    cols["r1"].append(r1)
                    cols["sc"].append(is_scale)
                    dst_fill[d] += n
    a = {k: np.array(v, np.int64) for k, v in cols.items()}
    return Schedule(
        params, num_src, num_replicas, ranks_per_replica,
        a["src"], a["dst"], a["so"], a["do"], a["n"], a["param"], a["r0"], a["r1"], a["sc"],
        owner, src_offset_of, load, dst_fill,
    )  # fmt: skip


@dataclass(frozen=True)
class TransferEstimate:
    """Modelled time of one weight update: `time_s` and its parts (seconds)."""

    time_s: float
    send_s: float
    recv_s: float
    post_s: float
    quantize_s: float
    max_send_GB: float
    max_recv_GB: float
    bound: str


def modelled_time_s(
    schedule: Schedule,
    nic_GBps: float,
    post_us: float,
    latency_us: float,
    hbm_GBps: float = 3350.0,
) -> TransferEstimate:
    """Slowest rank's max(sent bytes, received bytes, posting) + quantization + latency.

    nic_GBps: achieved bytes/s (1e9) of all NICs of one GPU (50 for 400 Gb/s).
    post_us: CPU cost per posted write. hbm_GBps: owner's bf16 read + fp8 write (vendor).
    """
    send = np.bincount(schedule.src, weights=schedule.nbytes, minlength=schedule.num_src)
    recv = np.bincount(schedule.dst, weights=schedule.nbytes, minlength=schedule.num_dst)
    posts = np.bincount(schedule.src, minlength=schedule.num_src)
    send_s, recv_s = send.max() / (nic_GBps * 1e9), recv.max() / (nic_GBps * 1e9)
    post_s = posts.max() * post_us * 1e-6
    bf16 = np.bincount(
        schedule.owner,
        weights=[2 * p.rows * p.cols for p in schedule.params],
        minlength=schedule.num_src,
    )
    quant_s = (bf16 + schedule.src_bytes).max() / (hbm_GBps * 1e9)
    parts = {"send": send_s, "recv": recv_s, "post": post_s}
    bound = max(parts, key=parts.get)
    return TransferEstimate(
        time_s=float(max(parts.values()) + quant_s + latency_us * 1e-6),
        send_s=float(send_s),
        recv_s=float(recv_s),
        post_s=float(post_s),
        quantize_s=float(quant_s),
        max_send_GB=float(send.max() / 1e9),
        max_recv_GB=float(recv.max() / 1e9),
        bound=bound,
    )


def quantize_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 `[rows, cols]` -> (`[rows, cols]` float8_e4m3fn, `[rows, ceil(cols/128)]` float32
    scales): scale = max |w| of a 128-column block / 448 (1 for an all-zero block)."""
    rows, cols = w.shape
    nb = math.ceil(cols / BLOCK)
    pad = torch.zeros(rows, nb * BLOCK, dtype=torch.float32)
    pad[:, :cols] = w.float()
    blocks = pad.view(rows, nb, BLOCK)
    amax = blocks.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, :, None]).view(rows, nb * BLOCK)[:, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def stage_sources(schedule: Schedule, weights: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Each source rank's staging buffer (uint8): its owned params, quantized, at
    `src_offset_of`."""
    bufs = [np.zeros(int(n), np.uint8) for n in schedule.src_bytes]
    for i, w in enumerate(weights):
        q, s = quantize_fp8_blocks(w)
        b = bufs[schedule.owner[i]]
        qb = q.view(torch.uint8).numpy().ravel()
        sb = s.view(torch.uint8).numpy().ravel()
        b[schedule.src_offset_of[i, 0] : schedule.src_offset_of[i, 0] + qb.size] = qb
        b[schedule.src_offset_of[i, 1] : schedule.src_offset_of[i, 1] + sb.size] = sb
    return bufs


def execute_memcpy(schedule: Schedule, src_bufs: Sequence[np.ndarray]) -> tuple[list, float]:
    """Replay every write with a plain copy into freshly poisoned (0x7F) destination
    buffers. Returns (destination buffers, seconds spent in the copies)."""
    dst = [np.full(int(n), 0x7F, np.uint8) for n in schedule.dst_bytes]
    t0 = time.perf_counter()
    for s, d, so, do, n in zip(
        schedule.src.tolist(),
        schedule.dst.tolist(),
        schedule.src_offset.tolist(),
        schedule.dst_offset.tolist(),
        schedule.nbytes.tolist(),
    ):
        dst[d][do : do + n] = src_bufs[s][so : so + n]
    return dst, time.perf_counter() - t0


def expected_destination(schedule: Schedule, weights: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Destination buffers computed directly from the tensors and the destination layout
    (no source buffers, no offsets on the source side)."""
    out = [np.full(int(n), 0x7F, np.uint8) for n in schedule.dst_bytes]
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(schedule.num_writes):
        i = int(schedule.param[k])
        if i not in cache:
            q, s = quantize_fp8_blocks(weights[i])
            cache[i] = (q.view(torch.uint8).numpy(), s.view(torch.uint8).numpy())
        rows = slice(int(schedule.row0[k]), int(schedule.row1[k]))
        part = cache[i][int(schedule.is_scale[k])][rows].ravel()
        do = int(schedule.dst_offset[k])
        out[int(schedule.dst[k])][do : do + part.size] = part
    return out


def execute_transfer_engine(
    schedule: Schedule,
    src_bufs: Sequence[np.ndarray],
    provider: str = "shm",
    num_domains: int = 1,
    timeout_s: float = 60.0,
) -> tuple[list[np.ndarray], float]:
    """Replay the schedule as one-sided writes through `pplx.fabric.TransferEngine`: one
    engine holds every source rank's staging buffer, another every destination buffer
    (poisoned with 0x7F first); each write carries the destination rank as its immediate
    and the destination waits for the expected arrival count per rank. Returns
    (destination buffers, seconds from the first post to the last arrival).

    Raises FabricTimeout if the arrivals do not complete within `timeout_s`.
    """
    from pplx.fabric import TransferEngine, TryAgain

    dst_t = [torch.full((max(1, int(n)),), 0x7F, dtype=torch.uint8) for n in schedule.dst_bytes]
    with (
        TransferEngine(provider, num_domains) as src_eng,
        TransferEngine(provider, num_domains) as dst_eng,
    ):
        src_mrs = [src_eng.register_tensor(torch.from_numpy(b))[0] for b in src_bufs]
        dst_descs = [dst_eng.register_tensor(t)[1] for t in dst_t]
        expected = np.zeros(schedule.num_dst, np.int64)
        reqs = []
        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        for s, d, so, do, n in zip(
            schedule.src.tolist(),
            schedule.dst.tolist(),
            schedule.src_offset.tolist(),
            schedule.dst_offset.tolist(),
            schedule.nbytes.tolist(),
        ):
            while True:
                try:
                    reqs.append(
                        src_eng.submit_write(
                            src_mrs[s], dst_descs[d], n, src_offset=so, dst_offset=do, imm=d
                        )
                    )
                    break
                except TryAgain:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0)
            expected[d] += src_eng.num_shards(n)
        for r in reqs:
            r.wait(timeout=max(0.0, deadline - time.monotonic()))
        for d, n in enumerate(expected.tolist()):
            dst_eng.imm_counter(d).wait(n, timeout=max(0.0, deadline - time.monotonic()))
        elapsed = time.perf_counter() - t0
    return [t.numpy()[: int(n)] for t, n in zip(dst_t, schedule.dst_bytes)], elapsed
