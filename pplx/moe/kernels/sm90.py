"""Compile the Triton all-to-all kernels for sm_90 (H100) without a GPU, and report what
each compiled launch uses per thread and per program (registers, spills, shared memory).

    python -m pplx.moe.kernels.sm90                      # the benchmark's decode shapes
    python -m pplx.moe.kernels.sm90 --tokens 4096        # prefill
    PPLX_MOE_TILES=2,2,1,1 python -m pplx.moe.kernels.sm90   # a tuning variant

The kernels are launched through `TritonAllToAll._launch`, here replaced by a recorder
that keeps each launch's arguments; each launch is then compiled with `triton.compile` for
`GPUTarget("cuda", 90, 32)` (Triton's bundled ptxas makes the cubin) and its resource
usage read with the bundled `cuobjdump`. Registers bound how many programs share an SM
(65536 registers per SM on H100, at most 2048 threads and 32 programs): a grid larger than
that runs in waves. The inline-PTX polls and clock stamps are compiled as on a GPU.

Run without TRITON_INTERPRET (decorated kernels are interpreted functions when that
variable was set at import); `tests/moe/test_triton_compile.py` runs this in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace

import torch

_TY = {
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.uint8: "u8",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
}
_REGS_PER_SM = 65536
_THREADS_PER_SM = 2048


@dataclass
class Compiled:
    """One compiled launch: kernel name, grid, warps and resource usage (-1: unknown)."""

    name: str
    grid: int
    num_warps: int
    regs: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    vector_ldst: int = -1  # global load/store instructions of 8+ bytes (.v2/.v4/.b64)
    narrow_ldst: int = -1  # of 1-4 bytes: where rows move, a lost alignment hint

    def programs_per_sm(self) -> int:
        threads = 32 * self.num_warps
        by_regs = _REGS_PER_SM // max(1, self.regs * threads) if self.regs > 0 else 32
        return max(0, min(32, _THREADS_PER_SM // threads, by_regs))


def record_launches(
    in_dtype, world_size, tokens, hidden, experts, topk, sync="v2", fused=False, prof=False
) -> list[tuple]:
    """(kernel, grid, args, kwargs) of one dispatch + combine on rank 1, without running."""
    from pplx.moe import layout as L
    from pplx.moe.kernels.triton_all_to_all import TritonAllToAll
    from pplx.moe.kernels.tuning import Tuning

    at = TritonAllToAll.__new__(TritonAllToAll)
    # Configured as for CUDA (tiles, warps); the buffers below live on the CPU.
    at.device, at.rank, at.group = torch.device("cuda", 0), 1, None
    at.tuning = Tuning.from_env()  # PPLX_MOE_* variants, as the constructor does
    scales = L.hidden_dim_scale(hidden) if in_dtype.itemsize == 1 else 0
    at._configure(
        world_size=world_size,
        max_num_tokens=tokens,
        num_experts=experts,
        expert_padding=16,
        hidden_dim=hidden,
        hidden_dim_scale=scales,
        in_dtype=in_dtype,
        out_dtype=torch.bfloat16,
        num_experts_per_token=topk,
        timeout_s=1.0,
        block_tokens=None,
        sync=sync,
        fused=fused,
    )
    at.prof_on = prof  # clock stamps (CUDA only) if asked
    at._alloc_private(torch.device("cpu"))
    at.buffers = SimpleNamespace(ptrs=torch.zeros(world_size, dtype=torch.int64))
    launches: list[tuple] = []
    at._launch = lambda k, grid, *a, **kw: launches.append((k, grid[0], a, kw))
    at._after_launch = lambda: None
    rows = L.max_recv_tokens(tokens, world_size, topk, experts // world_size, 16)
    x = torch.zeros(tokens, hidden, dtype=in_dtype)
    xs = torch.zeros(tokens, scales) if scales else None
    idx = torch.zeros(tokens, topk, dtype=torch.int64)
    w = torch.zeros(tokens, topk)
    ex = torch.zeros(rows, hidden, dtype=in_dtype)
    exs = torch.zeros(rows, scales) if scales else None
    ent = torch.zeros(experts // world_size, dtype=torch.int32)
    at.dispatch(ent, ex, exs, x, xs, idx, w, bound_m=torch.ones(1, dtype=torch.int32))
    y = torch.zeros(rows, hidden, dtype=torch.bfloat16)
    out = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
    at.combine(out, idx, w, y, accumulate=True)
    return launches


def _usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, spill store bytes, shared bytes) from `cuobjdump --dump-resource-usage`."""
    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return -1, -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout

    def num(key: str) -> int:
        m = re.search(key + r"[:=]\s*(\d+)", text)
        return int(m.group(1)) if m else -1

    return num("REG"), num("STACK"), num("SHARED")


def compile_launch(kernel, grid: int, args: tuple, kwargs: dict) -> Compiled:
    """Compile one recorded launch for sm_90 and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps")
    sig, consts, attrs = {}, {}, {}
    names = kernel.arg_names
    for name, v in list(zip(names, args)) + list(kwargs.items()):
        i = names.index(name)
        p = kernel.params[i]
        if p.is_constexpr:
            sig[name], consts[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
            aligned = True  # the JIT sees CUDA allocations 16-byte aligned
        else:
            sig[name] = "i64" if abs(int(v)) >= 2**31 else "i32"
            aligned = int(v) % 16 == 0 and int(v) != 0
        if aligned:  # what the JIT's specialization tells the compiler
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(kernel, sig, consts, attrs)
    except TypeError:  # a Triton without the attrs argument
        src = ASTSource(kernel, sig, consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = k.asm["cubin"]
    if not cubin:
        raise RuntimeError(f"no cubin for {kernel.fn.__name__}")
    regs, spill, shared = _usage(cubin)
    vec, narrow = _access_widths(k.asm.get("ptx", ""))
    return Compiled(kernel.fn.__name__, grid, num_warps, regs, spill, shared, vec, narrow)


def _access_widths(ptx: str) -> tuple[int, int]:
    """(wide, narrow) global load/store instructions in the PTX: 8+ bytes per thread
    (vectors, b64) against 1-4 bytes; atomics and scalar flag polls are not counted."""
    wide = narrow = 0
    for m in re.finditer(r"\b(?:ld|st)\.global((?:\.\w+)*)", ptx):
        mods = m.group(1).split(".")
        if any(x in ("v2", "v4", "b64", "u64", "s64", "f64") for x in mods):
            wide += 1
        elif any(x in ("b8", "b16", "b32", "u8", "u16", "u32", "s32", "f32", "f16") for x in mods):
            narrow += 1
    return wide, narrow


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="bf16 dispatch (default fp8 + scales)")
    ap.add_argument("--fused", type=int, default=None, help="1: one launch per phase")
    ap.add_argument("--sync", default="v2")
    ap.add_argument("--prof", action="store_true")
    ap.add_argument("--names-only", action="store_true", help="print kernel names only")
    a = ap.parse_args(argv)
    dt = torch.bfloat16 if a.bf16 else torch.float8_e4m3fn
    fused = None if a.fused is None else bool(a.fused)
    rows = []
    for k, grid, args, kw in record_launches(
        dt, a.ranks, a.tokens, a.hidden, a.experts, a.topk, a.sync, fused, a.prof
    ):
        rows.append(compile_launch(k, grid, args, kw))
    if a.names_only:
        print(" ".join(c.name for c in rows))
        return
    print(f"{'kernel':18s} {'grid':>6s} {'warps':>5s} {'regs':>5s} {'spill B':>7s} "
          f"{'smem B':>7s} {'progs/SM':>8s} {'waves':>6s} {'ld/st wide':>10s} "
          f"{'narrow':>6s}")  # fmt: skip
    for c in rows:
        per_sm = c.programs_per_sm()
        waves = c.grid / max(1, per_sm * 132)
        print(
            f"{c.name:18s} {c.grid:6d} {c.num_warps:5d} {c.regs:5d} {c.spill_bytes:7d} "
            f"{c.shared_bytes:7d} {per_sm:8d} {waves:6.2f} {c.vector_ldst:10d} "
            f"{c.narrow_ldst:6d}"
        )


if __name__ == "__main__":
    main()
