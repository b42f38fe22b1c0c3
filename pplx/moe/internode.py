"""Dispatch and combine across nodes: the inter-node protocol over the TransferEngine.

Shape legend: T tokens per rank (at most `max_num_tokens`), K experts per token, E experts,
R ranks, P ranks per node, E_local = E / R, H hidden, S fp8 scales per token,
Q = `max_private_tokens` rows of a private receive region, C = T * K slots per rank.

Ranks are split into nodes of P consecutive ranks (`ranks_per_node`; on one machine the
nodes are emulated). Inside a node, rows move over the node's process group (gloo on the
CPU, NCCL on CUDA: the intra-node path of the torch backend). Between nodes everything goes
through the TransferEngine, one-sided writes with 32-bit immediates, as pplx-garden does:

- counts first: each rank writes its `[E]` counts to every remote rank (one scatter,
  immediate COUNTS + src); a receiver knows the counts of source s once COUNTS + s arrived;
- private rows: before any count is known, up to Q rows per destination go into that
  destination's private region for this source (immediate DISP_PRIV + src);
- overflow: rows beyond Q go, once every count is known, into the destination's shared
  overflow region at an offset derived from the counts (sources in rank order);
- receivers count immediates per source (`num_shards` arrivals per write: with
  `nets_per_gpu` > 1 a large write is split over the domains, one immediate per shard), so
  nothing depends on delivery order (EFA is unordered), then place the rows into
  `expert_x` in contract order (source rank, token, slot);
- combine mirrors it: every expert-output row goes back to its source rank's private
  region (first Q rows per source) or its overflow region;
- reuse: once a receiver has read a phase's buffers, its next call of that phase first
  sends a credit immediate (DISP_FREE / COMB_FREE + src) to every remote rank, then waits
  for every remote rank's credit before writing into its buffers again. Credits go out at
  the start of the next call, not at the end of this one, so that no write is ever in
  flight to a peer that has already finished (tcp fails such writes at close).

Sequence of one dispatch, source s on node A, destination d on node B (time flows down)::

    #   s (node A)                                    d (node B)
    #   ----------                                    ----------
    #   counts[E] = bincount(indices[:bound_m])
    #   iteration > 0: credit DISP_FREE+s -> d; wait DISP_FREE+d <-- d's credit (its last
    #                                                 placement is done: buffers free)
    #   write counts -> d.counts[s]        -- COUNTS+s -------------->
    #   write rows[:Q] -> d.private[s]     -- DISP_PRIV+s ----------->
    #   node peers: all_to_all (node group)
    #   ======== do_send returns; compute may overlap ========
    #                                                 wait COUNTS+s' for every remote s'
    #   wait COUNTS+d' for every remote d'            (d overflows to its remote dests too)
    #   write rows[Q:] -> d.overflow[off(s, d)] -- DISP_OVF+s -------->
    #      off(s, d) = sum over remote s' < s of max(0, n(s', d) - Q)
    #                                                 wait DISP_PRIV+s (shards of 1 write)
    #                                                 wait DISP_OVF+s  (if n(s, d) > Q)
    #                                                 place rows: expert_x[row] = record
    #                                                 (credit DISP_FREE+d to every remote
    #                                                 s at the start of d's next dispatch)
    #
    # combine: d writes expert_y rows of s's slots to s.comb_private[d] / s.comb_overflow
    # (COMB+d, after COMB_FREE+s of the previous iteration); s waits for COMB+d, sums
    # weights * rows in f32 in k order; COMB_FREE+s goes to every remote d at the start of
    # s's next combine.

A dispatch row travels as one record of H * itemsize bytes of x followed by S * 4 bytes of
scales (fp8), so rows and their scales land with one write. GPU rows cross the fabric
through pinned host memory when the libfabric build lacks FI_HMEM (every Debian/Ubuntu
build here); with FI_HMEM the registered regions live in GPU memory; `fabric_path` says
which.

Host work per call (no loop over rows or tokens): the counts cross device -> host once
(non-blocking into pinned memory, one sync); the index tensors (sorted slot order, rows of
`expert_x` in arrival order) are computed once from the counts; each destination's rows
are one `index_select` straight into the registered send buffer (staged: on the device,
then one copy to pinned memory), posted before the next destination's are packed; each
received region is one `index_copy_` (in 8-byte words) into `expert_x` or into the slot
order of combine; per-call scratch is allocated once and reused.

Warning: dispatch and combine are collectives over the whole group and the node groups;
combine uses the routing of the dispatch before it. Counts are read on the host, so calls
synchronise with the device and cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from pplx.fabric import FabricTimeout, FaultInjection, MrDescriptor, ScatterDst, TransferEngine
from pplx.fabric.bootstrap import exchange_descriptors
from pplx.moe import layout as L
from pplx.moe import reference as R

PROVIDER_ENV = "PPLX_MOE_PROVIDER"
NUM_KINDS = 6
COUNTS, DISP_PRIV, DISP_OVF, DISP_FREE, COMB, COMB_FREE = range(NUM_KINDS)
KIND_NAMES = (
    "counts",
    "private rows",
    "overflow rows",
    "dispatch credit",
    "combine rows",
    "combine credit",
)
_ALIGN = 64  # bytes: every section of the registered regions starts on a cache line


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass(frozen=True)
class InterNodeOptions:
    """Knobs of the inter-node path (`AllToAll(..., internode=InterNodeOptions(...))`).

    Attributes:
        provider: libfabric provider between nodes: "shm" or "tcp" on one machine, "efa" or
            "verbs" on clusters; None reads `PPLX_MOE_PROVIDER` (default "shm").
        nets_per_gpu: NICs (engine domains) per rank; writes of at least
            `shard_threshold` bytes are split over them, one immediate per shard.
        shard_threshold: bytes from which a write is sharded (None: the engine's 1 MiB).
        max_overflow_tokens: rows of the shared overflow region (None: the worst case,
            R_remote * (C - Q)); a smaller value is refused at construction.
        timeout_s: every wait for a peer gives up after this long with an error naming it.
        fault_injection: reorder and delay immediates (testing); None reads the env.
        use_proxy: post writes through the C host proxy's ring instead of from Python.
        engine_sleep_us: the engine progress thread's idle nap (None: the engine's default,
            20 us doubling to 250 us; 0: it polls without napping, one core per rank). A
            large shm write completes with the target's progress, so while a rank is busy
            elsewhere its peers' writes move at this pace; GPU hosts have cores to spare.
    """

    provider: str | None = None
    nets_per_gpu: int = 1
    shard_threshold: int | None = None
    max_overflow_tokens: int | None = None
    timeout_s: float = 60.0
    fault_injection: FaultInjection | None = None
    use_proxy: bool = False
    engine_sleep_us: int | None = None


@dataclasses.dataclass
class PhaseTimes:
    """Microseconds spent in the protocol's steps during the last dispatch and combine
    (host wall clock; the benchmark's breakdown)."""

    counts: float = 0.0  # pack counts + scatter + wait for every remote count
    private: float = 0.0  # pack rows + post private writes
    overflow: float = 0.0  # post overflow writes
    intra: float = 0.0  # node group exchange
    recv_wait: float = 0.0  # wait for rows (dispatch) to land
    place: float = 0.0  # rows into expert_x
    combine_send: float = 0.0  # credits + pack rows + post writes
    combine_intra: float = 0.0  # node group exchange
    combine_wait: float = 0.0
    combine_place: float = 0.0  # received rows into (t, k) slot order
    combine_sum: float = 0.0


@dataclasses.dataclass
class _DispatchState:
    counts: torch.Tensor  # [R, E] int64 on the host: slots source s routes to expert g
    layout: L.GroupLayout
    send_order: torch.Tensor  # [N] int64 flat slot indices sorted by (expert, t, k)
    send_counts: list[int]  # [R] slots this rank sends to each rank
    num_live: int
    recv_done: bool = False
    recv_rows: torch.Tensor | None = None  # [N_recv] int64 rows of expert_x, arrival order
    n_from: list[int] | None = None  # [R] slots each source rank sent here


def _words(*parts: torch.Tensor) -> list[torch.Tensor]:
    """The same bytes, `[N, B]` uint8 -> `[N, B / w]` of the widest integer type (w = 8, 4,
    2 bytes) that divides every part's row width, row stride and storage offset.

    `index_copy_` moves one element at a time: on the CPU, 1024 rows of 7168 bytes take
    6.4 ms as uint8 and 1.2 ms as int64 (one thread, this VM), so scatters go in words.
    """
    for dt in (torch.int64, torch.int32, torch.int16):
        w = dt.itemsize
        if all(
            t.shape[-1] % w == 0 and t.stride(0) % w == 0 and t.storage_offset() % w == 0
            for t in parts
        ):
            return [t.view(dt) for t in parts]
    return list(parts)


def _us(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e6


class _EnginePoster:
    """Posts writes straight from Python through the TransferEngine."""

    name = "python"

    def __init__(self, engine: TransferEngine, send_mr, descs: list[MrDescriptor]):
        self.engine, self.send_mr, self.descs = engine, send_mr, descs
        self.reqs: list[Any] = []

    def write(self, dst: int, src_off: int, dst_off: int, nbytes: int, imm: int) -> None:
        self.reqs.append(
            self.engine.submit_write(
                self.send_mr,
                self.descs[dst],
                nbytes,
                src_offset=src_off,
                dst_offset=dst_off,
                imm=imm,
            )
        )

    def scatter(self, dsts: list[int], src_off: int, dst_off: int, nbytes: int, imm: int) -> None:
        sd = [ScatterDst(self.descs[d], nbytes, src_off, dst_off) for d in dsts]
        self.reqs.append(self.engine.submit_scatter(self.send_mr, sd, imm=imm))

    def imm(self, dst: int, imm: int) -> None:
        self.reqs.append(self.engine.submit_imm(imm, self.descs[dst]))

    def wait_all(self, timeout: float) -> None:
        reqs, self.reqs = self.reqs, []
        for r in reqs:
            r.wait(timeout)

    def close(self) -> None:
        self.reqs = []


class InterNodeAllToAll:
    """Dispatch/combine over ranks split into nodes (`ranks_per_node`), TransferEngine
    between nodes, the node's process group inside. Same methods and arguments as
    `pplx.moe.AllToAll` (which constructs this when `ranks_per_node < world_size` and
    validates every argument first).

    Args (beyond AllToAll's):
        ranks_per_node: P; must divide the world size R.
        max_private_tokens: Q, rows per (source, destination) pair written before counts
            are known (default: twice the balanced share C / R, at least 1, at most C).
        options: `InterNodeOptions`.

    Raises:
        ValueError: at construction, for P not dividing R, Q < 1, or an overflow region
            smaller than the worst case.
    """

    def __init__(
        self,
        *,
        max_num_tokens: int,
        num_experts: int,
        expert_padding: int,
        hidden_dim: int,
        hidden_dim_scale: int,
        in_dtype: torch.dtype,
        out_dtype: torch.dtype,
        scale_dtype: torch.dtype | None,
        num_experts_per_token: int,
        group: dist.ProcessGroup | None,
        device: torch.device,
        ranks_per_node: int,
        max_private_tokens: int | None = None,
        options: InterNodeOptions | None = None,
        intra_backend: str = "torch",
    ) -> None:
        opts = options or InterNodeOptions()
        if intra_backend not in ("torch", "triton"):
            raise ValueError(f"intra_backend must be 'torch' or 'triton', got {intra_backend!r}")
        self.options = opts
        self.group = group
        self.rank, self.world_size = R.group_rank_size(group)
        world = self.world_size
        if ranks_per_node < 1 or world % ranks_per_node:
            raise ValueError(
                f"ranks_per_node ({ranks_per_node}) must divide the world size ({world})"
            )
        self.ranks_per_node = ranks_per_node
        self.num_nodes = world // ranks_per_node
        self.node = self.rank // ranks_per_node
        self.node_ranks = list(range(self.node * ranks_per_node, (self.node + 1) * ranks_per_node))
        self.remote_ranks = [r for r in range(world) if r not in self.node_ranks]
        self.num_experts = num_experts
        self.num_local_experts = L.num_local_experts(num_experts, world)
        self.topk = num_experts_per_token
        self.max_num_tokens = max_num_tokens
        self.expert_padding = expert_padding
        self.hidden_dim = hidden_dim
        self.hidden_dim_scale = hidden_dim_scale or 0
        self.in_dtype, self.out_dtype = in_dtype, out_dtype
        self.device = torch.device(device)

        slots = max_num_tokens * num_experts_per_token  # C
        self.max_slots = slots
        if max_private_tokens is None:
            max_private_tokens = min(slots, max(1, -(-2 * slots // world)))
        if isinstance(max_private_tokens, bool) or not isinstance(max_private_tokens, int):
            raise TypeError(f"max_private_tokens must be an int, got {max_private_tokens!r}")
        if max_private_tokens < 1:
            raise ValueError(f"max_private_tokens must be >= 1, got {max_private_tokens}")
        self.max_private = min(max_private_tokens, slots)
        # Worst case of the shared overflow region: every remote source sends all C slots
        # here, Q of them into its private region.
        num_remote = len(self.remote_ranks)
        worst_overflow = num_remote * (slots - self.max_private)
        ovf = worst_overflow if opts.max_overflow_tokens is None else opts.max_overflow_tokens
        if ovf < worst_overflow:
            raise ValueError(
                f"max_overflow_tokens={ovf} is too small: {num_remote} remote ranks may each "
                f"send {slots} rows (max_num_tokens {max_num_tokens} x top-k "
                f"{num_experts_per_token}), {self.max_private} of them private, so the "
                f"overflow region needs {worst_overflow} rows"
            )
        self.max_overflow = ovf
        if opts.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {opts.timeout_s}")
        self.timeout_s = float(opts.timeout_s)

        # Record sizes (bytes).
        isz = torch.empty(0, dtype=in_dtype).element_size()
        self.x_bytes = hidden_dim * isz
        self.rec_bytes = self.x_bytes + 4 * self.hidden_dim_scale
        self.y_bytes = hidden_dim * torch.empty(0, dtype=out_dtype).element_size()

        # Node groups: every rank creates every node's group (new_group is a collective).
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r for r in range(world)
        ]
        backend = dist.get_backend(group)
        self.node_group = None
        for n in range(self.num_nodes):
            ranks = [self._global[r] for r in range(n * ranks_per_node, (n + 1) * ranks_per_node)]
            g = dist.new_group(ranks=ranks, backend=backend)
            if n == self.node:
                self.node_group = g

        self.engine: TransferEngine | None = None
        self.phase = PhaseTimes()
        self._iter_dispatch = 0
        self._iter_combine = 0
        self._dispatch: _DispatchState | None = None
        self._comb_pending = False
        self._poster: Any = None
        self._proxy: Any = None
        self._starts: list[int] = []  # first sorted slot of each destination rank
        self._node_recs: torch.Tensor | None = None  # dispatch rows from node peers
        self._comb_node: torch.Tensor | None = None  # combine rows from node peers
        self.has_hmem = False
        self.fabric_path = "none (one node)"
        self.buf_device = self.device
        # Per-call scratch, allocated on first use and reused (grown if ever too small):
        # fresh multi-MB host tensors cost page faults on every call.
        self._scratch_bufs: dict[str, torch.Tensor] = {}
        # This rank's counts on the host: the ONE device -> host copy of a dispatch
        # (non-blocking into pinned memory on CUDA, then one stream sync).
        self._host_counts = torch.zeros(
            num_experts, dtype=torch.int64, pin_memory=self.device.type == "cuda"
        )
        self.intra_backend = intra_backend if ranks_per_node > 1 else "torch"
        self._tri: Any = None
        if self.intra_backend == "triton":
            self._setup_triton(in_dtype, out_dtype, scale_dtype)
        if num_remote:
            self._setup_fabric(opts)

    # ------------------------------------------------------------------ setup

    def _setup_fabric(self, opts: InterNodeOptions) -> None:
        world, e = self.world_size, self.num_experts
        q, c = self.max_private, self.max_slots
        provider = opts.provider or os.environ.get(PROVIDER_ENV, "shm")
        kw: dict[str, Any] = {}
        if opts.shard_threshold is not None:
            kw["shard_threshold"] = opts.shard_threshold
        if opts.engine_sleep_us is not None:
            kw["sleep_us"] = opts.engine_sleep_us
        self.engine = TransferEngine(
            provider,
            num_domains=opts.nets_per_gpu,
            fault_injection=opts.fault_injection,
            node="127.0.0.1" if provider == "tcp" else None,
            imm_table_size=max(64, NUM_KINDS * world),
            **kw,
        )
        from pplx._ffi import lib

        self.has_hmem = bool(lib.pplx_engine_has_hmem(self.engine._handle()))
        cuda = self.device.type == "cuda"
        if cuda and self.has_hmem:
            buf_device, pin = self.device, False
            self.fabric_path = "direct: GPU memory registered (FI_HMEM)"
        elif cuda:
            buf_device, pin = torch.device("cpu"), True
            self.fabric_path = "staged: pinned host memory (libfabric without FI_HMEM)"
        else:
            buf_device, pin = torch.device("cpu"), False
            self.fabric_path = "host memory"
        self.buf_device = buf_device

        # Receive region: counts [R, E] int32 | dispatch private [R, Q] records |
        # dispatch overflow [O] records | combine private [R, Q] rows | combine overflow.
        off = 0
        self.r_counts = off
        off = _align(off + world * e * 4)
        self.r_dpriv = off
        off = _align(off + world * q * self.rec_bytes)
        self.r_dovf = off
        off = _align(off + self.max_overflow * self.rec_bytes)
        self.r_cpriv = off
        off = _align(off + world * q * self.y_bytes)
        self.r_covf = off
        off = _align(off + self.max_overflow * self.y_bytes)
        recv_bytes = max(off, _ALIGN)
        # Send region: my counts [E] int32 | dispatch records [C] (sorted slot order) |
        # combine rows [R_remote * C] (arrival order of dispatch).
        off = 0
        self.s_counts = off
        off = _align(off + e * 4)
        self.s_disp = off
        off = _align(off + c * self.rec_bytes)
        self.s_comb = off
        off = _align(off + world * c * self.y_bytes)
        send_bytes = off
        self.recv_buf = torch.zeros(
            recv_bytes, dtype=torch.uint8, device=buf_device, pin_memory=pin
        )
        self.send_buf = torch.zeros(
            send_bytes, dtype=torch.uint8, device=buf_device, pin_memory=pin
        )
        self.recv_mr, recv_desc = self.engine.register_tensor(self.recv_buf)
        self.send_mr, _ = self.engine.register_tensor(self.send_buf)
        self.descs = exchange_descriptors(recv_desc, self.group)
        if opts.use_proxy:
            from pplx.fabric.proxy import HostProxy, ProxyPoster

            self._proxy = HostProxy(self.engine, self.send_mr, self.descs)
            self._poster = ProxyPoster(self._proxy)
        else:
            self._poster = _EnginePoster(self.engine, self.send_mr, self.descs)

    def _setup_triton(self, in_dtype, out_dtype, scale_dtype) -> None:
        """The node part through `pplx.moe.kernels.TritonAllToAll` over the node group: each
        slot bound for a node peer is one token with K' = 1 and weight 1.0, in this rank's
        sorted slot order (expert, t, k), so the kernels' (source, token) order inside an
        expert is the contract's (source, t, k), and their combine returns 1.0 * y = y
        exactly (f32 product, cast back to bf16), which this object then sums in k order."""
        from pplx.moe.kernels import TritonAllToAll

        p, e_local, c = self.ranks_per_node, self.num_local_experts, self.max_slots
        dev = self.device
        self._tri = TritonAllToAll(
            max_num_tokens=c,
            num_experts=p * e_local,
            expert_padding=1,
            hidden_dim=self.hidden_dim,
            hidden_dim_scale=self.hidden_dim_scale,
            in_dtype=in_dtype,
            out_dtype=out_dtype,
            scale_dtype=scale_dtype,
            num_experts_per_token=1,
            group=self.node_group,
            device=dev,
            timeout_s=self.timeout_s,
        )
        n = L.max_recv_tokens(c, p, 1, e_local, 1)
        s = self.hidden_dim_scale
        self._tri_x = torch.zeros(c, self.hidden_dim, dtype=in_dtype, device=dev)
        self._tri_xs = torch.zeros(c, s, dtype=torch.float32, device=dev) if s else None
        self._tri_idx = torch.zeros(c, 1, dtype=torch.int32, device=dev)
        self._tri_w = torch.ones(c, 1, dtype=torch.float32, device=dev)
        self._tri_bound = torch.zeros(1, dtype=torch.int32, device=dev)
        self._tri_num = torch.zeros(e_local, dtype=torch.int32, device=dev)
        self._tri_ex = torch.empty(n, self.hidden_dim, dtype=in_dtype, device=dev)
        self._tri_exs = torch.empty(n, s, dtype=torch.float32, device=dev) if s else None
        self._tri_ey = torch.zeros(n, self.hidden_dim, dtype=out_dtype, device=dev)
        self._tri_out = torch.empty(c, self.hidden_dim, dtype=out_dtype, device=dev)
        self._node_rows: torch.Tensor | None = None

    def _tri_dispatch_args(self) -> tuple:
        return (
            self._tri_num,
            self._tri_ex,
            self._tri_exs,
            self._tri_x,
            self._tri_xs,
            self._tri_idx,
            self._tri_w,
            self._tri_bound,
        )

    def _tri_combine(self, do_send: bool, do_recv: bool) -> None:
        """One half of the node's Triton combine (its buffers set up in `_setup_triton`)."""
        self._tri.combine(
            self._tri_out,
            self._tri_idx,
            self._tri_w,
            self._tri_ey,
            self._tri_bound,
            do_send=do_send,
            do_recv=do_recv,
        )

    # ------------------------------------------------------------------ helpers

    def _imm(self, kind: int, src: int) -> int:
        return kind * self.world_size + src

    def _wait(self, kind: int, src: int, n: int) -> None:
        """Wait for n arrivals of (kind, src) and consume them; clear error on timeout."""
        if n == 0:
            return
        try:
            self.engine.imm_counter(self._imm(kind, src)).wait(
                n, timeout=self.timeout_s, consume=True
            )
        except FabricTimeout as exc:
            have = self.engine.imm_counter(self._imm(kind, src)).count
            raise TimeoutError(
                f"rank {self.rank} (node {self.node}): waited {self.timeout_s:g} s for "
                f"{KIND_NAMES[kind]} from rank {src} (node {src // self.ranks_per_node}): "
                f"{have} of {n} immediates arrived; the peer died or does not call the same "
                "collective"
            ) from exc

    def _shards(self, nbytes: int) -> int:
        return self.engine.num_shards(nbytes) if nbytes else 0

    def _wait_sends(self) -> None:
        try:
            self._poster.wait_all(self.timeout_s)
        except FabricTimeout as exc:
            raise TimeoutError(
                f"rank {self.rank}: writes to remote ranks did not complete within "
                f"{self.timeout_s:g} s (a peer died?)"
            ) from exc

    def _overflow_offset(self, counts: torch.Tensor, src: int, dst: int, per_rank: bool) -> int:
        """Row offset of `src`'s overflow in `dst`'s overflow region.

        Dispatch (per_rank False): the rows s sends to d are counts[s, experts of d]; the
        offset is the sum over remote sources s' < s of max(0, n(s', d) - Q).
        Combine (per_rank True): d sends back to s the rows of s's slots; on s the offset is
        the sum over remote d' < d of max(0, n(s, d') - Q).
        """
        e_local, q, p = self.num_local_experts, self.max_private, self.ranks_per_node
        per = counts.reshape(self.world_size, self.world_size, e_local).sum(2)  # [R_src, R_dst]
        if not per_rank:
            others = [s for s in range(src) if s // p != dst // p]
            return int(sum(max(0, int(per[s, dst]) - q) for s in others))
        others = [d for d in range(dst) if d // p != src // p]
        return int(sum(max(0, int(per[src, d]) - q) for d in others))

    # ------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        out_expert_num_tokens: torch.Tensor,
        out_expert_x: torch.Tensor,
        out_expert_x_scale: torch.Tensor | None,
        dp_x: torch.Tensor,
        dp_x_scale: torch.Tensor | None,
        indices: torch.Tensor,
        weights: torch.Tensor,
        bound_m: torch.Tensor | None = None,
        do_send: bool = True,
        do_recv: bool = True,
    ) -> None:
        """As `AllToAll.dispatch` (arguments already validated there)."""
        if do_send:
            if self._dispatch is not None and not self._dispatch.recv_done:
                raise RuntimeError("dispatch(do_send=True) called twice without do_recv")
            self._dispatch_send(dp_x, dp_x_scale, indices, bound_m)
        if do_recv:
            if self._dispatch is None or self._dispatch.recv_done:
                raise RuntimeError("dispatch(do_recv=True) without a preceding do_send")
            self._dispatch_recv(out_expert_num_tokens, out_expert_x, out_expert_x_scale)

    def _scratch(
        self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """`[rows, cols]` contiguous scratch `name` on `device`, reused across calls (grown
        when a call needs more rows). Each name has one purpose, so one live user."""
        buf = self._scratch_bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = torch.empty(max(rows, 1), cols, dtype=dtype, device=device)
            self._scratch_bufs[name] = buf
        return buf[:rows]

    def _gather_rows(self, name: str, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`src`'s rows at `rows`, as uint8, into the reused scratch `name` (valid until the
        next call with the same name)."""
        s8 = src.view(torch.uint8)
        out = self._scratch(name, rows.numel(), s8.shape[1], torch.uint8, s8.device)
        return torch.index_select(s8, 0, rows, out=out)

    @property
    def _staged(self) -> bool:
        """CUDA rows, host (pinned) registered buffers: rows cross PCIe in explicit copies."""
        return self.buf_device.type != self.device.type

    def _sync_device(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU): before the host reads
        device results, or before the NIC reads registered GPU memory (FI_HMEM)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _node_exchange(
        self, name: str, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """`all_to_all_single` of `[N_send, B]` uint8 rows over the node group, into the
        reused scratch `name`; returns `[N_recv, B]` uint8 (source rank order), valid until
        the next send of the same phase."""
        if self.ranks_per_node == 1:
            # Alone in the node: the rows are this rank's own, already packed (in the send
            # buffer or scratch, untouched until this phase's next send): no copy.
            return send
        recv = self._scratch(name, sum(recv_counts), send.shape[1], torch.uint8, send.device)
        dist.all_to_all_single(
            recv, send, list(recv_counts), list(send_counts), group=self.node_group
        )
        return recv

    def _token_records(self, x: torch.Tensor, x_scale: torch.Tensor | None, m: int) -> torch.Tensor:
        """`[m, rec_bytes]` uint8 on x's device: each live token's record (x bytes, then its
        scales as f32 bytes), so packing any set of slots is one row gather of this."""
        tr = self._scratch("token_records", m, self.rec_bytes, torch.uint8, x.device)
        tr[:, : self.x_bytes].copy_(x[:m].contiguous().view(torch.uint8))
        if self.hidden_dim_scale:
            tr[:, self.x_bytes :].copy_(x_scale[:m].float().contiguous().view(torch.uint8))
        return tr

    def _dispatch_send(self, x, x_scale, indices, bound_m) -> None:
        ph = self.phase = PhaseTimes()
        t0 = time.perf_counter()
        world, e, e_local, k = self.world_size, self.num_experts, self.num_local_experts, self.topk
        m = L.live_tokens(bound_m, indices.shape[0])
        flat = indices[:m].reshape(-1).long()
        my_counts = torch.bincount(flat, minlength=e)[:e]  # [E] on the device
        sorted_experts, send_order = torch.sort(flat, stable=True)  # [N] by (expert, t, k)
        tok = send_order // k  # [N] token of each sorted slot
        # The one device -> host read of the send side: this rank's counts (non-blocking
        # into pinned memory, one sync); every other index derives from them on the host.
        hc = self._host_counts
        hc.copy_(my_counts, non_blocking=True)
        self._sync_device()
        counts = torch.zeros(world, e, dtype=torch.int64)
        counts[self.rank] = hc
        per_dst = hc.view(world, e_local).sum(1)  # [R] slots sent to each rank
        send_counts = per_dst.tolist()
        starts = (per_dst.cumsum(0) - per_dst).tolist()  # first sorted slot of each rank
        remote = self.remote_ranks
        staged = self._staged
        token_recs = self._token_records(x, x_scale, m)
        if remote and not staged:  # pack straight into the registered send buffer
            pack = self.send_buf[self.s_disp : self.s_disp + self.max_slots * self.rec_bytes]
            pack = pack.view(self.max_slots, self.rec_bytes)
        else:  # on the device; remote slices are then copied to pinned memory
            pack = self._scratch(
                "dispatch_pack", flat.numel(), self.rec_bytes, torch.uint8, x.device
            )

        def gather(lo: int, hi: int) -> None:
            # Records of sorted slots lo..hi (one destination's, or the node's): one gather.
            torch.index_select(token_recs, 0, tok[lo:hi], out=pack[lo:hi])

        if remote:
            q = self.max_private
            if self._iter_dispatch > 0:
                # Our receive buffers were read by the last dispatch_recv: say so now (not
                # then, so that no write is left in flight to a peer that has finished),
                # then wait until every peer said the same of its buffers.
                for d in remote:
                    self._poster.imm(d, self._imm(DISP_FREE, self.rank))
                for d in remote:
                    self._wait(DISP_FREE, d, 1)
            cnt_view = self.send_buf[self.s_counts : self.s_counts + 4 * e]
            cnt_view.view(torch.int32).copy_(hc)
            self._poster.scatter(
                remote,
                self.s_counts,
                self.r_counts + self.rank * e * 4,
                e * 4,
                self._imm(COUNTS, self.rank),
            )
            ph.counts += _us(t0)
            t1 = time.perf_counter()
            # A destination's records are contiguous in sorted order: gather them, post its
            # private write, and gather the next destination's while that write progresses.
            host_recs = self.send_buf[
                self.s_disp : self.s_disp + self.max_slots * self.rec_bytes
            ].view(self.max_slots, self.rec_bytes)
            for d in remote:
                n = send_counts[d]
                if n == 0:
                    continue
                lo = starts[d]
                gather(lo, lo + n)
                if staged:
                    host_recs[lo : lo + n].copy_(pack[lo : lo + n])  # one D2H copy (syncs)
                else:
                    self._sync_device()
                self._poster.write(
                    d,
                    self.s_disp + lo * self.rec_bytes,
                    self.r_dpriv + self.rank * q * self.rec_bytes,
                    min(n, q) * self.rec_bytes,
                    self._imm(DISP_PRIV, self.rank),
                )
            ph.private += _us(t1)

        t2 = time.perf_counter()
        # Node peers: counts all-gather, then rows over the node group (torch all-to-all)
        # or the Triton kernels (NVLink / shared memory).
        nr = self.node_ranks
        if self.ranks_per_node > 1:
            gathered = [torch.empty_like(my_counts) for _ in nr]
            dist.all_gather(gathered, my_counts, group=self.node_group)
            counts[nr[0] : nr[-1] + 1] = torch.stack(gathered).cpu()  # one device -> host copy
        me_lo, me_hi = self.rank * e_local, (self.rank + 1) * e_local
        n_send_node = [send_counts[r] for r in nr]
        n_recv_node = counts[nr[0] : nr[-1] + 1, me_lo:me_hi].sum(1).tolist()
        # Node ranks are consecutive, so their slots are one block of the sorted order.
        lo, hi = starts[nr[0]], starts[nr[-1]] + n_send_node[-1]
        if self._tri is not None:
            n_node = hi - lo
            t_node = tok[lo:hi]
            torch.index_select(
                x[:m].contiguous().view(torch.uint8),
                0,
                t_node,
                out=self._tri_x.view(torch.uint8)[:n_node],
            )
            if self._tri_xs is not None:
                xs = x_scale[:m].float().contiguous()
                torch.index_select(xs, 0, t_node, out=self._tri_xs[:n_node])
            node_first = nr[0] * e_local
            self._tri_idx[:n_node, 0] = (sorted_experts[lo:hi] - node_first).to(torch.int32)
            self._tri_bound.fill_(n_node)
            self._tri.dispatch(*self._tri_dispatch_args(), do_send=True, do_recv=False)
            self._node_recs = None
        else:
            gather(lo, hi)
            self._node_recs = self._node_exchange(
                "dispatch_node", pack[lo:hi], n_send_node, n_recv_node
            )
        ph.intra += _us(t2)
        self._dispatch = _DispatchState(
            counts=counts,
            layout=None,  # type: ignore[arg-type]  # set once every count is known
            send_order=send_order,
            send_counts=send_counts,
            num_live=m,
        )
        self._starts = starts

    def _dispatch_recv(self, out_num, out_x, out_x_scale) -> None:
        st = self._dispatch
        ph = self.phase
        world, e_local, q = self.world_size, self.num_local_experts, self.max_private
        me_lo, me_hi = self.rank * e_local, (self.rank + 1) * e_local
        remote = self.remote_ranks
        counts = st.counts
        xb, rb = self.x_bytes, self.rec_bytes
        if remote:
            t0 = time.perf_counter()
            cview = self.recv_buf[self.r_counts : self.r_counts + world * self.num_experts * 4]
            cview = cview.view(torch.int32).view(world, self.num_experts)
            for s in remote:
                self._wait(COUNTS, s, 1)
            remote_t = torch.tensor(remote)
            counts[remote_t] = cview.to("cpu", torch.int64)[remote_t]  # one copy (FI_HMEM: D2H)
            ph.counts += _us(t0)
            t1 = time.perf_counter()
            for d in remote:
                n = st.send_counts[d]
                if n <= q:
                    continue
                off = self._overflow_offset(counts, self.rank, d, per_rank=False)
                self._poster.write(
                    d,
                    self.s_disp + (self._starts[d] + q) * rb,
                    self.r_dovf + off * rb,
                    (n - q) * rb,
                    self._imm(DISP_OVF, self.rank),
                )
            ph.overflow += _us(t1)
        t2 = time.perf_counter()
        n_from = counts[:, me_lo:me_hi].sum(1).tolist()  # [R] slots each source sends here
        for s in remote:
            self._wait(DISP_PRIV, s, self._shards(min(n_from[s], q) * rb))
            self._wait(DISP_OVF, s, self._shards(max(0, n_from[s] - q) * rb))
        ph.recv_wait += _us(t2)

        dev = out_x.device
        nr = self.node_ranks
        # Node rows as (x bytes, scale bytes) in arrival order (source, expert, t, k).
        if self._tri is not None:
            t_tri = time.perf_counter()
            self._tri.dispatch(*self._tri_dispatch_args(), do_send=False, do_recv=True)
            # Where the kernels put the node rows: their layout over the node's experts.
            lo_e = nr[0] * e_local
            node_counts = counts[nr[0] : nr[-1] + 1, lo_e : lo_e + len(nr) * e_local]
            node_layout = L.group_layout(node_counts, 1)
            self._node_rows = L.recv_rows(node_layout, self.rank - nr[0]).to(self.device)
            node_x = self._gather_rows("node_x", self._tri_ex, self._node_rows)
            node_s = None
            if self._tri_exs is not None:
                node_s = self._gather_rows("node_s", self._tri_exs, self._node_rows)
            ph.intra += _us(t_tri)
        else:
            node_x, node_s = self._node_recs[:, :xb], self._node_recs[:, xb:]
        t3 = time.perf_counter()
        layout = L.group_layout(counts, self.expert_padding)
        st.layout = layout
        rows = L.recv_rows(layout, self.rank).to(dev)  # [N_recv] arrival order
        st.recv_rows, st.n_from = rows, n_from
        # Parts in arrival order: the node block where its first rank falls, and each
        # remote source's private rows, then its overflow rows, straight from the region.
        parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for s in range(world):
            if s == nr[0]:
                parts.append((node_x, node_s))
            elif s not in nr and n_from[s]:
                n = n_from[s]
                base = self.r_dpriv + s * q * rb
                regions = [self.recv_buf[base : base + min(n, q) * rb]]
                if n > q:
                    off = self._overflow_offset(counts, s, self.rank, per_rank=False)
                    base = self.r_dovf + off * rb
                    regions.append(self.recv_buf[base : base + (n - q) * rb])
                for reg in regions:
                    rec = reg.view(-1, rb).to(dev)  # staged: one H2D copy per region
                    parts.append((rec[:, :xb], rec[:, xb:]))
        # One index_copy_ per part into expert_x (and its scales), in words.
        x_out = out_x.view(torch.uint8)
        s_out = None if out_x_scale is None else out_x_scale.view(torch.uint8)
        pos = 0
        for px, ps in parts:
            n = px.shape[0]
            if n == 0:
                continue
            dst_rows = rows[pos : pos + n]
            dst, src = _words(x_out, px)
            dst.index_copy_(0, dst_rows, src)
            if s_out is not None:
                dst, src = _words(s_out, ps)
                dst.index_copy_(0, dst_rows, src)
            pos += n
        if pos != rows.numel():
            raise RuntimeError(f"rank {self.rank}: placed {pos} of {rows.numel()} rows")
        out_num.copy_(layout.expert_num_tokens[self.rank].to(out_num.device, torch.int32))
        ph.place += _us(t3)
        if remote:
            self._wait_sends()
        self._node_recs = None
        st.recv_done = True
        self._iter_dispatch += 1

    # ------------------------------------------------------------------ combine

    def combine(
        self,
        out_tokens: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        expert_y: torch.Tensor,
        bound_m: torch.Tensor | None = None,
        do_send: bool = True,
        do_recv: bool = True,
        accumulate: bool = False,
    ) -> None:
        """As `AllToAll.combine`, with the routing of the preceding dispatch."""
        st = self._dispatch
        if st is None or not st.recv_done:
            raise RuntimeError("combine needs a completed dispatch before it (its routing)")
        m = L.live_tokens(bound_m, indices.shape[0])
        if m != st.num_live or not torch.equal(
            torch.bincount(indices[:m].reshape(-1).long(), minlength=self.num_experts)[
                : self.num_experts
            ].cpu(),
            st.counts[self.rank],
        ):
            raise ValueError(
                "combine: indices/bound_m differ from the preceding dispatch's routing "
                "(combine returns the rows that dispatch placed)"
            )
        if do_send:
            if self._comb_pending:
                raise RuntimeError("combine(do_send=True) called twice without do_recv")
            self._combine_send(expert_y)
            self._comb_pending = True
        if do_recv:
            if not self._comb_pending:
                raise RuntimeError("combine(do_recv=True) without a preceding do_send")
            self._combine_recv(out_tokens, weights, accumulate)
            self._comb_pending = False

    def _combine_send(self, expert_y: torch.Tensor) -> None:
        st = self._dispatch
        t0 = time.perf_counter()
        q, yb = self.max_private, self.y_bytes
        counts, rows, n_from = st.counts, st.recv_rows, st.n_from  # rows: arrival order
        seg = [0]
        for n in n_from:
            seg.append(seg[-1] + n)
        y_src = expert_y.contiguous().view(torch.uint8)  # [rows of expert_y, y_bytes]
        remote = self.remote_ranks
        staged = self._staged
        if remote and not staged:  # gather straight into the registered send buffer
            ys = self.send_buf[self.s_comb : self.s_comb + self.world_size * self.max_slots * yb]
            pack = ys.view(-1, yb)
        else:
            pack = self._scratch("combine_pack", rows.numel(), yb, torch.uint8, y_src.device)

        def gather(lo: int, hi: int) -> None:
            # expert_y rows of arrival slots lo..hi (one source's, or the node's): one gather.
            torch.index_select(y_src, 0, rows[lo:hi], out=pack[lo:hi])

        if remote:
            if self._iter_combine > 0:  # credits, as in _dispatch_send
                for s in remote:
                    self._poster.imm(s, self._imm(COMB_FREE, self.rank))
                for s in remote:
                    self._wait(COMB_FREE, s, 1)
            host_ys = self.send_buf[
                self.s_comb : self.s_comb + self.world_size * self.max_slots * yb
            ].view(-1, yb)
            for s in remote:
                n = n_from[s]
                if n == 0:
                    continue
                lo = seg[s]
                gather(lo, lo + n)
                if staged:
                    host_ys[lo : lo + n].copy_(pack[lo : lo + n])  # one D2H copy (syncs)
                else:
                    self._sync_device()
                src = self.s_comb + lo * yb
                imm = self._imm(COMB, self.rank)
                self._poster.write(s, src, self.r_cpriv + self.rank * q * yb, min(n, q) * yb, imm)
                if n > q:
                    off = self._overflow_offset(counts, s, self.rank, per_rank=True)
                    self._poster.write(s, src + q * yb, self.r_covf + off * yb, (n - q) * yb, imm)
        nr = self.node_ranks
        lo, hi = seg[nr[0]], seg[nr[-1] + 1]  # node sources are consecutive: one block
        gather(lo, hi)
        send = pack[lo:hi]
        t_intra = time.perf_counter()
        n_back = [st.send_counts[r] for r in nr]
        if self._tri is not None:
            dst, src = _words(self._tri_ey.view(torch.uint8), send)
            dst.index_copy_(0, self._node_rows, src)
            self._tri_combine(do_send=True, do_recv=False)
        else:
            self._comb_node = self._node_exchange(
                "combine_node", send, [n_from[r] for r in nr], n_back
            )
        self.phase.combine_intra = _us(t_intra)
        self.phase.combine_send = (t_intra - t0) * 1e6

    def _combine_recv(self, out_tokens, weights, accumulate) -> None:
        st = self._dispatch
        t0 = time.perf_counter()
        q, yb = self.max_private, self.y_bytes
        dev = out_tokens.device
        nr = self.node_ranks
        if self._tri is not None:
            self._tri_combine(do_send=False, do_recv=True)
            n_node = sum(st.send_counts[r] for r in nr)
            self._comb_node = self._tri_out[:n_node].view(torch.uint8)
        for d in self.remote_ranks:
            n = st.send_counts[d]
            arrivals = self._shards(min(n, q) * yb)
            arrivals += self._shards(max(0, n - q) * yb)
            self._wait(COMB, d, arrivals)
        self.phase.combine_wait = _us(t0)
        t1 = time.perf_counter()
        m, k, h = st.num_live, self.topk, self.hidden_dim
        # Rows back in (t, k) slot order: the parts are in send order (destination, expert,
        # t, k), i.e. consecutive slices of send_order; one index_copy_ per part, in words.
        slots = self._scratch("combine_slots", m * k, yb, torch.uint8, dev)
        order = st.send_order
        pos = 0
        parts: list[torch.Tensor] = []
        for d in range(self.world_size):
            if d == nr[0]:
                parts.append(self._comb_node)  # every node rank's rows, in rank order
            elif d not in nr and st.send_counts[d]:
                n = st.send_counts[d]
                base = self.r_cpriv + d * q * yb
                parts.append(self.recv_buf[base : base + min(n, q) * yb])
                if n > q:
                    off = self._overflow_offset(st.counts, self.rank, d, per_rank=True)
                    base = self.r_covf + off * yb
                    parts.append(self.recv_buf[base : base + (n - q) * yb])
        for part in parts:
            part = part.view(-1, yb).to(dev)  # staged: one H2D copy per region
            n = part.shape[0]
            if n:
                dst, src = _words(slots, part)
                dst.index_copy_(0, order[pos : pos + n], src)
            pos += n
        if pos != m * k:
            raise RuntimeError(f"rank {self.rank}: combine got {pos} of {m * k} rows")
        self.phase.combine_place = _us(t1)
        t2 = time.perf_counter()
        rows_y = slots.view(self.out_dtype).view(m, k, h)
        w = weights[:m].float()
        # The reference's arithmetic (`reference.weighted_sum`): acc = acc + w * row in k
        # order, each product rounded to f32 before the add. One slot column at a time:
        # the row converted to f32 (exact) into a reused [m, H] buffer, scaled, added; no
        # f32 copy of all m * K rows (decode, one thread: 9.7 ms; one mixed bf16 x f32
        # torch.mul per column: 11.3 ms).
        acc = self._scratch("combine_acc", m, h, torch.float32, dev)
        prod = self._scratch("combine_prod", m, h, torch.float32, dev)
        acc.zero_()
        for kk in range(k):
            prod.copy_(rows_y[:, kk])
            prod.mul_(w[:, kk : kk + 1])
            acc.add_(prod)
        R.finish_combine(acc, out_tokens, accumulate)
        if self.remote_ranks:
            self._wait_sends()
        self._comb_node = None
        self._iter_combine += 1
        self.phase.combine_sum = _us(t2)

    # ------------------------------------------------------------------ lifetime

    def destroy(self) -> None:
        """Stop the proxy, close the engine (unregisters the buffers). Idempotent; not a
        collective (a peer that died must not block it)."""
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        if self._tri is not None:
            self._tri.destroy()
            self._tri = None
        if self._poster is not None:
            self._poster.close()
            self._poster = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._dispatch = None
