"""``update-worker submit``, as a new user runs it: every job sent or counted, flags applied or
refused, bad jobs refused before sending, and one line (no traceback) when a service is down."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from tests.tables import items
from tests.test_cli import free_port
from tests.test_operate import cli
from worker.client import UpdateClient
from worker.errors import InvalidJob


def settings_env(database_url: str, prefix: str, **more: str) -> dict[str, str]:
    return {"WORKER_REDIS_URL": REDIS_URL, "WORKER_DATABASE_URL": database_url,
            "WORKER_PREFIX": prefix, **more}  # fmt: skip


async def qty(engine: AsyncEngine, item_id: int) -> int:
    async with engine.connect() as connection:
        found = await connection.scalar(sa.select(items.c.qty).where(items.c.id == item_id))
    return int(found or 0)


async def test_submit_file_sends_every_job_at_the_default_in_flight(
    start_worker: WorkerFactory, engine: AsyncEngine, database_url: str, prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """2,000 key jobs at the default --in-flight 100: redis-py's pool of 100 connections used to
    overflow (MaxConnectionsError), and two jobs were never sent yet counted as ok."""
    await start_worker()
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"table": "items", "key": {"id": 1}, "inc": {"qty": 1}})
                            + "\n" for _ in range(2000)))  # fmt: skip
    before = await qty(engine, 1)
    result = await cli("submit", "-f", str(path), **settings_env(database_url, prefix))
    assert result.returncode == 0, result.stderr
    assert "2,000 job(s) sent, 0 line(s) not sent: 2,000 ok" in result.stdout
    assert "Traceback" not in result.stderr
    assert "never retrieved" not in result.stderr
    assert await qty(engine, 1) == before + 2000


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # Redis only: no worker runs
async def test_submit_file_no_wait_enqueues_every_job_at_any_in_flight(
    redis: Redis, database_url: str, prefix: str, tmp_path: Path
) -> None:
    """``--no-wait --in-flight 300`` crashed with a traceback and enqueued none of 1,000 jobs."""
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"id": f"j{n}", "table": "items", "key": {"id": 1},
                                        "inc": {"qty": 1}}) + "\n" for n in range(1000)))  # fmt: skip
    result = await cli("submit", "-f", str(path), "--no-wait", "--in-flight", "300",
                       **settings_env(database_url, prefix))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "enqueued 1,000 job(s)" in result.stdout
    entries: Any = await redis.xrange(f"{prefix}:jobs")
    assert [json.loads(fields[b"job"])["id"] for _, fields in entries] == [
        f"j{n}" for n in range(1000)
    ]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # no database is reached
async def test_submit_file_with_redis_down_counts_every_line_as_not_sent(
    database_url: str, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"table": "items", "key": {"id": 1}, "inc": {"qty": 1}})
                            + "\n" for _ in range(250)))  # fmt: skip
    dead = f"redis://127.0.0.1:{free_port()}/0"
    result = await cli("submit", "-f", str(path), **{**settings_env(database_url, prefix),
                                                     "WORKER_REDIS_URL": dead})  # fmt: skip
    assert result.returncode == 1
    assert "0 job(s) sent, 250 line(s) not sent: 250 error" in result.stdout
    codes = dict(re.findall(r"^  (\w+)\s+([\d,]+)$", result.stdout, re.MULTILINE))
    assert codes == {"send_failed": "100", "not_sent": "150"}  # one pipeline tried
    assert "Traceback" not in result.stderr


async def test_flags_apply_to_a_json_job(
    start_worker: WorkerFactory, engine: AsyncEngine, database_url: str, prefix: str
) -> None:
    """``--dry-run`` and ``--id`` used to be ignored next to a JSON job: the row changed."""
    await start_worker()
    env = settings_env(database_url, prefix)
    job = json.dumps({"table": "items", "key": {"id": 2}, "inc": {"qty": 100}})
    dry = await cli("submit", job, "--dry-run", "--id", "flagged-1", **env)
    assert dry.returncode == 0, dry.stderr
    reply = json.loads(dry.stdout)
    assert (reply["id"], reply["dry_run"], reply["rowcount"]) == ("flagged-1", True, 1)
    assert await qty(engine, 2) == 0  # rolled back
    real = await cli("submit", job, "--id", "flagged-1", **env)
    assert json.loads(real.stdout)["dry_run"] is False  # a dry run records nothing
    assert await qty(engine, 2) == 100
    refused = await cli("submit", job, "--table", "items", "--set", "qty=1", **env)
    assert refused.returncode == 2
    assert "--table, --set cannot be combined with a JSON job" in refused.stderr
    other = await cli("submit", json.dumps({"id": "a", **json.loads(job)}), "--id", "b", **env)
    assert other.returncode == 2
    assert "differs from the job's id" in other.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_flags_that_do_not_fit_are_refused_not_ignored(
    database_url: str, prefix: str, tmp_path: Path
) -> None:
    env = settings_env(database_url, prefix)
    path = tmp_path / "jobs.jsonl"
    path.write_text("{}\n")
    for args, message in (
        (("-f", str(path), "--dry-run"), "--dry-run cannot be combined with a file"),
        (("-f", str(path), "--id", "x"), "--id cannot be combined with a file"),
        (("--table", "items", "--set", "qty=1", "--in-flight", "5"), "--in-flight goes with -f"),
    ):
        result = await cli("submit", *args, **env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr, result.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_bad_job_is_refused_before_sending_without_waiting(
    redis: Redis, database_url: str, prefix: str
) -> None:
    """``submit --id 'bad id'`` used to wait 30 s for the worker's refusal and exit 3."""
    env = settings_env(database_url, prefix)
    for args in (
        ("--table", "items", "--key", "id=1", "--set", "qty=1", "--id", "bad id"),
        (json.dumps({"table": "items", "key": {"id": 1}, "set": {"qty": 1}, "bogus": 1}),),
        (json.dumps({"table": "items", "set": {"qty": 1}, "all": True, "where": {"id": 1}}),),
    ):
        result = await cli("submit", *args, "--timeout", "60", **env)
        assert result.returncode == 2, result
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("update-worker: invalid job, not sent:"), result.stderr
    assert await redis.exists(f"{prefix}:jobs") == 0  # nothing was sent
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        with pytest.raises(InvalidJob, match="id"):
            await client.submit({"id": "bad id", "table": "items", "all": True, "set": {"qty": 1}})


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_commands_give_one_line_when_a_service_is_down(
    engine: AsyncEngine, database_url: str, prefix: str, tmp_path: Path
) -> None:
    del engine  # seeded: the shorthand reads the column types of `items`
    dead_redis = {"WORKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    dead_database = {
        "WORKER_DATABASE_URL": f"postgresql+asyncpg://u:secret@127.0.0.1:{free_port()}/x"
    }
    path = tmp_path / "jobs.jsonl"
    path.write_text("")
    env = settings_env(database_url, prefix)
    for args, broken, component in (
        (("stats",), dead_redis, "redis:"),
        (("dead", "list"), dead_redis, "redis:"),
        (("dead", "purge", "--all"), dead_redis, "redis:"),
        (("submit", "--table", "items", "--key", "id=1", "--set", "qty=1"), dead_redis, "redis:"),
        (("ledger", "prune"), dead_database, "database:"),
    ):
        result = await cli(*args, **{**env, **broken})
        assert result.returncode == 1, (args, result)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, lines)
        assert lines[0].startswith(f"update-worker: {component}"), (args, lines)
        assert "secret" not in result.stderr
