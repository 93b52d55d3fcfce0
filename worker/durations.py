"""Durations as operators write them (``90s``, ``30m``, ``12h``, ``7d``, ``2w``): the ledger
retention, ``--older-than``, the dashboard's age filter."""

from __future__ import annotations

import datetime as dt
import re
from typing import Final


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` (or ``0``) -> a timedelta."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
    if match is None or (match[2] == "" and match[1] != "0"):
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 12h, 7d or 2w")
    return dt.timedelta(seconds=int(match[1]) * _UNIT_S[match[2] or "s"])


_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
