"""The compose stack, without Docker: the file validates, and its worker runs exactly as compose
would run it (same command, same environment, its healthcheck as the readiness gate, two
replicas), with the service hostnames mapped to the local Redis and PostgreSQL.

Three things differ from compose, each for isolation on a shared machine: the database gets a
name of its own, the Redis names a prefix of their own, and each replica a free metrics port.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, REDIS_URL, eventually
from tests.test_cli import ROOT, clean_env, free_port
from tests.test_operate import http_get, sample

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
#: The console script, as the image's ENTRYPOINT names it.
UPDATE_WORKER = str(Path(sys.executable).with_name("update-worker"))


def test_compose_file_is_valid_with_and_without_its_profiles() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is needed (apt-get install docker-compose)"
    for profile in ([], ["--profile", "prometheus"], ["--profile", "web"]):
        result = subprocess.run([compose, *profile, "config", "--quiet"], cwd=ROOT,
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
    services = COMPOSE["services"]
    assert set(services) == {"redis", "postgres", "seed", "worker", "prometheus", "web", "producer"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "update-worker", "check", "--local"]
    assert services["prometheus"]["profiles"] == ["prometheus"]
    assert services["web"]["profiles"] == ["web"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"


@pytest.fixture
async def compose_database() -> AsyncIterator[str]:
    """An empty database seeded by the compose stack's own deploy/seed.sql; its name."""
    name = f"updates_{uuid.uuid4().hex[:8]}"
    admin = (
        make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    connection = await asyncpg.connect(admin)
    await connection.execute(f'CREATE DATABASE "{name}"')
    await connection.close()
    seeded = await asyncpg.connect(
        make_url(admin).set(database=name).render_as_string(hide_password=False)
    )
    await seeded.execute((ROOT / "deploy" / "seed.sql").read_text())
    await seeded.close()
    yield name
    connection = await asyncpg.connect(admin)
    await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await connection.close()


def compose_environment(database: str, prefix: str) -> dict[str, str]:
    """The worker service's environment, with the hostnames mapped to the local services."""
    environment = {
        name: str(value) for name, value in COMPOSE["services"]["worker"]["environment"].items()
    }
    redis = make_url(REDIS_URL.replace("redis://", "postgresql://"))  # just to read host and port
    environment["WORKER_REDIS_URL"] = environment["WORKER_REDIS_URL"].replace(
        "//redis:6379", f"//{redis.host}:{redis.port}")  # fmt: skip
    database_url = make_url(environment["WORKER_DATABASE_URL"]).set(
        host="127.0.0.1", database=database
    )
    environment["WORKER_DATABASE_URL"] = database_url.render_as_string(hide_password=False)
    environment["WORKER_PREFIX"] = prefix
    return environment


async def test_the_worker_runs_as_compose_runs_it(
    compose_database: str, redis: Redis, prefix: str
) -> None:
    service = COMPOSE["services"]["worker"]
    environment = compose_environment(compose_database, prefix)
    ports = [free_port() for _ in range(service["deploy"]["replicas"])]
    replicas = [
        await asyncio.create_subprocess_exec(
            UPDATE_WORKER, *service["command"],
            env=clean_env(**{**environment, "WORKER_METRICS_PORT": str(port)}),
            stderr=asyncio.subprocess.PIPE,
        )
        for port in ports
    ]  # fmt: skip
    try:
        healthcheck = service["healthcheck"]["test"][1:]  # after "CMD"
        assert healthcheck[0] == "update-worker"

        async def healthy(port: int) -> bool:
            # Run as it runs inside that replica's container: with that replica's own port.
            own = clean_env(**{**environment, "WORKER_METRICS_PORT": str(port)})
            result = await asyncio.to_thread(
                subprocess.run, [UPDATE_WORKER, *healthcheck[1:]], env=own,
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            return result.returncode == 0

        # A replica is healthy only once its own worker answers: `check` alone passed as soon
        # as any worker had created the group, and the test then raced the other replica.
        for port in ports:
            await eventually(functools.partial(healthy, port), timeout=30)
        # The producer service's own two jobs, read out of its command.
        script = "\n".join(COMPOSE["services"]["producer"]["command"])
        jobs = re.findall(r"job '(\{.*\})'", script)
        assert len(jobs) == 2
        for job in jobs:
            await redis.xadd(f"{prefix}:jobs", {"job": job})
        replies: list[Any] = []
        for job in jobs:
            key = f"{prefix}:result:{json.loads(job)['id']}"
            stored: Any = await eventually(functools.partial(redis.get, key), timeout=30)
            replies.append(json.loads(stored))
        assert [(reply["status"], reply["rowcount"]) for reply in replies] == [("ok", 1), ("ok", 3)]
        scraped = [await http_get(port, "/metrics") for port in ports]
        assert sum(sample(text, "update_worker_jobs_total", status="ok", table=table)
                   for _, text in scraped for table in ("users", "books")) == 2  # fmt: skip
        assert all([(await http_get(port, "/readyz"))[0] == 200 for port in ports])
    finally:
        for replica in replicas:
            if replica.returncode is None:
                replica.terminate()
        codes = [await replica.wait() for replica in replicas]
    outputs = [(await replica.stderr.read()).decode() for replica in replicas if replica.stderr]
    assert codes == [0, 0], outputs
    for output in outputs:  # WORKER_LOG_FORMAT=json, as in compose: every line one object
        assert all(json.loads(line) for line in output.splitlines())
        assert ":postgres@" not in output  # the password in the URL is masked


async def test_the_dashboard_runs_as_compose_runs_it(compose_database: str, prefix: str) -> None:
    """The web service's command and environment, on a free port; its healthcheck passes."""
    service = COMPOSE["services"]["web"]
    own = {name: str(value) for name, value in service["environment"].items() if value is not None}
    environment = {**own, **compose_environment(compose_database, prefix)}  # hosts mapped
    environment["WORKER_WEB_HOST"] = "127.0.0.1"  # 0.0.0.0 in the container; local here
    environment["WORKER_WEB_PORT"] = str(free_port())
    web = await asyncio.create_subprocess_exec(
        UPDATE_WORKER, *service["command"], env=clean_env(**environment),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        check = service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"]

        async def healthy() -> bool:
            result = await asyncio.to_thread(
                subprocess.run, [sys.executable, *check[2:]], env=clean_env(**environment),
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            return result.returncode == 0

        await eventually(healthy, timeout=30)
        status, page = await http_get(int(environment["WORKER_WEB_PORT"]), "/")
        assert status == 200
        assert 'id="read-only"' in page  # no token in the compose file itself
    finally:
        web.terminate()
        _, stderr = await web.communicate()
    assert web.returncode == 0, stderr.decode()
