"""Compile every Triton all-to-all kernel for sm_90 (H100) on a CPU machine, so that errors
in GPU-only code paths (pointer casts, atomics with scopes, cache modifiers) show in CI.

`python -m pplx.moe.kernels.sm90` records the launches of one dispatch and combine
(`TritonAllToAll._launch` replaced by a recorder) and compiles each with `triton.compile`
for `GPUTarget("cuda", 90, 32)` (Triton's bundled ptxas makes the cubin).
The inline-PTX polls (`ld.acquire.sys`, CUDA only) and clock stamps are switched on as on
a GPU; both signalling protocols ("v1", "v2") and both launch modes (fused or not) are
compiled.
Runs in a subprocess without TRITON_INTERPRET, since decorated kernels are interpreted
functions when that variable was set at import.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# (arguments of `python -m pplx.moe.kernels.sm90`, kernels it must compile): decode shapes
# of the benchmark (fp8 with scales; rows in one tile) with both signalling protocols, one
# launch per phase (fused) or per half, with and without clock stamps, and a bf16
# prefill-like T=1024, hidden 2880 (rows in several tiles).
_DECODE = ["--ranks", "4", "--tokens", "128", "--hidden", "7168", "--experts", "256"]
_CONFIGS = [
    (_DECODE + ["--fused", "1"], ["_dispatch_kernel", "_combine_kernel"]),
    (_DECODE + ["--fused", "0", "--prof"], ["_dispatch_kernel"] * 2 + ["_combine_kernel"] * 2),
    (
        _DECODE + ["--fused", "0", "--sync", "v1"],
        ["_dispatch_kernel"] * 2 + ["_combine_kernel"] * 2,
    ),
    (
        ["--ranks", "2", "--tokens", "1024", "--hidden", "2880", "--experts", "64", "--topk", "4"]
        + ["--bf16", "--fused", "1", "--prof"],
        ["_dispatch_kernel", "_combine_kernel"],
    ),
]


def _cuda_backend_available() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton has no NVIDIA backend")
def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args, want in _CONFIGS:
        proc = subprocess.run(
            [sys.executable, "-m", "pplx.moe.kernels.sm90", "--names-only", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.split() == want, (args, proc.stdout)


_PEER_PTR_PROBE = """
import re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pplx.moe.kernels.sync_kernels import peer_ptr


@triton.jit
def probe(table_ptr, out_ptr, rank, off, MODE: tl.constexpr):
    cols = tl.arange(0, 1024)
    if MODE == "arg":
        src = out_ptr + 2048
    elif MODE == "const":
        src = peer_ptr(table_ptr, rank, 256, tl.bfloat16)
    else:
        src = peer_ptr(table_ptr, rank, off, tl.bfloat16)
    tl.store(out_ptr + cols, tl.load(src + cols, cache_modifier=".cg"))


for mode in ("arg", "const", "runtime"):
    # out_ptr and off 16-byte aligned, as the JIT specialises such arguments
    src = ASTSource(probe, {"table_ptr": "*i64", "out_ptr": "*bf16", "rank": "i32",
                            "off": "i32", "MODE": "constexpr"}, {"MODE": mode},
                    {(1,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    loads = re.findall(r"ld\\.global\\.cg[.\\w]*", k.asm["ptx"])
    print(mode, " ".join(sorted(set(loads))), len(loads))
"""


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton has no NVIDIA backend")
def test_peer_pointers_keep_their_alignment(tmp_path) -> None:
    """A tile loaded through `peer_ptr` (an address read from the table) compiles to the
    same 16-byte vector loads as one through a kernel argument. The hint on the loaded
    integer alone did not survive the cast to a pointer: every peer access was scalar
    (bf16: 2-byte loads and NVLink stores; 4 H100 EP4 combine 39.9 -> 35.7 us once fixed,
    one launch)."""
    script = tmp_path / "peer_ptr_probe.py"
    script.write_text(_PEER_PTR_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    arg = lines["arg"]
    assert ".v4" in arg, arg  # the reference: a kernel-argument pointer, 16-byte loads
    # peer_ptr with a constant and with a (16-divisible) runtime byte offset
    assert lines["const"] == arg and lines["runtime"] == arg, lines
