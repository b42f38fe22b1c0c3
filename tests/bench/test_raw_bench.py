"""The plain-libfabric baseline (native/bench/raw_bench.c) builds, runs and is parsed right.

Two real processes on shm (and tcp) with tiny sizes; checks structure, never timings.
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from pplx.bench import fabric

# Small but not trivial: 3 bw sizes across the 2-write floor and the 1024-write cap,
# two page sizes, a window smaller than the writes per rep (so the window is exercised).
TINY = fabric.FabricBenchConfig(
    sizes=(1024, 4096, 1 << 20),
    page_sizes=(1024, 4096),
    num_pages=16,
    lat_iters=50,
    warmup=10,
    reps=2,
    window=4,
    bytes_per_rep=256 << 10,
    timeout_s=20.0,
)


@pytest.fixture(scope="module")
def raw_binary(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("raw") / "raw_bench"
    return fabric.build_raw(str(out), force=True)


def check_results(cfg: fabric.FabricBenchConfig, results: list[fabric.Measurement]) -> None:
    want = []
    if "lat" in cfg.tests:
        want.append(("lat", 8, 1, cfg.lat_iters))
    if "bw" in cfg.tests:
        want += [("bw", s, cfg.writes_per_rep(s), cfg.reps) for s in cfg.sizes]
    if "paged" in cfg.tests:
        want += [("paged", p, cfg.num_pages, cfg.reps) for p in cfg.page_sizes]
    got = [(m.kind, m.bytes, m.ops, len(m.samples_us)) for m in results]
    assert got == want, f"results {got} != expected {want}"
    # The C program's footprint is the one the pplx side uses (pplx/bench/fabric.py).
    for m in results:
        if m.kind == "bw":
            assert (m.slots, m.buf_bytes) == (cfg.bw_slots(m.bytes), cfg.buf_bytes()), m
        elif m.kind == "paged":
            assert (m.slots, m.buf_bytes) == (cfg.num_pages, cfg.buf_bytes()), m
    for m in results:
        bad = [x for x in m.samples_us if not (math.isfinite(x) and x > 0)]
        assert not bad, f"{m.kind} {m.bytes}: non-positive samples {bad[:5]}"


def test_raw_builds(raw_binary):
    assert os.access(raw_binary, os.X_OK)
    # A second call with an up-to-date binary does not rebuild it.
    mtime = os.path.getmtime(raw_binary)
    assert fabric.build_raw(raw_binary) == raw_binary
    assert os.path.getmtime(raw_binary) == mtime


def test_writes_per_rep_matches_c():
    # raw_bench.c clamps bytes_per_rep / size to [2, 1024]; the pplx side must use the same.
    assert [TINY.writes_per_rep(s) for s in TINY.sizes] == [256, 64, 2]
    assert fabric.FabricBenchConfig(bytes_per_rep=64 << 20).writes_per_rep(1) == 1024


@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_raw_runs(raw_binary, provider):
    cfg = fabric.FabricBenchConfig(**{**TINY.__dict__, "provider": provider})
    seen = []
    results = fabric.run_raw(cfg, raw_binary, on_result=seen.append)
    check_results(cfg, results)
    assert seen == results


def test_raw_subset_of_tests(raw_binary):
    cfg = fabric.FabricBenchConfig(**{**TINY.__dict__, "tests": ("paged",)})
    check_results(cfg, fabric.run_raw(cfg, raw_binary))


def test_raw_unknown_provider_fails_clearly(raw_binary):
    env = dict(os.environ, IPATH_NO_BACKTRACE="1")
    server = subprocess.Popen(
        [raw_binary, "--role=server", "--port=0", "--provider=no_such_provider"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = server.stdout.readline()
    port = line.split('"port":')[1].rstrip("}\n")
    client = subprocess.run(
        [raw_binary, "--role=client", f"--port={port}", "--provider=no_such_provider"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    _, err = server.communicate(timeout=30)
    assert client.returncode != 0 and server.returncode != 0
    assert "no provider 'no_such_provider'" in client.stderr + err


def test_raw_bad_arguments(raw_binary):
    out = subprocess.run([raw_binary, "--role=client"], capture_output=True, text=True, timeout=10)
    assert out.returncode != 0 and "--port" in out.stderr
    out = subprocess.run(
        [raw_binary, "--role=server", "--sizes=4Q"], capture_output=True, text=True, timeout=10
    )
    assert out.returncode != 0 and "bad size '4Q'" in out.stderr


def test_parse_sizes():
    assert fabric.parse_sizes("4096,64K,1M,2MiB") == (4096, 65536, 1 << 20, 2 << 20)
    with pytest.raises(ValueError, match="expected bytes"):
        fabric.parse_size("lots")
    with pytest.raises(ValueError, match="provider must be"):
        fabric.FabricBenchConfig(provider="efa")
    with pytest.raises(ValueError, match="tests must be"):
        fabric.FabricBenchConfig(tests=("lat", "nope"))
