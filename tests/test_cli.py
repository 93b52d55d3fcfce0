"""The command line, run as a person or a container would: real processes, real services."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, eventually
from tests.test_service import wait_for_message
from worker.stream import deployment
from worker.stream.names import Names

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "worker"]


def clean_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WORKER_")}
    return {**env, **settings}


def run_cli(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**settings),
        cwd=ROOT,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def worker_process(
    engine: AsyncEngine, database_url: str, prefix: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    del engine  # seeded before the worker reflects
    process = await asyncio.create_subprocess_exec(
        *CLI, "run", "--block-ms", "500",
        env=clean_env(WORKER_DATABASE_URL=database_url, WORKER_REDIS_URL=REDIS_URL, WORKER_PREFIX=prefix),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    yield process
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_redis_cli_producer_against_a_worker_process_then_sigterm_exits_zero(
    worker_process: asyncio.subprocess.Process, redis: Redis, prefix: str
) -> None:
    redis_cli = shutil.which("redis-cli")
    assert redis_cli, "redis-cli is needed for this test (Debian package redis-tools)"
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{prefix}:replies")
    job = '{"id":"cli-1","table":"books","set":{"genre":"sci-fi"},"where":{"genre":"fiction"}}'
    port = REDIS_URL.rsplit(":", 1)[1].split("/")[0]
    await asyncio.to_thread(
        subprocess.run,
        [redis_cli, "-p", port, "XADD", f"{prefix}:jobs", "*", "job", job],
        check=True,
        capture_output=True,
    )
    published = await wait_for_message(pubsub, timeout=30)
    await pubsub.aclose()
    stored = await asyncio.to_thread(
        subprocess.run,
        [redis_cli, "-p", port, "GET", f"{prefix}:result:cli-1"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(stored.stdout) == published
    assert (published["id"], published["status"], published["rowcount"]) == ("cli-1", "ok", 3)

    worker_process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker_process.wait(), 30) == 0


async def test_submit_shorthand_and_json_against_a_worker_process(
    worker_process: asyncio.subprocess.Process, prefix: str
) -> None:
    del worker_process
    settings = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_PREFIX": prefix}
    shorthand = await asyncio.to_thread(
        lambda: run_cli(
            "submit",
            "--table",
            "users",
            "--key",
            "id=1",
            "--set",
            "name=John Doe",
            "--set",
            "age=30",
            **settings,
        )
    )
    assert shorthand.returncode == 0, shorthand.stderr
    reply = json.loads(shorthand.stdout)
    assert (reply["status"], reply["rowcount"]) == ("ok", 1)
    failing = await asyncio.to_thread(
        lambda: run_cli("submit", '{"table": "books", "set": {"genre": "x"}}', **settings)
    )
    assert failing.returncode == 1
    assert json.loads(failing.stdout)["error"]["code"] == "missing_filter"


def test_schema_prints_a_valid_json_schema() -> None:
    result = run_cli("schema")
    assert result.returncode == 0
    schema: dict[str, Any] = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)


def test_a_bad_setting_stops_start_up_with_one_line_naming_it() -> None:
    result = run_cli("run", WORKER_CONCURRENCY="lots")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "WORKER_CONCURRENCY" in result.stderr
    flagged = run_cli("run", "--batch-size", "0")
    assert (flagged.returncode, "--batch-size" in flagged.stderr) == (2, True)


def test_help_masks_passwords() -> None:
    result = run_cli("run", "--help", WORKER_REDIS_URL="redis://u:hunter2@localhost:6379/0")
    assert result.returncode == 0
    assert "hunter2" not in result.stdout


def test_check_names_each_service_that_is_down() -> None:
    # A live stack passing: tests/test_operate.py, which has a worker create the group first.
    dead = run_cli(
        "check",
        WORKER_REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        WORKER_DATABASE_URL="postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/none",
    )
    assert dead.returncode == 1
    lines = dead.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["redis", "database"]
    assert "hunter2" not in dead.stderr + dead.stdout


def test_demo_prints_the_seed_replies_and_the_refusal() -> None:
    result = run_cli("demo", WORKER_REDIS_URL=REDIS_URL)
    assert result.returncode == 0, result.stderr
    assert '"rowcount":1' in result.stdout
    assert '"rowcount":3' in result.stdout
    assert '"name": "John Doe", "age": 30' in result.stdout  # the refused age=-1 left it
    assert '"code":"data_error","message":"users: age: age must not be negative"' in result.stdout


@pytest.mark.slow
def test_demo_starts_its_own_redis_when_none_answers() -> None:
    assert shutil.which("redis-server"), "redis-server is needed for this test"
    result = run_cli("demo", WORKER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 0, result.stderr
    assert "started redis-server on port" in result.stdout
    assert result.stdout.count("(expected") == 3  # the three demo jobs


async def test_a_worker_stopped_by_sigterm_leaves_the_group_and_the_record(
    worker_process: asyncio.subprocess.Process, redis: Redis, prefix: str
) -> None:
    """Stopped workers used to stay in the group (and in `stats`) for ever."""
    names = Names(prefix)

    async def consumers() -> list[Any]:
        try:
            return list(await redis.xinfo_consumers(names.stream, "update-workers"))
        except ResponseError:
            return []  # no group yet

    async def announced() -> bool:
        return bool(await deployment.records(redis, names))

    await eventually(announced, timeout=30)
    await redis.xadd(names.stream, {"job": json.dumps({"table": "items", "key": {"id": 1},
                                                       "inc": {"qty": 1}})})  # fmt: skip
    await eventually(consumers, timeout=30)
    await eventually(functools.partial(_empty, redis, names), timeout=30)
    worker_process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker_process.wait(), 30) == 0
    assert await consumers() == []
    assert await deployment.records(redis, names) == []


async def _empty(redis: Redis, names: Names) -> bool:
    return int(await redis.xlen(names.stream)) == 0
