"""How the dashboard writes figures: ages, times, counts, the jobs/s chart, JSON. Pure."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def clock(wall: float | None) -> str:
    if not wall:
        return "-"
    return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def count(value: float) -> str:
    return f"{value:,.0f}"


def rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def pretty(raw: str) -> str:
    """JSON indented when it parses; the text as it is otherwise (the template escapes it)."""
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        return raw


def chart(history: Sequence[tuple[float, float]], *, width: int, height: int) -> dict[str, object]:
    """An SVG polyline of jobs/s over time: its points, the top of the scale, the span."""
    if len(history) < 2:
        return {"points": "", "top": 0.0, "span_s": 0.0}
    start, end = history[0][0], history[-1][0]
    span = max(end - start, 1e-9)
    top = max(value for _, value in history) or 1.0
    points = " ".join(
        f"{(wall - start) / span * width:.1f},{height - value / top * (height - 4):.1f}"
        for wall, value in history
    )
    return {"points": points, "top": top, "span_s": end - start}
