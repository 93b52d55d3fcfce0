"""docs/benchmark.png: throughput by system, and by update-worker process count."""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt


def plot(rows: list[dict[str, Any]], scaling: dict[int, float], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (by_system, by_processes) = plt.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]}
    )
    names = [row["system"].replace(" (", "\n(") for row in rows]
    values = [row["throughput"] for row in rows]
    colours = ["#2b6cb0" if "update-worker" in row["system"] else "#a0aec0" for row in rows]
    bars = by_system.bar(names, values, color=colours)
    by_system.bar_label(bars, labels=[f"{value:,.0f}" for value in values], padding=2)
    by_system.set_ylabel("jobs/s (5,000 jobs, until every result is in)")
    by_system.set_title("+1 on one of 10,000 rows by key, one worker process")
    by_system.tick_params(axis="x", labelsize=8)
    if scaling:
        counts = sorted(scaling)
        bars = by_processes.bar([str(count) for count in counts], [scaling[c] for c in counts],
                                color="#2b6cb0")  # fmt: skip
        by_processes.bar_label(bars, labels=[f"{scaling[c]:,.0f}" for c in counts], padding=2)
        by_processes.set_xlabel("update-worker processes on one consumer group")
        by_processes.set_title("PostgreSQL, 20,000 jobs")
    else:
        by_processes.axis("off")
    figure.suptitle(f"update-worker bench, {dt.date.today()}, {platform.node()}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
