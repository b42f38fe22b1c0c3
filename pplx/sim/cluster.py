"""Plain dataclasses describing a GPU cluster for the latency model (`pplx.sim.model`).

Every parameter is named, has a unit in its name and a source in `PARAM_SOURCES`:
"vendor" (a datasheet figure), "measured" (measured in this repository, DESIGN.md
"Facts about these machines", H100 SXM, 2026-11), "fitted" (least squares on the
published pplx-garden decode table, `pplx.sim.calibrate`) or "assumed" (a round number
we chose; the docstring says why it matters little).

Presets:
- `cx7_cluster()`: H100/H200 nodes of 8 GPUs, one 400 Gb/s ConnectX-7 per GPU (RC, in order).
- `efa_cluster()`: AWS p5en, 8 H200 per node, two 200 Gb/s EFA NICs per GPU (SRD, unordered).
The fitted values in the presets are the output of `python -m pplx.sim.calibrate`
(re-run it and paste the numbers when the model changes; a test checks they still fit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

NIC_KINDS = ("cx7", "efa", "shm", "tcp")


@dataclass(frozen=True)
class NicSpec:
    """One kind of network adapter, as the TransferEngine sees it.

    kind: "cx7" (ConnectX-7, RC queue pairs, in-order), "efa" (AWS EFA, SRD, reliable but
        unordered), or a libfabric provider measured here ("shm", "tcp").
    ordered: whether writes of one queue pair land in order. The protocol never relies on
        it (completion counts immediates), so it only documents the transport.
    nics_per_gpu: adapters per GPU; writes of at least `shard_min_bytes` are split evenly
        over all of them (one work request each), smaller ones go to one NIC.
    gbps_per_nic: line rate per adapter in Gb/s (vendor).
    bw_efficiency: fraction of the line rate one stream of large writes achieves (fitted).
    post_us: proxy-thread CPU time per work request posted or completion reaped, i.e. the
        per-message software cost of libfabric + provider (fitted).
    latency_us: one-way time from a posted write to its completion entry at the receiver,
        switch hops included (fitted).
    shard_min_bytes: smallest write that is sharded over all NICs (1 MiB: the default
        `shard_threshold` of `pplx.fabric.TransferEngine`; the decode fit is the same with
        64 KiB, as posting costs are small there).
    """

    kind: str
    ordered: bool
    nics_per_gpu: int
    gbps_per_nic: float
    bw_efficiency: float
    post_us: float
    latency_us: float
    shard_min_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kind not in NIC_KINDS:
            raise ValueError(f"NicSpec.kind: expected one of {NIC_KINDS}, got {self.kind!r}")
        if self.nics_per_gpu < 1:
            raise ValueError(f"NicSpec.nics_per_gpu: expected >= 1, got {self.nics_per_gpu}")
        for name in ("gbps_per_nic", "bw_efficiency", "post_us", "latency_us"):
            if not getattr(self, name) > 0:
                raise ValueError(f"NicSpec.{name}: expected > 0, got {getattr(self, name)}")

    @property
    def bytes_per_us_per_nic(self) -> float:
        """Achieved bytes per microsecond of one adapter (Gb/s * 1e9 / 8 / 1e6 * efficiency)."""
        return self.gbps_per_nic * 1e3 / 8 * self.bw_efficiency

    @property
    def bytes_per_us(self) -> float:
        """Achieved bytes per microsecond of all adapters of one GPU together."""
        return self.bytes_per_us_per_nic * self.nics_per_gpu


@dataclass(frozen=True)
class Cluster:
    """A cluster of identical nodes.

    gpus_per_node: GPUs joined by NVLink in one node (8 on p5en and DGX H100; vendor).
    nvlink_GBps: achieved one-way NVLink copy bandwidth per GPU, GB/s (measured here: 396
        GB/s peer copy on H100 SXM NV18; vendor figure 450).
    hbm_GBps: device memory bandwidth used to pack rows into send buffers and unpack them
        (vendor: 3350 GB/s H100 SXM; the pack/unpack cost is < 5 us in every decode cell).
    kernel_fixed_us: per-call cost of the dispatch or combine kernels that does not depend
        on bytes: launch, the grid-wide barrier and flag polling (fitted, on the EP8 cells,
        which use no NIC).
    proxy_one_way_us: GPU -> host proxy (work item seen) or proxy -> GPU (flag seen), half
        of the measured 4.2 us round trip of a Triton kernel and a C thread over pinned host
        memory (measured here, H100; a Python thread took 64.6 us).
    nic: the network adapters of each GPU.
    max_private_tokens: rows per (source, destination) pair that the sender writes into the
        destination's private region before the counts are known; the rest waits for the
        counts (fitted on a grid: 24 to 48 fit equally well, 16 and 128 worse; 32 kept).
    dispatch_dedup: "rank" sends a token once per destination rank (pplx-garden groups
        tokens by destination and writes once per peer), "none" once per (token, expert)
        (fitted on a grid: "rank").
    combine_dedup: "rank" returns one row per (token, rank), the rank's expert outputs
        summed first; "none" one row per (token, slot). Fitted: with "none" the published
        CX7 combine would need more than the 400 Gb/s line rate.
        Both accept "node" (a layout prototype, not pplx-garden's): a token crosses the
        fabric once per destination node, to the rank of the same local index there, which
        fans it out over NVLink (combine: sums over NVLink first, then one row per node).
    nvlink_hop_us: the extra NVLink hop of "node" dedup: a flag wait between two kernels
        of one node (assumed 3 us: about two NVLink signal round trips).
    """

    gpus_per_node: int
    nvlink_GBps: float
    hbm_GBps: float
    kernel_fixed_us: float
    proxy_one_way_us: float
    nic: NicSpec
    max_private_tokens: int = 32
    dispatch_dedup: str = "rank"
    combine_dedup: str = "rank"
    nvlink_hop_us: float = 3.0
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"Cluster.gpus_per_node: expected >= 1, got {self.gpus_per_node}")
        if self.max_private_tokens < 0:
            raise ValueError(
                f"Cluster.max_private_tokens: expected >= 0, got {self.max_private_tokens}"
            )
        for name in ("dispatch_dedup", "combine_dedup"):
            if getattr(self, name) not in ("rank", "none", "node"):
                raise ValueError(
                    f"Cluster.{name}: expected 'rank', 'none' or 'node', "
                    f"got {getattr(self, name)!r}"
                )

    def replace(self, **changes: object) -> Cluster:
        """A copy with some fields changed; NicSpec fields may be given as `nic_<field>`."""
        nic_changes = {k[4:]: v for k, v in changes.items() if k.startswith("nic_")}
        rest = {k: v for k, v in changes.items() if not k.startswith("nic_")}
        nic = dataclasses.replace(self.nic, **nic_changes) if nic_changes else self.nic
        return dataclasses.replace(self, nic=nic, **rest)


# name -> (unit, source kind, source text). `describe()` prints it.
PARAM_SOURCES: dict[str, tuple[str, str, str]] = {
    "gpus_per_node": ("GPUs", "vendor", "p5en and DGX H100/H200: 8 GPUs per node"),
    "nvlink_GBps": ("GB/s", "measured", "DESIGN.md: H100 SXM peer copy ~396 GB/s one way"),
    "hbm_GBps": ("GB/s", "vendor", "H100 SXM HBM3 3.35 TB/s"),
    "kernel_fixed_us": ("us", "fitted", "EP8 decode cells of pplx_garden_decode.csv"),
    "proxy_one_way_us": ("us", "measured", "DESIGN.md: Triton kernel <-> C thread 4.2 us RTT / 2"),
    "max_private_tokens": ("rows", "fitted", "grid 16..128 in calibrate --sweep: 24-48 fit"),
    "dispatch_dedup": ("-", "fitted", "grid in calibrate --sweep; 'rank' fits best"),
    "combine_dedup": ("-", "fitted", "grid; 'none' needs more than 400 Gb/s on CX7"),
    "nvlink_hop_us": ("us", "assumed", "node dedup only: one NVLink flag wait between kernels"),
    "nic.nics_per_gpu": ("NICs", "vendor", "CX7: 1 x 400G per GPU; p5en: 2 x 200G EFA per GPU"),
    "nic.gbps_per_nic": ("Gb/s", "vendor", "CX7 400 Gb/s; EFA (p5en) 200 Gb/s per NIC"),
    "nic.bw_efficiency": ("-", "fitted", "pplx_garden_decode.csv, EP16-64"),
    "nic.post_us": ("us", "fitted", "pplx_garden_decode.csv, EP16-64"),
    "nic.latency_us": ("us", "fitted", "EFA: decode table; CX7: assumed 2 us (unconstrained)"),
    "nic.shard_min_bytes": ("B", "assumed", "1 MiB, TransferEngine's default shard_threshold"),
}


def describe(cluster: Cluster) -> list[tuple[str, object, str, str, str]]:
    """(name, value, unit, source kind, source text) for every parameter of `cluster`."""
    out = []
    for name, (unit, kind, text) in PARAM_SOURCES.items():
        obj, attr = (cluster.nic, name[4:]) if name.startswith("nic.") else (cluster, name)
        out.append((name, getattr(obj, attr), unit, kind, text))
    return out


# Fitted values: output of `python -m pplx.sim.calibrate` (see experiments/README.md).
# ConnectX-7's latency_us is assumed (2 us, an RDMA write through one switch): the CX7
# cells are bandwidth-bound and do not constrain it. bw_efficiency and post_us of CX7 sit
# at the edges of their ranges (1.0 and 0.05 us): the published CX7 numbers leave no room
# for any per-message cost or bandwidth loss in this model.
FITTED = {
    "kernel_fixed_us": 38.73,
    "cx7": {"bw_efficiency": 1.0, "post_us": 0.05, "latency_us": 2.0},
    "efa": {"bw_efficiency": 1.0, "post_us": 0.149, "latency_us": 68.11},
}


def _base(nic: NicSpec, name: str, **overrides: object) -> Cluster:
    c = Cluster(
        gpus_per_node=8,
        nvlink_GBps=396.0,
        hbm_GBps=3350.0,
        kernel_fixed_us=float(FITTED["kernel_fixed_us"]),
        proxy_one_way_us=2.1,
        nic=nic,
        name=name,
    )
    return c.replace(**overrides) if overrides else c


def cx7_cluster(**overrides: object) -> Cluster:
    """8 GPUs per node, one 400 Gb/s ConnectX-7 per GPU (RC, in order)."""
    f = FITTED["cx7"]
    nic = NicSpec(kind="cx7", ordered=True, nics_per_gpu=1, gbps_per_nic=400.0, **f)
    return _base(nic, "ConnectX-7", **overrides)


def efa_cluster(**overrides: object) -> Cluster:
    """AWS p5en: 8 H200 per node, two 200 Gb/s EFA NICs per GPU (SRD, unordered)."""
    f = FITTED["efa"]
    nic = NicSpec(kind="efa", ordered=False, nics_per_gpu=2, gbps_per_nic=200.0, **f)
    return _base(nic, "EFA", **overrides)


def preset(kind: str, **overrides: object) -> Cluster:
    """`cx7_cluster` or `efa_cluster` by NIC kind name."""
    if kind == "cx7":
        return cx7_cluster(**overrides)
    if kind == "efa":
        return efa_cluster(**overrides)
    raise ValueError(f"preset: kind expected 'cx7' or 'efa', got {kind!r}")
