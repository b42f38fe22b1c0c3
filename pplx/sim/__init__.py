"""pplx.sim: a calibrated latency model of MoE dispatch/combine and point-to-point writes.

- `cluster`: dataclasses for the hardware (`Cluster`, `NicSpec`), presets `cx7_cluster()`
  and `efa_cluster()`, and the source of every parameter (`describe`).
- `routing`: routing as counts (`Routing`), uniform / Zipf / trace-like generators.
- `model`: `dispatch_latency`, `combine_latency` -> `Breakdown`; `p2p_write_us`,
  `p2p_stream_GBps`.
- `calibrate`: the fit on pplx-garden's published decode table (`python -m pplx.sim.calibrate`).
"""

from pplx.sim.cluster import Cluster, NicSpec, cx7_cluster, describe, efa_cluster, preset
from pplx.sim.model import (
    DECODE,
    PREFILL,
    Breakdown,
    Workload,
    combine_latency,
    dispatch_latency,
    p2p_stream_GBps,
    p2p_write_us,
    phase_latency,
)
from pplx.sim.routing import Routing, make_routing, routing_from_indices, sample_indices

__all__ = [
    "DECODE",
    "PREFILL",
    "Breakdown",
    "Cluster",
    "NicSpec",
    "Routing",
    "Workload",
    "combine_latency",
    "cx7_cluster",
    "describe",
    "dispatch_latency",
    "efa_cluster",
    "make_routing",
    "p2p_stream_GBps",
    "p2p_write_us",
    "phase_latency",
    "preset",
    "routing_from_indices",
    "sample_indices",
]
