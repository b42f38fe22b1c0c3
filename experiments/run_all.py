"""Regenerate every figure this machine can: `make figures` = `python -m experiments.run_all`.

All figures are CPU jobs (the model, CSVs, a small shm run). Figures with GPU measurements
(MoE EP <= 4 points, a GPU proxy round trip) plot the last rows recorded in
experiments/results/moe/moe.csv and experiments/results/fabric/*.csv, and say so in the
figure; nothing here needs a GPU. Runtime about 1.5 minutes on 2 cores (--quick: ~40 s).

    python -m experiments.run_all [--quick] [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from collections.abc import Sequence

SCRIPTS = (
    "moe_decode",
    "moe_prefill",
    "p2p_bandwidth",
    "host_proxy",
    "model_questions",
    "rl_weights",
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results root (default experiments/results)")
    ap.add_argument("--only", nargs="*", choices=SCRIPTS, default=None)
    args = ap.parse_args(argv)
    failed = []
    for name in args.only or SCRIPTS:
        print(f"\n=== experiments.{name} ===", flush=True)
        t0 = time.perf_counter()
        sub = (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
        try:
            rc = importlib.import_module(f"experiments.{name}").main(sub)
        except Exception:
            traceback.print_exc()
            rc = 1
        print(f"=== {name}: {'ok' if rc == 0 else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
