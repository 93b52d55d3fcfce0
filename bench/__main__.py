"""``make bench``: update-worker and the anchors (arq, SAQ, taskiq), side by side, same run.

The job: +1 on one of 10,000 rows by primary key through a SQLAlchemy AsyncSession.
- throughput: N jobs, timed from the first enqueue until every result is in;
- latency: sequential submit -> result round trips, p50 and p99.
update-worker runs with its default settings and the exactly-once ledger on: its producer
XADDs in pipelined chunks and counts the replies on the reply channel. Each anchor runs one
worker process with 10 concurrent jobs, from a virtual environment of its own
(``.venv-bench-<name>``; see ``bench/anchors.py``). Then update-worker alone: SQLite, 1, 2 and
4 worker processes on one group, the same on one Redis and on a Redis Cluster of three primaries
(``bench/cluster.py``), and its memory after 20,000 and 200,000 jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import uuid
from typing import Any

from bench.drain import drain_limit, drain_ours
from bench.ours import REDIS_URL, ROOT, ROWS, Ours, database, prepare, run_memory, run_ours

ANCHORS = ("arq", "saq", "taskiq")
#: The unit-of-work path on the same table, mapped with a validator (bench/models.py).
ORM_SETTINGS = {"WORKER_MODELS": "bench.models:Base", "WORKER_ORM": "always"}


def run_anchor(
    name: str, database_url: str, *, jobs: int, sequential: int, drain: int = 0
) -> dict[str, Any]:
    python = ROOT / f".venv-bench-{name}" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make bench`, which installs the anchors")
    command = [str(python), "-m", "bench.anchors", name, "--database-url", database_url,
               "--redis-url", REDIS_URL, "--prefix", f"anchor-{uuid.uuid4().hex[:8]}",
               "--jobs", str(jobs), "--sequential", str(sequential), "--drain", str(drain)]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


async def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--memory-jobs", type=int, default=200_000)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="parts to skip: drain anchors orm sqlite scaling cluster memory",
    )
    parser.add_argument("--drain-jobs", type=int, default=60_000)
    args = parser.parse_args()
    print(f"update-worker bench, {dt.date.today()}: {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, Redis and PostgreSQL on this machine")  # fmt: skip
    print(f"job: +1 on one of {ROWS:,} rows by key through an AsyncSession; throughput: {args.jobs} "
          f"jobs until every result is in; latency: {args.sequential} sequential round trips")  # fmt: skip
    print("update-worker: default settings, exactly-once ledger on; anchors: one worker process, "
          "10 concurrent jobs\n")  # fmt: skip
    if "drain" not in args.skip:
        await run_drains(args)
    rows: list[dict[str, Any]] = []
    async with database("postgresql") as url:
        rows.append(
            {
                "system": "update-worker (PostgreSQL)",
                **await run_ours(url, jobs=args.jobs, sequential=args.sequential),
            }
        )
        for name in () if "anchors" in args.skip else ANCHORS:
            await prepare(url)
            rows.append(
                await asyncio.to_thread(
                    run_anchor, name, url, jobs=args.jobs, sequential=args.sequential
                )
            )
    if "sqlite" not in args.skip:
        async with database("sqlite") as url:
            rows.append(
                {
                    "system": "update-worker (SQLite)",
                    **await run_ours(url, jobs=args.jobs, sequential=args.sequential),
                }
            )
    ours = rows[0]["throughput"]
    print(f"{'system':<28}{'jobs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ours/it':>11}")
    for row in rows:
        print(f"{row['system']:<28}{row['throughput']:>9.0f}{row['p50']:>9.2f}{row['p99']:>9.2f}"
              f"{ours / row['throughput']:>10.1f}x")  # fmt: skip
    scaling: dict[int, float] = {}
    if "scaling" not in args.skip:
        print(
            "\nupdate-worker, PostgreSQL, N worker processes on one consumer group (20,000 jobs):"
        )
        for processes in (1, 2, 4):
            async with database("postgresql") as url:
                result = await run_ours(url, jobs=20_000, sequential=2, processes=processes)
            scaling[processes] = result["throughput"]
            print(f"  {processes} process(es): {scaling[processes]:>6.0f} jobs/s")
    if "cluster" not in args.skip:
        from bench.cluster import run_cluster_bench

        print()
        await run_cluster_bench(20_000)
    if "memory" not in args.skip:
        async with database("postgresql") as url:
            memory = await run_memory(url, first=20_000, total=args.memory_jobs)
        growth = memory["rss_mb_after_total"] / memory["rss_mb_after_first"] - 1
        print(f"\nmemory, one worker: RSS {memory['rss_mb_after_first']:.1f} MB after 20,000 jobs, "
              f"{memory['rss_mb_after_total']:.1f} MB after {args.memory_jobs:,} ({growth:+.1%})")  # fmt: skip
    from bench.plot import plot

    picture = plot(rows, scaling, ROOT / "docs" / "benchmark.png")
    print(f"\nwrote {picture.relative_to(ROOT)}")


async def run_drains(args: argparse.Namespace) -> None:
    """The drains: each system's one worker process empties its own pre-filled queue."""
    jobs = args.drain_jobs
    print(f"drain: one worker process empties a queue pre-filled with {jobs:,} jobs; CPU per "
          "job from /proc (worker process, Redis server, every PostgreSQL process)")  # fmt: skip
    found: list[dict[str, Any]] = []
    async with database("postgresql") as url:
        await prepare(url)
        found.append({"system": "limit (bench/limit.py)",
                      **await drain_limit(url, REDIS_URL, jobs)})  # fmt: skip
        for direct, how in ((False, "ingest"), (True, "partitions")):
            await prepare(url)
            async with Ours(url) as ours:
                found.append({"system": f"update-worker, {how}",
                              **await drain_ours(ours, jobs, direct=direct)})  # fmt: skip
        if "orm" not in args.skip:  # the unit-of-work path (WORKER_ORM), same job
            await prepare(url)
            async with Ours(url, settings=ORM_SETTINGS) as ours:
                found.append({"system": "update-worker, ORM path",
                              **await drain_ours(ours, jobs // 4, direct=True)})  # fmt: skip
        for name in () if "anchors" in args.skip else ANCHORS:
            await prepare(url)
            found.append(await asyncio.to_thread(run_anchor, name, url, jobs=0, sequential=0,
                                                 drain=jobs))  # fmt: skip
    if "sqlite" not in args.skip:
        async with database("sqlite") as url:
            await prepare(url)
            async with Ours(url) as ours:
                found.append({"system": "update-worker (SQLite), ingest",
                              **await drain_ours(ours, jobs, direct=False)})  # fmt: skip
    limit = found[0]["throughput"]
    print(f"{'system':<34}{'jobs/s':>8}{'of limit':>10}{'worker':>9}{'redis':>8}{'postgres':>10}"
          "  (µs of CPU per job)")  # fmt: skip
    for row in found:
        cpu = "".join(f"{row[key]:>{width}.0f}" if key in row else f"{'-':>{width}}"
                      for key, width in (("worker_us", 9), ("redis_us", 8), ("postgres_us", 10)))  # fmt: skip
        count = row.get("missing") or 0  # negative: more applied than were sent
        missing = (f"  ({count:,} never applied)" if count > 0
                   else f"  ({-count:,} more applied than sent)" if count < 0 else "")  # fmt: skip
        print(f"{row['system']:<34}{row['throughput']:>8,.0f}{row['throughput'] / limit:>10.0%}"
              f"{cpu}{missing}")  # fmt: skip
    by_system = {row["system"]: row["throughput"] for row in found}
    if "arq" in by_system:
        print(
            f"update-worker (ingest) / arq: {by_system['update-worker, ingest'] / by_system['arq']:.1f}x"
        )
    print()


if __name__ == "__main__":
    asyncio.run(main())
