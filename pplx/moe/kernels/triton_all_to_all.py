"""`TritonAllToAll`: the launcher and object over the dispatch/combine kernels (one node).

Shape legend: T tokens per rank (T_MAX = max_num_tokens), K top-k, E experts, E_L = E / R,
H hidden, S = hidden_dim_scale, R ranks.

`pplx.moe.AllToAll(backend="triton")` validates every argument and then calls this
object's `dispatch` / `combine` with the same argument names. Used directly, it does no
validation of its own.

Warning: dispatch and combine are collectives: every rank of the group must make the same
sequence of calls (the device-side epoch counters must agree). A split call
(`do_send=True, do_recv=False` then `do_send=False, do_recv=True`) equals one call; the
halves must alternate. Combine must follow a dispatch with the same routing and bound_m.

Buffer reuse: signals are monotone flags compared with a device-side epoch (completed
calls of that phase; v2: one slot per sender program holding `epoch + 1`); after a
receive has consumed a peer's data it stores `epoch + 1` into that peer's ack slot, and
the next send to that peer first waits for it.
So any number of dispatches (or combines) may follow each other; nothing is overwritten
before it was read (details: `sync_kernels.py`).

Warning: combine reuses the row map and the weights that travelled with dispatch (each
rank sums its own slots of a token before sending one row back); combine's `indices` and
`weights` must be the ones given to the matching dispatch, and so must `bound_m`.

Warning: no host synchronisation happens inside dispatch or combine on CUDA; every grid
depends only on the constructor's sizes and `bound_m` is read on the device, so a whole
step can be captured in a CUDA graph and replayed with changing `bound_m` values. On CUDA
a wait that never ends gives up after a bounded spin and sets an error flag that
`check()` reads (a host sync); on CPU every launch is followed by that check, which raises
`TimeoutError`.

CPU mode: ranks are processes of a gloo group, buffers live in /dev/shm, the kernels run
under Triton's interpreter: `TRITON_INTERPRET=1` must be set before this module (or any
`pplx.moe.kernels` kernel module) is imported.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from pplx.moe.kernels.buffers import BufferLayout, PeerBuffers
from pplx.moe.kernels.combine_kernels import _combine_kernel
from pplx.moe.kernels.dispatch_kernels import _dispatch_kernel
from pplx.moe.kernels.sync_kernels import spin_probe_kernel
from pplx.moe.kernels.tuning import Tuning

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_WORDS = [
    (8, torch.int64, tl.int64),
    (4, torch.int32, tl.int32),
    (2, torch.int16, tl.int16),
    (1, torch.uint8, tl.uint8),
]
# Polls of one flag before a wait gives up. CUDA: a poll of a local flag takes roughly
# 0.5-1 us, so 2^26 polls is 30-60 s: far above any legitimate wait (a peer's first-call
# JIT compile takes seconds), short enough that a lost peer ends a test. Override with
# Tuning.max_spin (PPLX_MOE_MAX_SPIN). Interpreter: one poll
# is Python work (0.1-2 ms measured on a loaded 2-core CI box), so the count is calibrated
# at construction from the time of _PROBE_POLLS polls.
_SPIN_CUDA = 1 << 26
_PROBE_POLLS = 32


def _cpu_polls_per_s() -> float:
    flag = torch.zeros(2, dtype=torch.int32)
    t0 = time.perf_counter()
    spin_probe_kernel[(1,)](flag, flag[1:], MAX_SPIN=_PROBE_POLLS)
    return _PROBE_POLLS / max(time.perf_counter() - t0, 1e-6)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def interpreter_active() -> bool:
    """True when the kernels of this package were decorated under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_dispatch_kernel, InterpretedFunction)


class TritonAllToAll:
    """Dispatch/combine among the ranks of one node with Triton kernels.

    Args:
        max_num_tokens: T_MAX, the most tokens any rank passes to one call.
        num_experts: E (R must divide it).
        expert_padding: each local expert's block of `expert_x` is padded to this multiple.
        hidden_dim: H.
        hidden_dim_scale: S, f32 scales per token (fp8 input only).
        in_dtype: dtype of `dp_x` (bf16, or torch.float8_e4m3fn with scales).
        out_dtype: dtype of `expert_y` and `out_tokens` (bf16).
        scale_dtype: torch.float32 (or None for bf16 input).
        num_experts_per_token: K.
        group: the process group (default: WORLD); one rank per GPU (or process on CPU).
        device: CUDA device of this rank, or CPU (interpreter).
        timeout_s: on CPU, how long a wait may last before `TimeoutError`.
        block_tokens: tokens per program in every kernel (default: tuned for CUDA; all
            T in one program on CPU).
        sync: signalling protocol, "v2" (default: a flag slot per sender program, vector
            acquire polls of only the slots a program needs, one vector ack) or "v1" (one
            counter per source, RMW polls); default `tuning.sync` or "v2"
            (`sync_kernels.py` describes both).
        fused: one launch per phase (send programs, then receive programs in the same
            grid) instead of a send launch and a receive launch when a call does both
            halves, for both phases (default: where measured faster: dispatch at decode,
            max_num_tokens <= 512; combine at decode and world size <= 2; or
            `tuning.fused`; `dispatch_kernels.py`, `_dispatch_kernel`, states what it
            relies on).
        tuning: kernel knobs (`pplx.moe.kernels.tuning.Tuning`; default
            `Tuning.from_env()`, the `PPLX_MOE_*` variables, which the benchmark's
            `--variant` sets); explicit `sync` / `fused` arguments win over it.
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
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        timeout_s: float = 60.0,
        block_tokens: int | None = None,
        sync: str | None = None,
        fused: bool | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        self.tuning = Tuning.from_env() if tuning is None else tuning
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cpu" and not interpreter_active():
            raise RuntimeError(
                "TritonAllToAll on CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before pplx.moe.kernels is imported (in each rank's process)"
            )
        self._configure(
            world_size=self.world_size,
            max_num_tokens=max_num_tokens,
            num_experts=num_experts,
            expert_padding=expert_padding,
            hidden_dim=hidden_dim,
            hidden_dim_scale=hidden_dim_scale,
            in_dtype=in_dtype,
            out_dtype=out_dtype,
            num_experts_per_token=num_experts_per_token,
            timeout_s=timeout_s,
            block_tokens=block_tokens,
            sync=sync,
            fused=fused,
        )
        self.buffers = PeerBuffers(self.layout.nbytes, group, self.device)
        self._alloc_private(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group)

    def _configure(
        self,
        *,
        world_size: int,
        max_num_tokens: int,
        num_experts: int,
        expert_padding: int,
        hidden_dim: int,
        hidden_dim_scale: int,
        in_dtype: torch.dtype,
        out_dtype: torch.dtype,
        num_experts_per_token: int,
        timeout_s: float,
        block_tokens: int | None,
        sync: str | None = None,
        fused: bool | None = None,
    ) -> None:
        """Sizes, buffer layout and tiles (no allocation; self.device must be set)."""
        self.world_size = world_size
        # One launch per phase or two, measured on 4 H100 with the token-slot layout, same
        # runs (2026-11-28, PERFORMANCE.md): dispatch fused faster at decode (EP4 32.6 vs
        # 33.4 us, 33.8 vs 34.4; EP2 24.1 vs 26.7); combine fused faster at EP2 (26.8 vs
        # 29.3) and, once its accesses were vectorised (session 4), at EP4 too (35.7 vs
        # 39.9 us, 35.7 vs 38.5; it was 45.7 vs 44.6 before).
        tun = self.tuning
        decode = int(max_num_tokens) <= 512
        if fused is None:
            fused = tun.fused
        self.fused_disp = decode if fused is None else bool(fused)
        self.fused_comb = decode if fused is None else bool(fused)
        # Sources acked by a program of its own once every receive program has counted
        # itself done (1), or by the last receive program to count (0). 4 H100, same runs
        # (2026-11-28 session 5, two passes): EP4 decode dispatch 22.9 / 23.4 us vs 25.3 /
        # 25.1, combine 31.1 / 30.9 vs 33.3 / 33.2; EP2 dispatch 20.8 / 20.5 vs 21.9 / 21.6;
        # prefill EP4 dispatch 627 / 629 vs 636 / 631. The last program's ack had taken
        # ~2.5 us before its own fan-out, and that program ended the kernel.
        self.acker = int(bool(tun.acker)) if tun.acker is not None else 1
        # The acks a receive owes its sources are sent by the first program of this rank's
        # next launch (1; the acker program then only moves the epoch on), or by the acker
        # program at the end of the receive (0). Needs the acker program (Tuning checks).
        # Off until timed on H100: on 4 H200 (session 5) EP4 dispatch 20.6 / 20.9 us vs
        # 22.0 / 21.7, combine 28.1 / 28.3 vs 28.8 / 29.2; EP2 and prefill unchanged.
        self.ack_next = int(bool(tun.ack_next)) if tun.ack_next is not None else 0
        # Clock stamps need PTX (`%globaltimer`): CUDA only.
        self.prof_on = tun.prof and self.device.type == "cuda"
        sync = sync if sync is not None else (tun.sync or "v2")
        if sync not in ("v1", "v2"):
            raise ValueError(f"sync must be 'v1' or 'v2', got {sync!r}")
        self.sync = sync
        # CUDA polls with `ld.acquire.sys` (inline PTX); the interpreter has no PTX.
        self.asm = self.device.type == "cuda"
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the world size "
                f"({self.world_size})"
            )
        if out_dtype not in _TL_DTYPE:
            raise ValueError(f"out_dtype must be bf16/f16/f32, got {out_dtype}")
        self.max_num_tokens = int(max_num_tokens)
        self.num_experts = int(num_experts)
        self.expert_padding = int(expert_padding)
        self.hidden_dim = int(hidden_dim)
        self.hidden_dim_scale = int(hidden_dim_scale)
        self.in_dtype = in_dtype
        self.out_dtype = out_dtype
        self.has_scale = in_dtype.itemsize == 1
        self.topk = int(num_experts_per_token)
        self.num_local_experts = self.num_experts // self.world_size
        self.timeout_s = float(timeout_s)
        # Rows of expert_x / expert_y to allocate: every slot of the group may land here.
        self.max_recv_tokens = (
            world_size * self.max_num_tokens * self.topk
            + self.num_local_experts * (self.expert_padding - 1)
        )
        if self.device.type == "cpu" and interpreter_active():
            self.max_spin = max(_PROBE_POLLS, int(self.timeout_s * _cpu_polls_per_s()))
        else:
            self.max_spin = tun.max_spin or _SPIN_CUDA

        R, T, K = self.world_size, self.max_num_tokens, self.topk
        in_bytes = in_dtype.itemsize
        row_bytes = self.hidden_dim * in_bytes
        self.word_bytes, self.word_torch, self.word_tl = next(
            w for w in _WORDS if row_bytes % w[0] == 0
        )
        self.words = row_bytes // self.word_bytes
        # Row stride of the combine area in out_dtype elements (rows start 16-byte aligned).
        self.comb_stride = (
            (self.hidden_dim * out_dtype.itemsize + 15) // 16 * 16 // out_dtype.itemsize
        )

        # Tiles. CUDA: decode (T=128) spreads over ~100 programs per kernel and prefill
        # (T=4096) over ~1000. Interpreter: every program costs Python time, so by default
        # one tile covers all T (tests pass block_tokens to exercise several tiles).
        tuned = block_tokens is None  # the PPLX_MOE_TILES hook applies to default tiles only
        if block_tokens is None and self.device.type == "cpu":
            block_tokens = _pow2(T)
        # Elements per row tile: decode wants whole rows in one step (one load latency per
        # row); prefill has enough programs in flight to hide latency with smaller tiles.
        cap = 4096 if T <= 512 else 2048
        if block_tokens is not None:
            bt = rb = cb = tb = _clamp(_pow2(block_tokens), 1, 64)
        elif T <= 512 and world_size >= 4:
            # Decode at EP4 (T=128): 8 tokens per send program pair (128 at EP4), 4 per
            # recv program (128), 1 per combine program (512 send, 128 recv). 4 H100, same
            # run (2026-11-28, token-slot layout): dispatch 28.7 us vs 33.7 with 4 / 2.
            bt, rb, cb, tb = 8, 4, 1, 1
        elif T <= 512:
            # Decode at EP2: 4 tokens per send program pair, 2 per recv program.
            bt, rb, cb, tb = 4, 2, 1, 1
        else:
            # Prefill (T=4096): 32/16/16/16 measured faster on 4 H100 than 8/4/4/4
            # (dispatch 710 vs 874 us, combine 785 vs 967 us, 2026-11-27).
            bt, rb, cb, tb = 32, 16, 16, 16
        if tun.tiles and tuned:
            bt, rb, cb, tb = (_pow2(v) for v in tun.tiles[:4])
            cap = tun.tiles[4] if len(tun.tiles) > 4 else cap
        rb = min(rb, bt)  # a receive program's slots lie in one send chunk (powers of 2)
        self.bt = bt  # tokens per send program
        self.nc = triton.cdiv(T, self.bt)
        self.rb = rb  # token slots per recv program (per source)
        self.rc = triton.cdiv(T, self.rb)
        self.cb = cb  # token slots per combine-send program
        self.cc = triton.cdiv(T, self.cb)
        self.tb = tb  # tokens per combine-recv program
        self.nb = triton.cdiv(T, self.tb)
        self.k_pad = _pow2(K)
        self.e_local_pad = _pow2(self.num_local_experts)
        if self.num_local_experts >= 32768 or self.bt * self.k_pad > 65536:
            # Records pack (local expert, q) into one int32 as e * 65536 + q.
            raise ValueError(
                f"num_experts / world size must be < 32768 (got {self.num_local_experts}) "
                f"and block_tokens * top-k <= 65536"
            )
        self.r_pad = _pow2(R)
        self.s_pad = _pow2(max(1, self.hidden_dim_scale))
        wpad = _pow2(self.words)
        # Dispatch rows programs per (chunk, destination), each with `rows_chunk` words of
        # the row (whole 16-byte vectors; the last part may be shorter).
        vec = max(1, 16 // self.word_bytes)
        self.rows_split = 1
        if tun.rows_split:
            self.rows_split = _clamp(tun.rows_split, 1, triton.cdiv(self.words, vec))
        self.rows_chunk = self.words
        if self.rows_split > 1:
            self.rows_chunk = triton.cdiv(triton.cdiv(self.words, self.rows_split), vec) * vec
            self.rows_split = triton.cdiv(self.words, self.rows_chunk)
        self.block_w_send = _clamp(cap // self.bt, 16, _pow2(self.rows_chunk))
        self.block_w_recv = _clamp(cap // self.rb, 16, wpad)
        hpad = _pow2(self.hidden_dim)
        self.block_h_send = _clamp(cap // self.cb, 32, hpad)
        self.block_h_recv = _clamp(2 * cap // self.tb, 32, hpad)
        if tuned and T <= 512 and self.device.type == "cuda":
            # Decode combine: 2048-column tiles (both halves: 107 / 70 registers instead of
            # 196 / 255 with spills; 4 programs per SM; 4 H100 EP4 combine 44.1 vs 45.0 us
            # and 43.6 vs 44.6, same runs, 2026-11-28).
            self.block_h_send = self.block_h_recv = min(2048, hpad)
        if tun.comb_block_h:
            self.block_h_send = _pow2(tun.comb_block_h)
        if tun.comb_block_h_recv:
            self.block_h_recv = _pow2(tun.comb_block_h_recv)
        # Combine: programs per token block along the hidden dim (each takes HCHUNK
        # columns, a multiple of 64).
        self.hs = 1
        if tun.comb_split_h:
            self.hs = _clamp(tun.comb_split_h, 1, triton.cdiv(self.hidden_dim, 64))
        self.hchunk = triton.cdiv(triton.cdiv(self.hidden_dim, self.hs), 64) * 64
        # Combine receive: its own split along H (a receive program waits for the send
        # programs of its token block, so the send split must be 1 or the same).
        self.hsr = self.hs
        # Decode from EP4 on (CUDA): two receive programs per token, each with its half of
        # the row (3584 columns at H=7168) in one tile (4 H100, fused combine, same run,
        # 2026-11-28 session 4: 33.1 vs 35.7 us).
        ep4_decode = tuned and T <= 512 and world_size >= 4 and self.device.type == "cuda"
        if ep4_decode and self.hs == 1:
            self.hsr = 2
        if tun.comb_recv_split_h:
            self.hsr = _clamp(tun.comb_recv_split_h, 1, triton.cdiv(self.hidden_dim, 64))
            if self.hs not in (1, self.hsr):
                raise ValueError(
                    f"comb_recv_split_h ({self.hsr}) needs comb_split_h 1 or the same "
                    f"(got {self.hs})"
                )
        self.rchunk = triton.cdiv(triton.cdiv(self.hidden_dim, self.hsr), 64) * 64
        if ep4_decode and not tun.comb_block_h_recv:
            self.block_h_recv = max(self.block_h_recv, min(_pow2(self.rchunk), 4096))
        # Dispatch send: a chunk's rows (part) in one tile are loaded before the ack wait.
        self.one_tile = self.rows_chunk <= self.block_w_send
        # Dispatch / combine receive: a row (its part) in one tile, so a program's reads of
        # the receive buffer all come before its stores and it acks before storing.
        self.one_tile_recv = self.words <= self.block_w_recv
        self.comb_one_tile = self.rchunk <= self.block_h_recv
        # Record pass: FB slots (t, k) per step (a [FB, E_L] one-hot); the layout program
        # sums the [R * NC, E_L] chunk counts LB rows per step (one step at decode).
        self.fb = _clamp(8192 // self.e_local_pad, 1, self.bt * self.k_pad)
        self.lb = _clamp(8192 // self.e_local_pad, 1, _pow2(R * self.nc))
        self.layout = BufferLayout.build(
            R,
            T,
            K,
            self.num_local_experts,
            self.hidden_dim,
            in_bytes,
            self.hidden_dim_scale,
            self.has_scale,
            out_dtype.itemsize,
            disp_signals=self.nc,  # one flag per rows program
            disp_chunks=self.nc,
            comb_signals=self.cc * self.hs,
        )
        self.row_words = self.layout.row_bytes // self.word_bytes
        # Dispatch: 8 warps a program; 4 at decode (4 H100 EP4, fused, same runs,
        # 2026-11-28: 32.5 vs 33.8 us, 33.0 vs 33.6).
        self.num_warps = 8 if self.device.type == "cuda" else 4
        if self.device.type == "cuda" and T <= 512:
            self.num_warps = 4
        self.num_warps = tun.num_warps or self.num_warps
        # Combine: 4 warps a program at decode. 4 H100, EP4, same runs (2026-11-28, the
        # layout before the token-slot one): combine 43.9 us with 4 warps vs 47.9 with 8;
        # combine send 28.3 vs 33.1; EP2 unchanged (29.9 vs 29.6).
        self.num_warps_comb = 8 if self.device.type == "cuda" and T > 512 else 4
        self.num_warps_comb = tun.comb_warps or self.num_warps_comb
        # A combine receive launch of its own (not fused) may take other warps.
        self.num_warps_comb_recv = tun.comb_recv_warps or self.num_warps_comb

    def _alloc_private(self, dev: torch.device) -> None:
        """This rank's private device state (never touched by peers)."""
        R, T, K = self.world_size, self.max_num_tokens, self.topk
        i32 = dict(dtype=torch.int32, device=dev)
        # [0] dispatch epoch (receive side), [1] combine epoch (receive side), [2]/[3] their
        # done counters (only growing with the acker program), [4] error flag, [5]/[6]
        # dispatch send epoch and done counter, [7]/[8] combine send epoch and done counter,
        # [9] dispatch layout epoch.
        self.state = torch.zeros(16, **i32)
        # Profiling (PPLX_MOE_PROF=1, CUDA): `[4, programs, 8]` int64 GPU clock stamps per
        # program of the launches dispatch send (or fused dispatch), dispatch recv,
        # combine send (or fused combine), combine recv; see `profile()`.
        n_disp = (1 + self.rows_split) * self.nc * R + 1 + R * self.rc + self.acker
        n_prog = max(n_disp, R * self.cc * self.hs + self.nb * self.hsr + self.acker)
        self.prof = torch.zeros(4, n_prog if self.prof_on else 1, 8, dtype=torch.int64, device=dev)
        self.send_pos = torch.full((T, R), -1, **i32)
        # Dispatch layout: row of expert_x where each (source, chunk)'s slots of local
        # expert e start (written by the layout program, read by the receive programs).
        self.starts = torch.zeros(R * self.nc, self.num_local_experts, **i32)
        self.comb_row = torch.full((R, T, K), -1, **i32)
        self.comb_w = torch.zeros(R, T, K, dtype=torch.float32, device=dev)
        self.full_m = torch.full((1,), T, **i32)
        self._dummy_scale = torch.zeros(1, 1, **i32)

    # -- helpers ---------------------------------------------------------------------------

    def _offs(self) -> dict[str, int]:
        lay = self.layout
        return dict(
            off_disp_flag=lay.disp_flag,
            off_disp_ack=lay.disp_ack,
            off_counts=lay.counts,
            off_tok_eq=lay.tok_eq,
            off_tok_w=lay.tok_w,
            off_rows=lay.rows,
            off_scales=lay.scales,
            off_comb_ack=lay.comb_ack,
        )

    def _bound(self, bound_m: torch.Tensor | None) -> torch.Tensor:
        if bound_m is None:
            return self.full_m
        return bound_m.reshape(-1)[:1].to(torch.int32)

    def _words(self, t: torch.Tensor, name: str, output: bool = False) -> torch.Tensor:
        """`[N, H]` rows viewed as `[N, W]` words of `word_bytes` (kernels move words)."""
        wb = self.word_bytes
        ok = t.stride(-1) == 1 and t.data_ptr() % wb == 0
        ok = ok and (t.stride(0) * t.element_size()) % wb == 0
        if not ok:
            if output:
                raise ValueError(
                    f"{name} must have unit stride along H and {wb}-byte aligned rows "
                    f"(got strides {tuple(t.stride())}, address {t.data_ptr():#x})"
                )
            t = t.contiguous()
            if t.data_ptr() % wb:
                t = t.clone()
        return t.view(torch.uint8).view(self.word_torch)

    def _launch(self, kernel, grid: tuple, *args, **kwargs) -> None:
        kernel[grid](*args, **kwargs)

    def check(self) -> None:
        """Raise TimeoutError if a wait gave up (reads a device flag: a host sync on CUDA)."""
        if int(self.state[4].item()):
            raise TimeoutError(
                f"TritonAllToAll rank {self.rank}: a peer did not signal within the wait bound "
                f"({self.timeout_s:.0f} s on CPU); a rank missed a call or died"
            )

    def profile(self) -> dict[str, torch.Tensor]:
        """Clock stamps of the last launches (PPLX_MOE_PROF=1 on CUDA; a host sync).

        Returns `{part: [programs, 8] int64}` (parts "dispatch-records", "dispatch-rows",
        "dispatch-layout", "dispatch-recv", "combine-send", "combine-recv", and with the
        acker program "dispatch-acker" / "combine-acker"; in fused mode both halves of a
        phase come from one launch): ns of this GPU's clock (GPUs' clocks
        are not synchronised), 0 where no stamp was written; stamp i is
        `stamp(prof_ptr, i)` in dispatch_kernels.py / combine_kernels.py.
        """
        if not self.prof_on:
            raise RuntimeError("profiling is off: set PPLX_MOE_PROF=1 before construction (CUDA)")
        p = self.prof.cpu()
        R = self.world_size
        nrec = self.nc * R  # records programs, then rows programs
        ds, dr = (1 + self.rows_split) * nrec, 1 + R * self.rc
        cs, cr = R * self.cc * self.hs, self.nb * self.hsr + self.acker
        # A fused launch wrote both halves into one slot, send programs first.
        dr0 = (0, ds) if self.fused_disp else (1, 0)
        cr0 = (2, cs) if self.fused_comb else (3, 0)
        recv = p[dr0[0], dr0[1] : dr0[1] + dr + self.acker]  # the layout program first
        crecv = p[cr0[0], cr0[1] : cr0[1] + cr]
        parts = {
            "dispatch-records": p[0, :nrec],
            "dispatch-rows": p[0, nrec:ds],
            "dispatch-layout": recv[:1],
            "dispatch-recv": recv[1:dr],
            "combine-send": p[2, :cs],
            "combine-recv": crecv[: cr - self.acker],
        }
        if self.acker:
            parts["dispatch-acker"] = recv[dr:]
            parts["combine-acker"] = crecv[cr - 1 :]
        return parts

    def _after_launch(self) -> None:
        if self.device.type == "cpu":
            self.check()

    # -- dispatch --------------------------------------------------------------------------

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
        """Send tokens to the ranks of their experts and place them in `out_expert_x`.

        Args:
            out_expert_num_tokens: `[E_L]` torch.int32 (out): slots per local expert.
            out_expert_x: `[max_recv_tokens, H]` in_dtype (out): rows in contract order.
            out_expert_x_scale: `[max_recv_tokens, S]` torch.float32 (out, fp8) or None.
            dp_x: `[T, H]` in_dtype: this rank's tokens.
            dp_x_scale: `[T, S]` torch.float32 (fp8) or None.
            indices: `[T, K]` int32/int64: global expert per token and slot.
            weights: `[T, K]` torch.float32: combine weight per token and slot (travels
                with the tokens; combine uses these).
            bound_m: `[1]` torch.int32 live token count, or None (all T).
        """
        R, K = self.world_size, self.topk
        bm = self._bound(bound_m)
        num_tokens = dp_x.shape[0]
        dummy = self._dummy_scale
        send_args: tuple = (dummy, 0, dummy, 0, dummy, 0, dummy, 0, bm, 0, dummy)
        recv_args: tuple = (dummy, dummy, 0, dummy, 0, dummy, dummy, dummy, 1)
        if do_send:
            idx = indices if indices.stride(-1) == 1 else indices.contiguous()
            w = weights if weights.stride(-1) == 1 else weights.contiguous()
            x = self._words(dp_x, "dp_x")
            if self.has_scale:
                xs = dp_x_scale.contiguous().view(torch.int32)
                stride_st = xs.stride(0)
            else:
                xs, stride_st = dummy, 0
            send_args = (
                x,
                x.stride(0),
                xs,
                stride_st,
                idx,
                idx.stride(0),
                w,
                w.stride(0),
                bm,
                num_tokens,
                self.send_pos,
            )
        if do_recv:
            ex = self._words(out_expert_x, "out_expert_x", output=True)
            if self.has_scale:
                exs = out_expert_x_scale.view(torch.int32)
                stride_sr = exs.stride(0)
            else:
                exs, stride_sr = dummy, 0
            recv_args = (
                out_expert_num_tokens,
                ex,
                ex.stride(0),
                exs,
                stride_sr,
                self.comb_row,
                self.comb_w,
                self.starts,
                self.expert_padding,
            )
        # records programs, rows programs, then the layout program, the receive programs and
        # the acker program (with acker)
        n_send, n_recv = (1 + self.rows_split) * self.nc * R, 1 + R * self.rc + self.acker
        if self.fused_disp and do_send and do_recv:
            # One launch: send programs, then receive programs (dispatch_kernels.py).
            halves = [(True, True, n_send + n_recv, 0)]
        else:
            halves = [(True, False, n_send, 0)] if do_send else []
            halves += [(False, True, n_recv, 1)] if do_recv else []
        for snd, rcv, grid, slot in halves:
            self._launch(
                _dispatch_kernel,
                (grid + self.ack_next,),
                *send_args,
                *recv_args,
                self.prof[slot],
                self.buffers.ptrs,
                self.state,
                self.rank,
                **self._offs(),
                T_MAX=self.max_num_tokens,
                W=self.words,
                WCH=self.rows_chunk,
                ROW_WORDS=self.row_words,
                S=self.hidden_dim_scale,
                HAS_SCALE=self.has_scale,
                K=K,
                K_PAD=self.k_pad,
                E_LOCAL=self.num_local_experts,
                E_LOCAL_PAD=self.e_local_pad,
                R=R,
                R_PAD=self.r_pad,
                BT=self.bt,
                NC=self.nc,
                RS=self.rows_split,
                FB=self.fb,
                LB=self.lb,
                RB=self.rb,
                RC=self.rc,
                BLOCK_W_SEND=self.block_w_send,
                BLOCK_W_RECV=self.block_w_recv,
                S_PAD=self.s_pad,
                WORD=self.word_tl,
                MAX_SPIN=self.max_spin,
                SYNC2=self.sync == "v2",
                ASM=self.asm,
                PROF=self.prof_on,
                ONE_TILE=self.one_tile,
                ONE_TILE_RECV=self.one_tile_recv,
                ACKER=self.acker,
                ACK_NEXT=self.ack_next,
                DO_SEND=snd,
                DO_RECV=rcv,
                num_warps=self.num_warps,
            )
            self._after_launch()

    # -- combine ---------------------------------------------------------------------------

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
        """Send expert outputs back and reduce them into `out_tokens` rows t < bound_m.

        Args:
            out_tokens: `[T, H]` out_dtype (in/out): `out[t] = sum_k w[t,k] y[row(t,k)]`
                (plus the old value with accumulate=True); rows >= bound_m untouched.
            indices: `[T, K]`: the routing given to dispatch (its row map is reused).
            weights: `[T, K]` torch.float32: must equal dispatch's weights (see module).
            expert_y: `[max_recv_tokens, H]` out_dtype: rows at expert_x's positions.
            bound_m: `[1]` torch.int32 live token count (same as dispatch's), or None.
        """
        R = self.world_size
        lay = self.layout
        dummy = self._dummy_scale
        send_args: tuple = (dummy, 0, dummy, dummy)
        recv_args: tuple = (dummy, 0, dummy, self.full_m, 0)
        if do_send:
            y = expert_y if expert_y.stride(-1) == 1 else expert_y.contiguous()
            send_args = (y, y.stride(0), self.comb_row, self.comb_w)
        if do_recv:
            if out_tokens.stride(-1) != 1:
                raise ValueError("out_tokens must have unit stride along H")
            recv_args = (
                out_tokens,
                out_tokens.stride(0),
                self.send_pos,
                self._bound(bound_m),
                out_tokens.shape[0],
            )
        n_send, n_recv = R * self.cc * self.hs, self.nb * self.hsr + self.acker
        if self.fused_comb and do_send and do_recv:
            halves = [(True, True, n_send + n_recv, 2)]
        else:
            halves = [(True, False, n_send, 2)] if do_send else []
            halves += [(False, True, n_recv, 3)] if do_recv else []
        for snd, rcv, grid, slot in halves:
            self._launch(
                _combine_kernel,
                (grid + self.ack_next,),
                *send_args,
                *recv_args,
                self.prof[slot],
                self.buffers.ptrs,
                self.state,
                self.rank,
                lay.comb_ack,
                lay.comb_flag,
                lay.comb_rows,
                lay.disp_ack,
                self.max_num_tokens,
                self.hidden_dim,
                self.comb_stride,
                K=self.topk,
                K_PAD=self.k_pad,
                R=R,
                R_PAD=self.r_pad,
                CB=self.cb,
                CC=self.cc,
                TB=self.tb,
                NB=self.nb,
                HS=self.hs,
                HCHUNK=self.hchunk,
                HSR=self.hsr,
                RCHUNK=self.rchunk,
                ONE_TILE=self.comb_one_tile,
                BLOCK_H_SEND=self.block_h_send,
                BLOCK_H_RECV=self.block_h_recv,
                ACCUMULATE=bool(accumulate),
                OUT_DTYPE=_TL_DTYPE[self.out_dtype],
                MAX_SPIN=self.max_spin,
                SYNC2=self.sync == "v2",
                ASM=self.asm,
                PROF=self.prof_on,
                ACKER=self.acker,
                ACK_NEXT=self.ack_next,
                DO_SEND=snd,
                DO_RECV=rcv,
                num_warps=self.num_warps_comb if snd else self.num_warps_comb_recv,
            )
            self._after_launch()

    def destroy(self) -> None:
        """Release the buffers after every rank is done (a group barrier; syncs on CUDA)."""
        if self.buffers is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(self.group)
        self.buffers.close()
        self.buffers = None  # type: ignore[assignment]
