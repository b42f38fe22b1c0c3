"""Helpers shared by the experiment scripts: output folders, CSV I/O, figures."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(EXPERIMENTS)
RESULTS = os.path.join(EXPERIMENTS, "results")
PAPER_DATA = os.path.join(EXPERIMENTS, "paper_data")


def out_dir(name: str, root: str | None = None) -> str:
    """`<root or experiments/results>/<name>`, created."""
    d = os.path.join(root or RESULTS, name)
    os.makedirs(d, exist_ok=True)
    return d


def write_rows(path: str, rows: Sequence[dict], header_comment: str = "") -> str:
    """Write dict rows to a CSV (overwrites; columns: every key, in order of appearance).

    `header_comment` lines are written first, each prefixed with '# ' (source, setting)."""
    if not rows:
        raise ValueError(f"write_rows: no rows for {path}")
    with open(path, "w", newline="") as f:
        for line in header_comment.splitlines():
            f.write(f"# {line}\n")
        cols = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def read_rows(path: str) -> list[dict]:
    """Dict rows of a CSV whose comment lines start with '#'; [] when the file is absent."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, footer: float = 0.0) -> str:
    """Lay out (leaving `footer` of the height free for fig.text notes) and write a PNG."""
    fig.tight_layout(rect=(0, footer, 1, 1))
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def fnum(rows: Iterable[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows]
