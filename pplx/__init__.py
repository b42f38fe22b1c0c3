"""pplx: MoE expert-parallel communication over RDMA writes with immediate data.

Subpackages are imported on demand (nothing here loads libfabric or CUDA):

- `pplx.fabric`: TransferEngine, memory registration, immediate counters (libfabric).
- `pplx.moe`: dispatch/combine (reference in torch, Triton kernels, inter-node protocol).
- `pplx.sim`: latency/bandwidth model of NVLink, ConnectX-7 and EFA clusters.
- `pplx.bench`: benchmarks (`python -m pplx.bench ...`).
"""

__version__ = "0.1.0"
