"""The one CSV schema and table printer shared by every benchmark (DESIGN.md, Measuring).

Each measurement is a `Row`; `emit(rows, csv_path)` appends them to a CSV (header written
once) and prints an aligned table. Times are microseconds, bandwidths GB/s (1e9 B/s) per rank.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence

FIELDS = (
    "time_utc",
    "commit",
    "host",
    "device",
    "bench",
    "case",
    "impl",
    "provider",
    "ranks",
    "ranks_per_node",
    "shape",
    "dtype",
    "bytes",
    "p50_us",
    "p20_us",
    "p80_us",
    "gbps_nvlink",
    "gbps_fabric",
    "baseline",
    "ratio",
    "notes",
)


@dataclasses.dataclass
class Row:
    """One benchmark result. `ratio` is baseline_p50 / p50 (> 1 means faster than baseline)."""

    bench: str
    case: str
    impl: str
    p50_us: float
    p20_us: float
    p80_us: float
    provider: str = ""
    ranks: int = 1
    ranks_per_node: int = 1
    shape: str = ""
    dtype: str = ""
    bytes: int = 0
    gbps_nvlink: float = 0.0
    gbps_fabric: float = 0.0
    baseline: str = ""
    ratio: float = float("nan")
    notes: str = ""
    time_utc: str = ""
    commit: str = ""
    host: str = ""
    device: str = ""

    def fill_context(self) -> Row:
        self.time_utc = self.time_utc or _dt.datetime.now(_dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        self.commit = self.commit or git_commit()
        self.host = self.host or platform.node()
        self.device = self.device or device_name()
        return self


def percentiles(samples_us: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of a list of microsecond samples (nearest-rank on the sorted list)."""
    if not samples_us:
        raise ValueError("percentiles: samples_us is empty")
    s = sorted(samples_us)

    def pick(q: float) -> float:
        return float(s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))])

    return pick(0.5), pick(0.2), pick(0.8)


def git_commit() -> str:
    env = os.environ.get("PPLX_COMMIT")
    if env:
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    data = [[_fmt(getattr(r, c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.rjust(w) for x, w in zip(d, widths)) for d in data]
    return "\n".join(lines)


DEFAULT_COLUMNS = (
    "case",
    "impl",
    "shape",
    "p50_us",
    "p20_us",
    "p80_us",
    "gbps_nvlink",
    "gbps_fabric",
    "baseline",
    "ratio",
)


def write_csv(rows: Iterable[Row], path: str) -> None:
    rows = [r.fill_context() for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: getattr(r, k) for k in FIELDS})


def emit(
    rows: Sequence[Row], csv_path: str | None, columns: Sequence[str] = DEFAULT_COLUMNS
) -> None:
    """Append rows to csv_path (if given) and print the table last (STYLE.md, 8)."""
    rows = [r.fill_context() for r in rows]
    if csv_path:
        write_csv(rows, csv_path)
    if rows:
        r0 = rows[0]
        print(
            f"# {r0.bench}  device={r0.device}  host={r0.host}  commit={r0.commit}  {r0.time_utc}"
        )
    print(format_table(rows, columns))
    if csv_path:
        print(f"# rows appended to {csv_path}")


def rank_device(rank: int, cpu: bool):
    """A benchmark rank's device: CUDA device `rank % count` (made current) unless `cpu` or
    no CUDA, else the CPU with the Triton interpreter chosen (before any kernel module is
    imported in this process: decorated kernels read TRITON_INTERPRET when defined)."""
    import torch

    if torch.cuda.is_available() and not cpu:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")
