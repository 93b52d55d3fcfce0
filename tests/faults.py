"""Fault injection for the tests: a private Redis that can crash, and worker processes that
can be killed. Everything here is real: processes, sockets, an AOF file on disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a free port, persisting every write to its AOF
    before answering (appendfsync always) and refusing to evict (noeviction): the settings
    under which the worker's guarantees hold."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self._process = self._launch()
        deadline = time.monotonic() + 10
        async with Redis.from_url(self.url) as client:
            while True:
                try:
                    await client.ping()
                except Exception as error:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"private redis on {self.port} did not start") from error
                    await asyncio.sleep(0.05)
                else:
                    return

    def _launch(self) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for the fault tests (Debian package redis-server)"
        return subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--maxmemory-policy", "noeviction", "--logfile", str(self.directory / "redis.log")],
        )  # fmt: skip

    async def crash_and_restart(self) -> None:
        """SIGKILL, no goodbye, then start again from the AOF."""
        self.kill()
        await self.start()
        self.restarts += 1

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


class WorkerProcesses:
    """``python -m worker run`` processes, as an operator would start them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {
            key: value for key, value in os.environ.items() if not key.startswith("WORKER_")
        }
        self.env.update(env)
        self.logs = logs
        self.kills = 0
        self._processes: list[subprocess.Popen[bytes]] = []
        self._spawned: dict[int, float] = {}

    def spawn(self) -> subprocess.Popen[bytes]:
        log = (self.logs / f"worker-{len(self._processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=self.env, cwd=ROOT, stderr=log, stdout=log
        )
        log.close()
        self._processes.append(process)
        self._spawned[process.pid] = time.monotonic()
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.kills += 1

    @property
    def spawned(self) -> list[subprocess.Popen[bytes]]:
        return list(self._processes)

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in self._processes if process.poll() is None]

    async def terminate(self, *, timeout: float = 60) -> list[int]:
        """SIGTERM every live worker; their exit codes.

        A process gets a moment to exist first: a signal that lands while the interpreter
        itself is still starting, before any of the worker's code runs, gets the default
        action (exit -15) in any Python program.
        """
        alive = self.alive()
        youngest = max((self._spawned[process.pid] for process in alive), default=0.0)
        await asyncio.sleep(max(0.0, youngest + 0.3 - time.monotonic()))
        for process in alive:
            process.send_signal(signal.SIGTERM)
        codes = []
        for process in alive:
            codes.append(await asyncio.to_thread(process.wait, timeout))
        return codes

    def kill_all(self) -> None:
        for process in self.alive():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(10)

    def matches(self, pattern: str) -> list[str]:
        """Every match of ``pattern`` (a regex with at most one group) in the workers' logs."""
        return [
            found
            for path in self.logs.glob("worker-*.log")
            for found in re.findall(pattern, path.read_text(errors="replace"))
        ]

    def tail(self, lines: int = 40) -> str:
        """The end of each worker's log, for a failing assertion's message."""
        out = []
        for path in sorted(self.logs.glob("worker-*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out[-6:])
