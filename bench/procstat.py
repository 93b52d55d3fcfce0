"""CPU time of processes, read from ``/proc`` (Linux): what a drain cost each of them.

Stdlib only, so the anchors' own virtual environments can use it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` (all its threads), 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def pids_named(name: str) -> list[int]:
    """Every process whose command name is ``name`` (``postgres``: the server and backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


@dataclass
class Meter:
    """CPU seconds spent between :meth:`start` and :meth:`stop` by named groups of processes.

    A group is a fixed list of pids, or a command name looked up at both ends (PostgreSQL
    starts a backend per new connection: one that appears during the drain counts in full).
    """

    pids: dict[str, list[int]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    _before: dict[str, dict[int, float]] = field(default_factory=dict, init=False)

    def _sample(self) -> dict[str, dict[int, float]]:
        groups = {group: list(pids) for group, pids in self.pids.items()}
        groups |= {group: pids_named(name) for group, name in self.names.items()}
        return {group: {pid: cpu_seconds(pid) for pid in pids} for group, pids in groups.items()}

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since :meth:`start`."""
        after = self._sample()
        return {
            group: sum(
                seconds - self._before.get(group, {}).get(pid, 0.0)
                for pid, seconds in after[group].items()
            )
            for group in after
        }
