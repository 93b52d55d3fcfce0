"""``python -m worker`` and ``update-worker``: the command line (worker/cli.py)."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        # A SIGTERM before the worker's loop takes over (while the imports below load) finds
        # nothing read and nothing to finish: exit 0, as a stopped worker does.
        signal.signal(signal.SIGTERM, _stop_before_start)
    from worker.cli import main as cli_main  # noqa: PLC0415 - after the handler, on purpose

    return cli_main()


def _stop_before_start(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
