"""The limit line: a minimal worker that does only what update-worker's guarantees need.

``python -m bench.limit --database-url URL --redis-url URL --stream S`` serves the benchmark
job from one stream until SIGTERM: XREADGROUP a batch -> ``json.loads`` -> one transaction
holding the exactly-once ledger rows and the updates (one statement: the updates apply only for
the jobs whose ledger row is new) -> one pipeline that stores each reply, publishes it, and
XACKs and XDELs the entries, while the next batch's transaction runs. Raw asyncpg, redis-py with hiredis, uvloop.

It is a yardstick, not a worker: no validation beyond the JSON, no partitions, lanes, retries,
dead letters or metrics, and it knows the one job shape of the benchmark. What update-worker
reaches of its figure is the price of everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any

import asyncpg
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ResponseError

GROUP = "limit"
LEDGER = """CREATE TABLE IF NOT EXISTS limit_ledger (
  job_id text PRIMARY KEY, reply text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"""
APPLY = """
WITH fresh AS (
  INSERT INTO limit_ledger (job_id, reply) SELECT * FROM unnest($1::text[], $2::text[])
  ON CONFLICT DO NOTHING RETURNING job_id
), bumps AS (
  SELECT job.row_id, count(*) AS n
  FROM unnest($1::text[], $3::int[]) AS job(job_id, row_id) JOIN fresh USING (job_id)
  GROUP BY job.row_id
)
UPDATE counters SET n = counters.n + bumps.n FROM bumps WHERE counters.id = bumps.row_id
"""


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    redis = Redis.from_url(args.redis_url)
    database = await asyncpg.connect(args.database_url.replace("+asyncpg", ""))
    await database.execute(LEDGER)
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
        await redis.xgroup_create(args.stream, GROUP, id="0", mkstream=True)
    replying: asyncio.Task[None] | None = None  # a batch's replies, while the next one runs
    while not stop.is_set():
        read: Any = await redis.xreadgroup(GROUP, "limit", {args.stream: ">"}, count=args.batch,
                                           block=100)  # fmt: skip
        if not read:
            continue
        entries = read[0][1]
        ids, rows, replies = [], [], []
        for _, fields in entries:
            job = json.loads(fields[b"job"])
            ids.append(job["id"])
            rows.append(job["key"]["id"])
            replies.append(f'{{"id": "{job["id"]}", "status": "ok", "rowcount": 1}}')
        async with database.transaction():
            await database.execute(APPLY, ids, replies, rows)
        if replying is not None:
            await replying
        replying = asyncio.create_task(reply(redis, args.stream, entries, ids, replies))
    if replying is not None:
        await replying
    await database.close()
    await redis.aclose()


async def reply(
    redis: Redis, stream: str, entries: Any, ids: list[str], replies: list[str]
) -> None:
    """Store and publish each reply, then ack and delete the entries: one pipeline."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, answer in zip(ids, replies, strict=True):
            pipe.set(f"{stream}:result:{job_id}", answer, ex=86_400)
            pipe.publish(f"{stream}:replies", answer)
        entry_ids = [entry_id for entry_id, _ in entries]
        pipe.xack(stream, GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        await pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limit")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--batch", type=int, default=200)
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
