"""MoE dispatch/combine across expert-parallel ranks.

- `pplx.moe.reference`: the contract in plain torch (single-process and process-group).
- `pplx.moe.layout`: placement, buffer sizes, offsets and the row map.
- `pplx.moe.AllToAll`: the public object (`backend="torch"` or `"triton"`); with
  `ranks_per_node` < world size it runs `pplx.moe.internode` (TransferEngine between nodes).
- `pplx.moe.baseline`: dispatch/combine written by hand with `all_to_all_single`.
- `pplx.moe.testing`: random inputs, poisoning, comparisons, a multi-process runner.

Importing this package loads neither Triton nor CUDA.
"""

from pplx.moe.all_to_all import AllToAll, DispatchOutputs
from pplx.moe.layout import max_recv_tokens, num_local_experts
from pplx.moe.reference import DispatchResult, reference_combine, reference_dispatch

__all__ = [
    "AllToAll",
    "DispatchOutputs",
    "DispatchResult",
    "max_recv_tokens",
    "num_local_experts",
    "reference_combine",
    "reference_dispatch",
]
