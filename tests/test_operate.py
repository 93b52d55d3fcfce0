"""Operating it: metrics and health over HTTP, check, stats, dead letters, submit -f, ledger
prune and log lines, against the real Redis and both databases."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
from typing import Any

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory, eventually
from tests.tables import items
from tests.test_cli import CLI, ROOT, clean_env, free_port
from worker.client import UpdateClient
from worker.db.ledger import ensure_ledger, ledger, prune
from worker.ops import admin
from worker.ops.health import Probes, serve_http
from worker.ops.metrics import Metrics
from worker.stream import deployment
from worker.stream.names import Names


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text, or 0 when it is absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        found = re.fullmatch(rf"{name}(?:\{{(.*)\}})?", series)
        if found and ",".join(sorted((found[1] or "").split(","))) == wanted:
            return float(value)
    return 0.0


async def cli(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], capture_output=True, text=True, timeout=120,
        env=clean_env(**settings), cwd=ROOT, check=False,
    )  # fmt: skip


async def test_metrics_and_health_after_real_jobs(
    start_worker: WorkerFactory, redis: Redis, prefix: str
) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        for number in (1, 2, 3):
            reply = await client.update("items", inc={"qty": 1}, key={"id": number})
            assert reply.rowcount == 1
        refused = await client.update("items", set={"qty": 0})
        assert refused.error is not None
        assert refused.error.code == "missing_filter"
        await redis.xadd(f"{prefix}:jobs", {"job": b"{not json"})
        await eventually(lambda: redis.xlen(f"{prefix}:dead"))
    status, text = await http_get(port, "/metrics")
    assert status == 200
    assert sample(text, "update_worker_jobs_total", status="ok", table="items") == 3
    assert sample(text, "update_worker_jobs_total", status="missing_filter", table="items") == 1
    assert sample(text, "update_worker_jobs_total", status="invalid_job", table="(none)") == 1
    assert sample(text, "update_worker_rows_updated_total", table="items") == 3
    assert sample(text, "update_worker_dead_letters_total", reason="unparsable") == 1
    assert sample(text, "update_worker_job_duration_seconds_count", phase="execution") == 4
    assert sample(text, "update_worker_job_duration_seconds_count", phase="queue") == 4
    assert sample(text, "update_worker_stream_length") == 0
    assert sample(text, "update_worker_pending_entries") == 0
    assert sample(text, "update_worker_in_flight_jobs") == 0
    assert "update_worker_retries_total" in text
    assert (await http_get(port, "/healthz"))[0] == 200
    assert await http_get(port, "/readyz") == (200, "ready\n")


async def test_health_endpoints_fail_with_the_reason() -> None:
    async def broken() -> list[str]:
        return ["database: connection refused"]

    async def backlog() -> tuple[int, int, int]:
        return 7, 2, 1

    metrics, port = Metrics(), free_port()
    server = await serve_http(port, metrics, Probes(broken, backlog, liveness_s=5))
    try:
        assert await http_get(port, "/readyz") == (503, "database: connection refused\n")
        assert (await http_get(port, "/healthz"))[0] == 200
        metrics.last_turn -= 60  # the loop stopped turning a minute ago
        status, body = await http_get(port, "/healthz")
        assert (status, body.startswith("stuck: the loop has not turned for 6")) == (503, True)
        text = (await http_get(port, "/metrics"))[1]
        assert (
            sample(text, "update_worker_stream_length"),
            sample(text, "update_worker_pending_entries"),
        ) == (7, 2)
        assert await http_get(port, "/nope") == (
            404,
            "not found: try /metrics, /healthz or /readyz\n",
        )
        # What `check --local` (the compose healthcheck) says of it.
        assert await admin.local_readiness(port, deadline_s=5) == (
            f"worker: /readyz on :{port} answered 503 Service Unavailable: "
            "database: connection refused"
        )
    finally:
        await server.close()
    gone = await admin.local_readiness(port, deadline_s=5)
    assert gone is not None
    assert gone.startswith(f"worker: no worker answers /readyz on :{port} (")


async def test_check_names_each_missing_piece(
    start_worker: WorkerFactory, database_url: str, prefix: str
) -> None:
    settings = {
        "WORKER_REDIS_URL": REDIS_URL,
        "WORKER_DATABASE_URL": database_url,
        "WORKER_PREFIX": prefix,
    }
    before = await cli("check", **settings)
    assert before.returncode == 1
    assert [line.split(":")[0] for line in before.stderr.splitlines()] == ["group", "ledger"]
    await start_worker()  # creates the group and the ledger
    after = await cli("check", **settings)
    assert (after.returncode, after.stdout.startswith("ok: redis")) == (0, True), after.stderr


async def test_dead_letter_round_trip_applies_once(
    start_worker: WorkerFactory, engine: AsyncEngine, redis: Redis, database_url: str, prefix: str
) -> None:
    # Too big for a worker with a small limit: dead-lettered, never run.
    job = {"id": "poison-1", "table": "items", "inc": {"qty": 100}, "key": {"id": 2}}
    body = json.dumps(job) + " " * 300  # valid JSON, over the first worker's limit
    settings = {
        "WORKER_REDIS_URL": REDIS_URL,
        "WORKER_DATABASE_URL": database_url,
        "WORKER_PREFIX": prefix,
    }
    small = await asyncio.create_subprocess_exec(
        *CLI, "run", env=clean_env(**settings, WORKER_MAX_JOB_BYTES="256")
    )
    await redis.xadd(f"{prefix}:jobs", {"job": body})
    await eventually(lambda: redis.xlen(f"{prefix}:dead"), timeout=30)
    small.terminate()
    assert await small.wait() == 0
    settings = {
        "WORKER_REDIS_URL": REDIS_URL,
        "WORKER_DATABASE_URL": database_url,
        "WORKER_PREFIX": prefix,
    }
    listed = await cli("dead", "list", **settings)
    assert "unparsable" in listed.stdout, listed.stdout
    assert "1 dead letter(s) shown" in listed.stdout
    letters: Any = await redis.xrange(f"{prefix}:dead")
    ((letter_id, fields),) = letters
    shown = json.loads((await cli("dead", "show", letter_id.decode(), **settings)).stdout)
    assert shown["job"] == body
    await redis.xadd(f"{prefix}:dead", fields)  # a doubled letter: replaying both must apply once
    await start_worker(max_job_bytes=65536)
    replayed = await cli("dead", "replay", "--all", **settings)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.count("replayed ") == 2
    await eventually(lambda: redis.exists(f"{prefix}:result:poison-1"))
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        reply = await client.result("poison-1", timeout=20)
    assert (reply.status, reply.rowcount) == ("ok", 1)

    async def settled() -> bool:
        pending = await redis.xpending(f"{prefix}:jobs", "update-workers")
        return int(pending["pending"]) == 0 and await redis.xlen(f"{prefix}:jobs") == 0

    await eventually(settled)
    async with engine.connect() as connection:
        qty = (await connection.execute(sa.select(items.c.qty).where(items.c.id == 2))).scalar()
    assert qty == 100  # 0 + 100, once
    assert await redis.xlen(f"{prefix}:dead") == 0
    purged = await cli("dead", "purge", **settings)
    assert purged.returncode == 1  # purge without a filter refuses


async def test_dead_purge_by_reason_and_age(redis: Redis, prefix: str) -> None:
    old_ms = int((dt.datetime.now(dt.UTC) - dt.timedelta(days=10)).timestamp() * 1000)
    for reason, failed_at in (
        ("unparsable", old_ms),
        ("unparsable", None),
        ("max_deliveries", old_ms),
    ):
        letter: Any = {"reason": reason, "entry_id": "1-0", "job": "{}"}
        if failed_at is not None:
            letter["failed_at_ms"] = failed_at
        await redis.xadd(f"{prefix}:dead", letter)
    settings = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_PREFIX": prefix}
    purged = await cli("dead", "purge", "--reason", "unparsable", "--older-than", "7d", **settings)
    assert purged.stdout.strip() == "purged 1 dead letter(s)"
    left: Any = await redis.xrange(f"{prefix}:dead")
    remaining = [fields[b"reason"] for _, fields in left]
    assert remaining == [b"unparsable", b"max_deliveries"]


async def test_submit_file_of_a_thousand_mixed_jobs_prints_correct_totals(
    start_worker: WorkerFactory, database_url: str, prefix: str, tmp_path: Any
) -> None:
    await start_worker()
    lines = []
    for number in range(1000):
        kind = number % 10
        if kind < 7:
            lines.append(
                json.dumps({"table": "items", "inc": {"qty": 1}, "key": {"id": number % 4 + 1}})
            )
        elif kind == 7:
            lines.append(json.dumps({"table": "items", "set": {"qty": 1}}))  # missing_filter
        elif kind == 8:
            lines.append(
                json.dumps({"table": "nope", "set": {"a": 1}, "all": True})
            )  # unknown_table
        else:
            lines.append("{this is not json")
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    settings = {
        "WORKER_REDIS_URL": REDIS_URL,
        "WORKER_DATABASE_URL": database_url,
        "WORKER_PREFIX": prefix,
    }
    result = await cli("submit", "-f", str(path), "--in-flight", "50", **settings)
    assert result.returncode == 1  # some failed
    assert "900 job(s) sent, 100 line(s) not sent: 300 error, 700 ok" in result.stdout, (
        result.stdout
    )
    codes = dict(re.findall(r"^  (\w+)\s+([\d,]+)$", result.stdout, re.MULTILINE))
    assert codes == {"missing_filter": "100", "unknown_table": "100", "invalid_job": "100"}
    good = await cli("submit", "-f", str(path), "--no-wait", **settings)
    assert "enqueued 900 job(s)" in good.stdout


async def test_ledger_prune_removes_only_old_rows(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await ensure_ledger(connection)
        now = dt.datetime.now(dt.UTC)
        await connection.execute(ledger.insert(), [
            {"job_id": f"old-{n}", "payload_hash": "h", "reply": "{}", "finished_at": now - dt.timedelta(days=8)}
            for n in range(7)
        ] + [{"job_id": "new", "payload_hash": "h", "reply": "{}", "finished_at": now}])  # fmt: skip
    assert await prune(engine, older_than=dt.timedelta(days=7), batch=3) == 7
    async with engine.connect() as connection:
        assert list((await connection.execute(sa.select(ledger.c.job_id))).scalars()) == ["new"]


async def test_json_log_lines_parse_and_never_show_a_password(
    engine: AsyncEngine, database_url: str, prefix: str, tmp_path: Any
) -> None:
    del engine  # seeded before the worker reflects
    redis_port = free_port()
    command = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
               "--requirepass", "hunter2", "--dir", str(tmp_path)]  # fmt: skip
    server = subprocess.Popen(command)  # noqa: ASYNC220 - started here, stopped in finally
    redis_url = f"redis://:hunter2@127.0.0.1:{redis_port}/0"
    try:
        env = clean_env(WORKER_REDIS_URL=redis_url, WORKER_DATABASE_URL=database_url, WORKER_PREFIX=prefix,
                        WORKER_LOG_FORMAT="json", WORKER_BLOCK_MS="200",
                        WORKER_LOG_LEVEL="DEBUG")  # fmt: skip
        await asyncio.sleep(0.3)
        worker = await asyncio.create_subprocess_exec(
            *CLI, "run", env=env, stderr=asyncio.subprocess.PIPE
        )
        async with UpdateClient(redis_url, prefix=prefix) as client:
            reply = await client.update(
                "items", inc={"qty": 1}, key={"id": 1}, id="logged-1", timeout=30
            )
        assert reply.status == "ok"
        worker.terminate()
        _, stderr = await worker.communicate()
        wrong = await cli("check", WORKER_REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0",
                          WORKER_DATABASE_URL=database_url)  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)
    output = stderr.decode()
    lines = [json.loads(line) for line in output.splitlines()]  # every line is one JSON object
    (job,) = [line for line in lines if line.get("job_id") == "logged-1"]
    assert {key: job[key] for key in ("table", "status", "rowcount", "attempt")} == {
        "table": "items", "status": "ok", "rowcount": 1, "attempt": 1}  # fmt: skip
    assert job["duration_ms"] >= 0
    assert job["level"] == "DEBUG"  # one line per job only when asked for
    # At INFO, a summary: every SUMMARY_S, and a last one when the worker stops.
    summaries = [line for line in lines if line["level"] == "INFO" and "answered" in line]
    assert summaries[-1]["statuses"] == {"ok": 1}, summaries
    assert any(":***@127.0.0.1" in line["message"] for line in lines)  # the start-up line, masked
    assert wrong.returncode == 1
    assert "hunter2" not in output + wrong.stdout + wrong.stderr


async def test_stats_shows_backlog_pending_consumers_partitions_and_dead_letters(
    redis: Redis, prefix: str
) -> None:
    names = Names(prefix)
    await deployment.record_partitions(redis, names, 4)
    await redis.xadd(names.stream, {"job": "{}"})  # one not moved yet
    for number in (1, 2):
        stream = names.partition(number)
        await redis.xgroup_create(stream, "update-workers", id="0", mkstream=True)
        for _ in range(2):
            await redis.xadd(stream, {"job": json.dumps({"table": "items", "all": True,
                                                         "set": {"qty": 0}})})  # fmt: skip
    await redis.xreadgroup("update-workers", "busy-consumer", {names.partition(1): ">"}, count=2)
    await redis.xreadgroup("update-workers", "live-consumer", {names.partition(2): ">"}, count=1)
    await redis.xadd(f"{prefix}:dead", {"reason": "unparsable", "entry_id": "1-0"})
    offer = deployment.Offer(tables={}, settings={})
    await deployment.announce(redis, names, "live-consumer", offer)
    await redis.set(names.owner(2), "live-consumer", px=10_000)
    await redis.set(names.owner(1), "busy-consumer", px=10_000)  # a lease, but no live worker
    result = await cli(
        "stats", "--interval", "0.2", WORKER_REDIS_URL=REDIS_URL, WORKER_PREFIX=prefix
    )
    assert result.returncode == 0, result.stderr
    rows = {cells[0]: cells[1:] for line in result.stdout.splitlines()
            if len(cells := [cell.strip() for cell in line.strip("│┃ ").split("│")]) >= 2}  # fmt: skip
    assert rows["backlog (all streams)"] == ["5"]
    assert rows["ingest, not yet moved"] == ["1"]
    assert (rows["pending"], rows["dead letters"], rows["consumers"]) == (["3"], ["1"], ["2"])
    assert rows["oldest pending"][0].endswith(" s")
    # A consumer is alive while its worker's deployment record is fresh.
    assert rows["busy-consumer"][0].startswith("gone, 2 pending")
    assert rows["live-consumer"][0].startswith("alive, 1 pending")
    assert rows["live-consumer"][0].endswith("partitions 2")
    # The partitions: owner, backlog, pending; one without a live owner stands out.
    assert rows["1"] == ["busy-consumer", "2", "2", rows["1"][3]]
    assert rows["2"][:3] == ["live-consumer", "2", "1"]
    assert rows["0"][:3] == ["none", "0", "0"]


async def test_nested_commands_take_settings_flags_and_refuse_a_bad_duration(
    redis: Redis, prefix: str
) -> None:
    await redis.xadd(f"{prefix}:dead", {"reason": "max_deliveries", "entry_id": "1-0", "job": "{}"})
    listed = await cli("dead", "list", "--prefix", prefix, "--redis-url", REDIS_URL)
    assert "1 dead letter(s) shown" in listed.stdout, listed.stderr
    before = await cli("dead", "--prefix", prefix, "list", "--redis-url", REDIS_URL)
    assert "1 dead letter(s) shown" in before.stdout, before.stderr
    bad = await cli(
        "dead", "purge", "--older-than", "7x", "--prefix", prefix, "--redis-url", REDIS_URL
    )
    assert (bad.returncode, "--older-than" in bad.stderr) == (2, True)
    assert await redis.xlen(f"{prefix}:dead") == 1
