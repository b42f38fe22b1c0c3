"""Benchmark entry point: `python -m pplx.bench <name> [args]`.

Names: `fabric` (TransferEngine vs raw libfabric), `nvlink` (SM stores to peers vs the copy
engine, reads after peer writes), `moe` (dispatch/combine vs NCCL/gloo
all-to-all; with `--ranks-per-node R` the ranks form emulated nodes of R ranks and the
inter-node benchmark `pplx.bench.moe_internode` runs). Each module exposes `main(argv)`.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "fabric": "pplx.bench.fabric",
    "moe": "pplx.bench.moe",
    "nvlink": "pplx.bench.nvlink",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__)
        print("usage: python -m pplx.bench {" + ",".join(BENCHES) + "} [--help]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = BENCHES[argv[0]]
    if argv[0] == "moe" and any(a.startswith("--ranks-per-node") for a in argv[1:]):
        name = "pplx.bench.moe_internode"
    mod = importlib.import_module(name)
    return int(mod.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
