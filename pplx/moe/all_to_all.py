"""`AllToAll`: MoE dispatch and combine across the ranks of a process group.

Shape legend: T tokens per rank (at most `max_num_tokens`), K experts per token, E experts,
R ranks, E_local = E / R, H hidden, S = `hidden_dim_scale` fp8 scales per token,
N = `max_recv_tokens` rows of the receive buffers.

The API follows pplx-garden's `P2PAllToAll` (and pplx-kernels' `AllToAll`): outputs are
preallocated by the caller (`alloc_dispatch_outputs`, `alloc_expert_y`,
`alloc_combine_output`), `do_send` / `do_recv` split each phase so that compute can run
in between, and `bound_m` carries a live token count on the device. The layout of the
outputs is the contract of `pplx.moe.reference`.

Backends:
- `"torch"`: `pplx.moe.reference`'s process-group form (gloo on CPU, NCCL on CUDA). The
  send half does the collectives, the receive half places rows / sums.
- `"triton"`: `pplx.moe.kernels.TritonAllToAll` (imported when first constructed).

Every argument is checked here, before a backend sees it; errors name the argument and
give the expected and the actual value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pplx.moe import layout as L
from pplx.moe import reference as R

FP8 = torch.float8_e4m3fn
IN_DTYPES = (torch.bfloat16, FP8)
# The torch backend moves bytes and sums in f32, so wider output types work there too.
OUT_DTYPES = {"torch": (torch.bfloat16, torch.float16, torch.float32), "triton": (torch.bfloat16,)}
BACKENDS = ("torch", "triton")


@dataclass
class DispatchOutputs:
    """Preallocated dispatch outputs of one rank.

    Attributes:
        expert_num_tokens: `[E_local]` torch.int32: rows received per local expert.
        expert_x: `[N, H]` in_dtype: received rows in the contract layout.
        expert_x_scale: `[N, S]` scale_dtype (fp8 input) or None (bf16 input).
    """

    expert_num_tokens: torch.Tensor
    expert_x: torch.Tensor
    expert_x_scale: torch.Tensor | None


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class AllToAll:
    """Dispatch tokens to experts and combine expert outputs, over a process group.

    Args:
        max_num_tokens: the most tokens a rank passes per call (T <= this).
        num_experts: E, global experts; the group's world size R must divide it.
        expert_padding: each local expert's block of `expert_x` is padded to a multiple of
            this many rows.
        hidden_dim: H.
        hidden_dim_scale: S, f32 scales per token for fp8 input (ceil(H / 128) for 128-wide
            blocks); None or 0 for bf16 input.
        in_dtype: dtype of dispatched tokens: torch.bfloat16 or torch.float8_e4m3fn.
        out_dtype: dtype of expert outputs and combined tokens (torch.bfloat16).
        scale_dtype: dtype of fp8 scales (torch.float32); ignored for bf16 input.
        num_experts_per_token: K.
        group: the process group (default: the default group; a single rank when
            torch.distributed is not initialised).
        device: where the tensors live (default: the current CUDA device for an NCCL group,
            else the CPU).
        backend: "torch" or "triton" (default: "triton" on CUDA, "torch" on the CPU).
        max_private_tokens: inter-node path: rows per (source, destination) pair written
            before the counts are known (default: twice the balanced share).
        ranks_per_node: ranks that share memory (a node); None or the world size: one node.
            Fewer: `pplx.moe.internode.InterNodeAllToAll` (TransferEngine between nodes;
            inside a node the backend's path: torch collectives or the Triton kernels).
        internode: `pplx.moe.internode.InterNodeOptions` (provider, nets_per_gpu, timeouts,
            host proxy) for the inter-node path; None for the defaults.

    Warning: dispatch and combine are collectives: every rank of the group calls them in
    the same order with the same `do_send` / `do_recv` flags. With the torch backend they
    synchronise with the device (counts are read on the host) and cannot be captured in a
    CUDA graph; index values are range-checked except while a CUDA graph is captured.

    Warning: a combine uses the routing (`indices`, `bound_m`) of the dispatch before it:
    the Triton backend keeps that dispatch's state, so pass the same routing to both.
    """

    def __init__(
        self,
        max_num_tokens: int,
        num_experts: int,
        expert_padding: int,
        hidden_dim: int,
        hidden_dim_scale: int | None,
        in_dtype: torch.dtype,
        out_dtype: torch.dtype,
        scale_dtype: torch.dtype | None,
        num_experts_per_token: int,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        max_private_tokens: int | None = None,
        ranks_per_node: int | None = None,
        internode: Any = None,
    ) -> None:
        self.max_num_tokens = _positive_int("max_num_tokens", max_num_tokens)
        self.num_experts = _positive_int("num_experts", num_experts)
        self.expert_padding = _positive_int("expert_padding", expert_padding)
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.num_experts_per_token = _positive_int("num_experts_per_token", num_experts_per_token)
        if in_dtype not in IN_DTYPES:
            raise TypeError(f"in_dtype must be one of {IN_DTYPES}, got {in_dtype}")
        self.in_dtype = in_dtype
        self.is_fp8 = in_dtype == FP8
        if self.is_fp8:
            self.hidden_dim_scale = _positive_int("hidden_dim_scale (fp8 input)", hidden_dim_scale)
            if scale_dtype != torch.float32:
                raise TypeError(f"scale_dtype must be torch.float32 for fp8, got {scale_dtype}")
            self.scale_dtype = scale_dtype
        else:
            if hidden_dim_scale not in (None, 0):
                raise ValueError(
                    f"hidden_dim_scale must be None or 0 for {in_dtype} input (no scales), "
                    f"got {hidden_dim_scale}"
                )
            self.hidden_dim_scale = 0
            self.scale_dtype = None

        self.group = group
        self.rank, self.world_size = R.group_rank_size(group)
        self.num_local_experts = L.num_local_experts(num_experts, self.world_size)

        if max_private_tokens is not None:
            _positive_int("max_private_tokens", max_private_tokens)
        self.max_private_tokens = max_private_tokens
        if ranks_per_node is not None:
            _positive_int("ranks_per_node", ranks_per_node)
            if self.world_size % ranks_per_node:
                raise ValueError(
                    f"ranks_per_node ({ranks_per_node}) must divide the world size "
                    f"({self.world_size})"
                )
        self.ranks_per_node = ranks_per_node

        if device is None:
            nccl = self.world_size > 1 and dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

        inter = ranks_per_node is not None and ranks_per_node < self.world_size
        if backend is None:
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if out_dtype not in OUT_DTYPES[backend]:
            raise TypeError(
                f"out_dtype must be one of {OUT_DTYPES[backend]} for backend {backend!r}, "
                f"got {out_dtype}"
            )
        self.out_dtype = out_dtype

        self.max_recv_tokens = L.max_recv_tokens(
            max_num_tokens,
            self.world_size,
            num_experts_per_token,
            self.num_local_experts,
            expert_padding,
        )
        self._pending_dispatch: R.PendingDispatch | None = None
        self._pending_combine: R.PendingCombine | None = None
        self._impl: Any = None
        self._destroyed = False
        # What every implementation is built from (the backends share one constructor).
        common = dict(
            max_num_tokens=max_num_tokens,
            num_experts=num_experts,
            expert_padding=expert_padding,
            hidden_dim=hidden_dim,
            hidden_dim_scale=self.hidden_dim_scale,
            in_dtype=in_dtype,
            out_dtype=out_dtype,
            scale_dtype=self.scale_dtype,
            num_experts_per_token=num_experts_per_token,
            group=group,
            device=self.device,
        )
        if inter:
            from pplx.moe.internode import InterNodeAllToAll

            self._impl = InterNodeAllToAll(
                **common,
                ranks_per_node=ranks_per_node,
                max_private_tokens=max_private_tokens,
                options=internode,
                intra_backend=backend,
            )
        elif backend == "triton":
            from pplx.moe.kernels import TritonAllToAll  # lazy: keeps Triton out of imports

            self._impl = TritonAllToAll(**common)

    # ------------------------------------------------------------------ allocation

    def alloc_dispatch_outputs(self) -> DispatchOutputs:
        """Allocate `expert_num_tokens [E_local]`, `expert_x [N, H]`, `expert_x_scale [N, S]`."""
        scale = None
        if self.is_fp8:
            scale = torch.empty(
                self.max_recv_tokens,
                self.hidden_dim_scale,
                dtype=self.scale_dtype,
                device=self.device,
            )
        return DispatchOutputs(
            expert_num_tokens=torch.empty(
                self.num_local_experts, dtype=torch.int32, device=self.device
            ),
            expert_x=torch.empty(
                self.max_recv_tokens, self.hidden_dim, dtype=self.in_dtype, device=self.device
            ),
            expert_x_scale=scale,
        )

    def alloc_expert_y(self) -> torch.Tensor:
        """Allocate `expert_y [N, H]` out_dtype (the expert outputs combine reads)."""
        return torch.empty(
            self.max_recv_tokens, self.hidden_dim, dtype=self.out_dtype, device=self.device
        )

    def alloc_combine_output(self, num_tokens: int | None = None) -> torch.Tensor:
        """Allocate `out_tokens [T, H]` out_dtype (T defaults to max_num_tokens)."""
        num_tokens = self.max_num_tokens if num_tokens is None else num_tokens
        return torch.empty(num_tokens, self.hidden_dim, dtype=self.out_dtype, device=self.device)

    # ------------------------------------------------------------------ validation

    def _check_tensor(
        self,
        name: str,
        t: Any,
        dtypes: tuple[torch.dtype, ...],
        shape: tuple[int | None, ...],
        *,
        min_rows: int | None = None,
    ) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            want = dtypes[0] if len(dtypes) == 1 else " or ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} must be on {self.device}, got {t.device}")
        want_shape = tuple("*" if s is None else s for s in shape)
        ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
        if not ok:
            raise ValueError(f"{name} must have shape {want_shape}, got {tuple(t.shape)}")
        if min_rows is not None and t.shape[0] < min_rows:
            raise ValueError(
                f"{name} must have at least {min_rows} rows (max_recv_tokens), got {t.shape[0]}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {t.stride()})")
        return t

    def _check_routing(
        self, indices: Any, weights: Any, bound_m: Any, num_tokens: int | None
    ) -> int:
        """Check indices/weights/bound_m; returns T."""
        k = self.num_experts_per_token
        self._check_tensor("indices", indices, (torch.int32, torch.int64), (num_tokens, k))
        num_tokens = indices.shape[0]
        if num_tokens > self.max_num_tokens:
            raise ValueError(
                f"indices has {num_tokens} tokens, more than max_num_tokens={self.max_num_tokens}"
            )
        self._check_tensor("weights", weights, (torch.float32,), (num_tokens, k))
        if bound_m is not None:
            self._check_tensor("bound_m", bound_m, (torch.int32,), (1,))
        if not _is_capturing(self.device):
            m = num_tokens
            if bound_m is not None:
                m = int(bound_m.item())
                if not 0 <= m <= num_tokens:
                    raise ValueError(f"bound_m must be in [0, {num_tokens}] (T), got {m}")
            live = indices[:m]
            if live.numel():
                lo, hi = int(live.min()), int(live.max())
                if lo < 0 or hi >= self.num_experts:
                    bad = ((live < 0) | (live >= self.num_experts)).nonzero()[0].tolist()
                    raise ValueError(
                        f"indices[{bad[0]}, {bad[1]}] = {int(live[bad[0], bad[1]])} is out of "
                        f"range: expected expert indices in [0, {self.num_experts})"
                    )
        return num_tokens

    @staticmethod
    def _check_flags(do_send: Any, do_recv: Any) -> None:
        for name, v in (("do_send", do_send), ("do_recv", do_recv)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        if not (do_send or do_recv):
            raise ValueError("at least one of do_send and do_recv must be True")

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this AllToAll was destroyed")

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
        """Send each token's rows to the ranks that own its experts.

        Args:
            out_expert_num_tokens: `[E_local]` torch.int32 (written): rows per local expert.
            out_expert_x: `[N, H]` in_dtype (written): rows in the contract layout.
            out_expert_x_scale: `[N, S]` float32 (written) for fp8, else None.
            dp_x: `[T, H]` in_dtype: this rank's tokens.
            dp_x_scale: `[T, S]` float32 block scales for fp8, else None.
            indices: `[T, K]` int32/int64: global expert index per token and slot.
            weights: `[T, K]` torch.float32: routing weights (used by combine).
            bound_m: `[1]` torch.int32 live token count or None (= T).
            do_send, do_recv: run the send half, the receive half, or both.
        """
        self._check_alive()
        self._check_flags(do_send, do_recv)
        h, s = self.hidden_dim, self.hidden_dim_scale
        n = self.max_recv_tokens
        self._check_tensor(
            "out_expert_num_tokens",
            out_expert_num_tokens,
            (torch.int32,),
            (self.num_local_experts,),
        )
        self._check_tensor("out_expert_x", out_expert_x, (self.in_dtype,), (None, h), min_rows=n)
        self._check_tensor("dp_x", dp_x, (self.in_dtype,), (None, h))
        num_tokens = self._check_routing(indices, weights, bound_m, dp_x.shape[0])
        if self.is_fp8:
            self._check_tensor(
                "out_expert_x_scale", out_expert_x_scale, (self.scale_dtype,), (None, s), min_rows=n
            )
            self._check_tensor("dp_x_scale", dp_x_scale, (self.scale_dtype,), (num_tokens, s))
        else:
            for name, v in (("out_expert_x_scale", out_expert_x_scale), ("dp_x_scale", dp_x_scale)):
                if v is not None:
                    raise ValueError(f"{name} must be None for {self.in_dtype} input")

        if self._impl is not None:
            self._impl.dispatch(
                out_expert_num_tokens=out_expert_num_tokens,
                out_expert_x=out_expert_x,
                out_expert_x_scale=out_expert_x_scale,
                dp_x=dp_x,
                dp_x_scale=dp_x_scale,
                indices=indices,
                weights=weights,
                bound_m=bound_m,
                do_send=do_send,
                do_recv=do_recv,
            )
            return
        if do_send:
            if self._pending_dispatch is not None:
                raise RuntimeError("dispatch(do_send=True) called twice without do_recv")
            self._pending_dispatch = R.pg_dispatch_send(
                dp_x,
                dp_x_scale,
                indices,
                self.num_experts,
                self.expert_padding,
                bound_m,
                self.group,
            )
        if do_recv:
            if self._pending_dispatch is None:
                raise RuntimeError("dispatch(do_recv=True) without a preceding do_send")
            pending, self._pending_dispatch = self._pending_dispatch, None
            R.pg_dispatch_recv(pending, out_expert_num_tokens, out_expert_x, out_expert_x_scale)

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
        """Return expert outputs to their tokens: `out[t] = sum_k weights[t, k] * y[row(t, k)]`.

        Args:
            out_tokens: `[T, H]` out_dtype (written; rows >= bound_m untouched).
            indices: `[T, K]` int32/int64: the routing dispatch used.
            weights: `[T, K]` torch.float32: combine weight per token and slot.
            expert_y: `[N, H]` out_dtype: expert outputs at the rows of `expert_x`.
            bound_m: `[1]` torch.int32 live token count or None (= T).
            do_send, do_recv: run the send half, the receive half, or both.
            accumulate: add the sum into `out_tokens` instead of overwriting it.
        """
        self._check_alive()
        self._check_flags(do_send, do_recv)
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
        h = self.hidden_dim
        self._check_tensor("out_tokens", out_tokens, (self.out_dtype,), (None, h))
        self._check_routing(indices, weights, bound_m, out_tokens.shape[0])
        self._check_tensor(
            "expert_y", expert_y, (self.out_dtype,), (None, h), min_rows=self.max_recv_tokens
        )

        if self._impl is not None:
            self._impl.combine(
                out_tokens=out_tokens,
                indices=indices,
                weights=weights,
                expert_y=expert_y,
                bound_m=bound_m,
                do_send=do_send,
                do_recv=do_recv,
                accumulate=accumulate,
            )
            return
        if do_send:
            if self._pending_combine is not None:
                raise RuntimeError("combine(do_send=True) called twice without do_recv")
            self._pending_combine = R.pg_combine_send(
                expert_y, indices, self.num_experts, self.expert_padding, bound_m, self.group
            )
        if do_recv:
            if self._pending_combine is None:
                raise RuntimeError("combine(do_recv=True) without a preceding do_send")
            pending, self._pending_combine = self._pending_combine, None
            R.pg_combine_recv(pending, out_tokens, weights, accumulate)

    # ------------------------------------------------------------------ lifetime

    def destroy(self) -> None:
        """Release the backend's buffers; the object cannot be used afterwards. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        self._pending_dispatch = self._pending_combine = None
        if self._impl is not None:
            impl, self._impl = self._impl, None
            impl.destroy()

    def __enter__(self) -> AllToAll:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (
            f"AllToAll(backend={self.backend!r}, rank={self.rank}/{self.world_size}, "
            f"T<={self.max_num_tokens}, E={self.num_experts}, K={self.num_experts_per_token}, "
            f"H={self.hidden_dim}, in={self.in_dtype}, out={self.out_dtype}, "
            f"padding={self.expert_padding}, rows={self.max_recv_tokens})"
        )
