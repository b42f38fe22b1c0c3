"""Analytical latency model of MoE dispatch/combine and of point-to-point writes.

R ranks, G GPUs per node, P NICs per GPU; row = one token's hidden vector on the wire.

The model follows the inter-node protocol of pplx.moe / pplx-garden, per rank:

dispatch
  1. the kernel packs the rows bound for other nodes and hands a work item to the host
     proxy (`proxy_one_way_us`); rows for GPUs of the same node go straight over NVLink;
  2. the proxy scatters the per-expert counts to every remote rank (one small write with
     an immediate each, R - G work requests);
  3. it writes up to `max_private_tokens` rows per remote rank into that rank's private
     region at once (one write per peer, sharded over the P NICs when large);
  4. rows beyond that (overflow) wait until the counts of every peer have arrived (they
     give the offsets), then go out as one more write per peer;
  5. the receiving proxy reaps one completion per immediate and, when the count per
     source is complete, raises a flag the GPU polls (`proxy_one_way_us`).
combine
  the same without counts and overflow: offsets are known from dispatch; each rank
  writes its expert outputs back to the token's source rank.

Rows on the wire follow `Cluster.dispatch_dedup` / `combine_dedup`: one per (token,
destination rank) ("rank", the fitted default), per (token, slot) ("none"), or per (token,
destination node) ("node", a layout prototype: an extra NVLink hop fans rows out inside
the node, `_node_dedup`).

Time of one call = kernel_fixed + pack/unpack + max(NVLink path, RDMA path), where the RDMA
path is the slowest rank's: its proxy thread is busy `post_us` per work request posted
and per completion reaped (serially), its NICs carry max(sent, received) bytes at the
achieved bandwidth, and each write takes `latency_us` from post to remote completion.
All terms are in microseconds; bytes per microsecond = GB/s * 1e3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pplx.sim.cluster import Cluster, NicSpec
from pplx.sim.routing import Routing


@dataclass(frozen=True)
class Workload:
    """Shapes of one MoE layer call.

    num_tokens: T tokens per rank; hidden_dim: H; num_experts: E; num_experts_per_token: K.
    dispatch_elem_bytes: 1 for fp8 e4m3 dispatch, 2 for bf16.
    combine_elem_bytes: 2 (bf16 combine).
    Dispatch rows carry ceil(H / 128) float32 scales when fp8.
    """

    num_tokens: int = 128
    hidden_dim: int = 7168
    num_experts: int = 256
    num_experts_per_token: int = 8
    dispatch_elem_bytes: int = 1
    combine_elem_bytes: int = 2

    @property
    def dispatch_row_bytes(self) -> int:
        scales = math.ceil(self.hidden_dim / 128) * 4 if self.dispatch_elem_bytes == 1 else 0
        return self.hidden_dim * self.dispatch_elem_bytes + scales

    @property
    def combine_row_bytes(self) -> int:
        return self.hidden_dim * self.combine_elem_bytes


DECODE = Workload(num_tokens=128)
PREFILL = Workload(num_tokens=4096)


@dataclass(frozen=True)
class Breakdown:
    """Modelled time of one dispatch or combine call, in microseconds, and what it moves.

    total_us: the call. kernel_us: fixed kernel cost. pack_us: HBM copies into and out of
    the fabric buffers. nvlink_us: the NVLink path. rdma_us: the RDMA path from the proxy
    hand-off to the GPU seeing its flag (0 on one node). proxy_busy_us: the slowest proxy
    thread's posting + reaping time. wire_us: bytes over the achieved NIC bandwidth on the
    busiest rank. counts_wait_us: time the overflow waited for counts (0 without
    overflow). overflow_rows: rows beyond the private region, summed over ranks.
    fabric_bytes / nvlink_bytes: bytes sent by the busiest rank. work_requests: work
    requests posted by the busiest rank's proxy.
    """

    total_us: float
    kernel_us: float
    pack_us: float
    nvlink_us: float
    rdma_us: float
    proxy_busy_us: float
    wire_us: float
    counts_wait_us: float
    overflow_rows: int
    fabric_bytes: int
    nvlink_bytes: int
    work_requests: int


def _shards(nbytes: np.ndarray, nic: NicSpec) -> np.ndarray:
    """Work requests per write: P when at least shard_min_bytes, 1 when smaller, 0 when empty."""
    many = np.where(nbytes >= nic.shard_min_bytes, nic.nics_per_gpu, 1)
    return np.where(nbytes > 0, many, 0)


def _node_dedup(
    cluster: Cluster, routing: Routing, g: int, row_bytes: int, phase: str
) -> tuple[np.ndarray, np.ndarray]:
    """Fabric rows `[R, R]` and the extra NVLink hop `[R]` (us) of node-level dedup: a
    token crosses to each remote node once, to the rank of its own local index there
    (the "leader"), which forwards it to the node's other ranks that need it (combine:
    the node's ranks send their partial sums to the leader, which sends one row back)."""
    if routing.node_tokens is None or routing.ranks_per_node != g:
        raise ValueError(
            f"phase_latency: node dedup needs routing.node_tokens for {g} ranks per node "
            f"(build the routing with ranks_per_node={g})"
        )
    num_ranks = routing.num_ranks
    rows = np.zeros((num_ranks, num_ranks), np.int64)  # source -> leader
    fan = np.zeros(num_ranks, np.int64)  # rows a leader forwards over NVLink
    for r in range(num_ranks):
        for n in range(num_ranks // g):
            if n == r // g:
                continue
            leader = n * g + r % g
            rows[r, leader] = routing.node_tokens[r, n]
            fan[leader] += routing.rank_tokens[r, n * g : (n + 1) * g].sum()
            fan[leader] -= routing.rank_tokens[r, leader]
    if phase == "combine":
        rows = rows.T
    hop_us = fan * row_bytes / (cluster.nvlink_GBps * 1e3) + cluster.nvlink_hop_us
    return rows, hop_us


def phase_latency(cluster: Cluster, routing: Routing, workload: Workload, phase: str) -> Breakdown:
    """Modelled time of one `phase` ("dispatch" or "combine") call on `cluster`."""
    if phase not in ("dispatch", "combine"):
        raise ValueError(f"phase_latency: phase expected 'dispatch' or 'combine', got {phase!r}")
    num_ranks = routing.num_ranks
    g = min(cluster.gpus_per_node, num_ranks)
    if num_ranks % g:
        raise ValueError(
            f"phase_latency: ranks ({num_ranks}) must be a multiple of gpus_per_node ({g})"
        )
    nic = cluster.nic
    dedup = cluster.dispatch_dedup if phase == "dispatch" else cluster.combine_dedup
    rows = routing.rows("rank" if dedup == "node" else dedup)  # [R, R] token rank -> expert rank
    send_rows = rows if phase == "dispatch" else rows.T  # [R, R] sender -> receiver
    row_bytes = workload.dispatch_row_bytes if phase == "dispatch" else workload.combine_row_bytes
    node = np.arange(num_ranks) // g
    same_node = node[:, None] == node[None, :]
    eye = np.eye(num_ranks, dtype=bool)
    nvl = np.where(same_node & ~eye, send_rows, 0) * row_bytes  # [R, R] bytes
    fab_rows = np.where(~same_node, send_rows, 0)  # [R, R] rows over the fabric
    hop_us = np.zeros(num_ranks)
    if dedup == "node" and num_ranks > g:
        fab_rows, hop_us = _node_dedup(cluster, routing, g, row_bytes, phase)
    fab = fab_rows * row_bytes  # [R, R] bytes

    nvl_bytes = np.maximum(nvl.sum(1), nvl.sum(0))  # [R] send and receive run in parallel
    nvlink_us = nvl_bytes / (cluster.nvlink_GBps * 1e3)  # [R]
    # Copy into the registered send buffer and out of the receive buffer: read + write.
    pack_us = 2 * (fab.sum(1) + fab.sum(0)) / (cluster.hbm_GBps * 1e3)  # [R]

    rdma_us = np.zeros(num_ranks)
    busy_us = np.zeros(num_ranks)
    wire_us = np.zeros(num_ranks)
    wait_us = np.zeros(num_ranks)
    wrs = np.zeros(num_ranks, np.int64)
    overflow_rows = 0
    if num_ranks > g:
        c, lat, bw = nic.post_us, nic.latency_us, nic.bytes_per_us
        t0 = cluster.proxy_one_way_us
        remote = ~same_node
        if phase == "dispatch":
            cnt_out = remote.sum(1)  # [R] one counts write per remote rank
            priv_rows = np.minimum(fab_rows, cluster.max_private_tokens)
            ovf_rows = fab_rows - priv_rows
            overflow_rows = int(ovf_rows.sum())
            priv = priv_rows * row_bytes
            ovf = ovf_rows * row_bytes
        else:
            cnt_out = np.zeros(num_ranks, np.int64)
            priv, ovf = fab, np.zeros_like(fab)
        priv_wr, ovf_wr = _shards(priv, nic), _shards(ovf, nic)  # [R, R]
        out_wr = cnt_out + priv_wr.sum(1) + ovf_wr.sum(1)
        in_wr = cnt_out + priv_wr.sum(0) + ovf_wr.sum(0)  # counts are symmetric
        t_cnt_posted = t0 + cnt_out * c
        t_counts_all = t_cnt_posted.max() + lat if phase == "dispatch" else 0.0
        t_priv_posted = t_cnt_posted + priv_wr.sum(1) * c
        priv_wire = np.maximum(priv.sum(1), priv.sum(0)) / bw
        t_priv_wire = np.maximum(t_priv_posted, t_cnt_posted + priv_wire)
        done = np.maximum(t_priv_wire + lat, t_counts_all)
        has_ovf = ovf_wr.sum(1) + ovf_wr.sum(0) > 0
        if has_ovf.any():
            ovf_start = np.maximum(t_counts_all, t_priv_posted)
            t_ovf_posted = ovf_start + ovf_wr.sum(1) * c
            ovf_wire = np.maximum(ovf.sum(1), ovf.sum(0)) / bw
            t_ovf_wire = np.maximum(t_ovf_posted, np.maximum(ovf_start, t_priv_wire) + ovf_wire)
            done = np.where(has_ovf, np.maximum(done, t_ovf_wire + lat), done)
            wait_us = np.where(has_ovf, np.maximum(0.0, t_counts_all - t_priv_posted), 0.0)
        busy_us = (out_wr + in_wr) * c
        done = np.maximum(done, t0 + busy_us) + c  # the last completion is reaped
        rdma_us = done + cluster.proxy_one_way_us  # the flag reaches the GPU
        wire_us = np.maximum(fab.sum(1), fab.sum(0)) / bw
        wrs = out_wr

    per_rank = cluster.kernel_fixed_us + pack_us + np.maximum(nvlink_us, rdma_us + hop_us)
    r = int(np.argmax(per_rank))
    return Breakdown(
        total_us=float(per_rank[r]),
        kernel_us=cluster.kernel_fixed_us,
        pack_us=float(pack_us[r]),
        nvlink_us=float(nvlink_us[r]),
        rdma_us=float(rdma_us[r]),
        proxy_busy_us=float(busy_us[r]),
        wire_us=float(wire_us[r]),
        counts_wait_us=float(wait_us[r]),
        overflow_rows=overflow_rows,
        fabric_bytes=int(fab.sum(1)[r]),
        nvlink_bytes=int(nvl.sum(1)[r]),
        work_requests=int(wrs[r]),
    )


def dispatch_latency(cluster: Cluster, routing: Routing, workload: Workload = DECODE) -> Breakdown:
    """Modelled dispatch call (see module docstring)."""
    return phase_latency(cluster, routing, workload, "dispatch")


def combine_latency(cluster: Cluster, routing: Routing, workload: Workload = DECODE) -> Breakdown:
    """Modelled combine call (see module docstring)."""
    return phase_latency(cluster, routing, workload, "combine")


def p2p_write_us(nic: NicSpec, nbytes: int, num_pages: int = 1) -> float:
    """Time of one write of `nbytes` (or a paged write of `num_pages` equal pages) from
    posting to the remote completion: work requests posted serially, bytes at the achieved
    bandwidth of all NICs, one latency, one reaped completion."""
    if nbytes < 0 or num_pages < 1:
        raise ValueError(
            f"p2p_write_us: expected nbytes >= 0, num_pages >= 1; got {nbytes}, {num_pages}"
        )
    page = nbytes / num_pages
    wr = num_pages * int(_shards(np.array(page), nic))
    return max(wr * nic.post_us, nbytes / nic.bytes_per_us) + nic.latency_us + nic.post_us


def p2p_stream_GBps(nic: NicSpec, nbytes: int, num_pages: int = 1) -> float:
    """Steady-state GB/s of back-to-back writes of `nbytes` each (many in flight), each
    split into `num_pages` pages: limited by posting (post_us per work request) or by the
    achieved bandwidth, whichever is slower."""
    if nbytes <= 0 or num_pages < 1:
        raise ValueError(
            f"p2p_stream_GBps: expected nbytes > 0, num_pages >= 1; got {nbytes}, {num_pages}"
        )
    page = nbytes / num_pages
    wr = num_pages * int(_shards(np.array(page), nic))
    per_write_us = max(wr * nic.post_us, nbytes / nic.bytes_per_us)
    return nbytes / per_write_us / 1e3
