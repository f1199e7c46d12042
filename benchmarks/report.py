"""Shared bits of the benchmark programs: markdown tables, the environment a result was measured in, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def median(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def span(values: Iterable[float], digits: int = 2) -> str:
    """'median (min-max)' of the values, or '-'."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def environment() -> dict:
    """Where and when a result was measured: the machine is shared, so its load is part of the result."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    import hivemind
    import torch  # imported late: some programs only need it here

    return dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), commit=commit.stdout.strip(), cpus=os.cpu_count(),
                load_average=[round(x, 2) for x in os.getloadavg()], python=platform.python_version(),
                torch=torch.__version__, hivemind=hivemind.__version__)


def write_json(name: str, data: dict, path: Optional[Path] = None) -> Path:
    path = path or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def arm_medians(runs: list[dict]) -> dict:
    """The median of each numeric figure over the runs of one arm (other values from the first run);
    the first failed run instead if any failed (its ``error`` says why)."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    return {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], (int, float)) else runs[0][key]
            for key in runs[0]}
