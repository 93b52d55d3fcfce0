"""The operator's commands (DESIGN.md §8): check, stats, dead, ledger prune, submit -f.

Each handler takes the settings and the parsed arguments and returns the exit code; what it
prints goes to stdout, problems to stderr, always with passwords masked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.client import UpdateClient
from worker.db import ledger
from worker.db.engine import create_engine
from worker.durations import parse_duration
from worker.errors import SettingsError
from worker.ops import admin
from worker.ops.logs import mask_secrets
from worker.ops.snapshot import Snapshot, snapshot
from worker.ops.submitfile import Totals, submit_lines
from worker.settings import Settings, mask_url
from worker.stream import deadletters, deployment
from worker.stream.client import AnyRedis
from worker.stream.names import Names

EXIT_OK, EXIT_FAILED = 0, 1


@contextlib.asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[tuple[AnyRedis, AsyncEngine]]:
    redis = await settings.redis()
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        yield redis, engine
    finally:
        await redis.aclose()
        await engine.dispose()


def check(settings: Settings, args: argparse.Namespace) -> int:
    if args.local and settings.metrics_port is None:
        raise SettingsError("check --local: set WORKER_METRICS_PORT (the worker's /readyz port)")

    async def problems() -> list[str]:
        async with _services(settings) as (redis, engine):
            names = Names(settings.prefix)
            found = await admin.setup(redis, engine, names, settings.group,
                                      partitions=settings.partitions, deadline_s=5.0)  # fmt: skip
        port = settings.metrics_port
        if args.local and port and (problem := await admin.local_readiness(port, deadline_s=5)):
            found.append(problem)
        return found

    found = asyncio.run(problems())
    for problem in found:
        print(mask_secrets(problem), file=sys.stderr)
    if found:
        return EXIT_FAILED
    print(f"ok: redis {mask_url(settings.redis_url)}, database {mask_url(settings.database_url)}, "
          f"group {settings.group!r}, ledger")  # fmt: skip
    return EXIT_OK


def stats(settings: Settings, args: argparse.Namespace) -> int:
    async def show() -> None:
        names = Names(settings.prefix)
        redis = await settings.redis()
        try:
            before = await snapshot(redis, names, settings.group)
            await asyncio.sleep(min(args.interval, 1.0))
            now = await snapshot(redis, names, settings.group)
            if not args.watch:
                Console().print(_stats_table(settings, now, now.rate(before)))
                return
            with Live(_stats_table(settings, now, now.rate(before)), auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(args.interval)
                    before, now = now, await snapshot(redis, names, settings.group)
                    live.update(_stats_table(settings, now, now.rate(before)), refresh=True)
        finally:
            await redis.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(show())
    return EXIT_OK


def _stats_table(settings: Settings, now: Snapshot, rate: float) -> Group:
    oldest = now.oldest_pending_age_s
    title = f"update-worker: prefix {settings.prefix}, group {settings.group}"
    table = Table(show_header=False, title=title, title_justify="left")
    table.add_column("")
    table.add_column("", justify="right")
    for label, value in (
        ("backlog (all streams)", f"{now.stream_length:,}"),
        ("ingest, not yet moved", f"{now.ingest:,}"),
        ("pending", f"{now.pending:,}"),
        ("oldest pending", "-" if oldest is None else f"{oldest:.1f} s"),
        ("dead letters", f"{now.dead_letters:,}"),
        ("jobs/s", f"{rate:,.1f}"),
        ("consumers", str(len(now.consumers))),
    ):
        table.add_row(label, value)
    held: dict[str, list[int]] = {}
    for view in now.partitions:
        if view.owner:
            held.setdefault(view.owner, []).append(view.number)
    for consumer in now.consumers:
        state = "alive" if consumer.name in now.alive else "gone"
        owns = ",".join(map(str, held.get(consumer.name, []))) or "-"
        table.add_row(f"  {consumer.name}", f"{state}, {consumer.pending:,} pending, "
                      f"idle {consumer.idle_s:.1f} s, partitions {owns}")  # fmt: skip
    clustered = any(view.primary for view in now.partitions)
    columns = ["partition", "owner", "backlog", "pending", "oldest"]
    parts = Table(*columns, *(["primary"] if clustered else []), title="partitions",
                  title_justify="left")  # fmt: skip
    for view in now.partitions:
        stalled = view.owner is None or view.owner not in now.alive
        owner = f"[bold red]{view.owner or 'none'}[/]" if stalled else view.owner
        age = "-" if view.oldest_pending_age_s is None else f"{view.oldest_pending_age_s:.1f} s"
        parts.add_row(str(view.number), owner, f"{view.length:,}", f"{view.pending:,}", age,
                      *([view.primary or "?"] if clustered else []))  # fmt: skip
    return Group(table, parts)


def partitions(settings: Settings, args: argparse.Namespace) -> int:
    """Show the recorded partition count, or change it (``--set N``) once nothing runs and
    every stream is drained: moving a job to another partition mid-flight would break order."""

    async def run() -> int:
        names = Names(settings.prefix)
        redis = await settings.redis()
        try:
            recorded = await deployment.recorded_partitions(redis, names)
            if args.set is None:
                print(f"{recorded if recorded is not None else 'no'} partitions recorded in "
                      f"{names.meta} (WORKER_PARTITIONS={settings.partitions})")  # fmt: skip
                return EXIT_OK
            live = [record.consumer for record in await deployment.records(redis, names)
                    if record.live]  # fmt: skip
            length, pending, _ = await admin.backlog(redis, names, settings.group,
                                                     recorded or 0)  # fmt: skip
            if live or length or pending:
                print(f"partitions --set: refused: {len(live)} live worker(s), {length:,} "
                      f"entr(y/ies) in the streams, {pending:,} pending; stop the workers "
                      "and let the streams drain first", file=sys.stderr)  # fmt: skip
                return EXIT_FAILED
            await redis.hset(names.meta, deployment.PARTITIONS, args.set)
            print(f"partitions: {recorded} -> {args.set}; start the workers with "
                  f"WORKER_PARTITIONS={args.set}")  # fmt: skip
            return EXIT_OK
        finally:
            await redis.aclose()

    return asyncio.run(run())


def dead(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_dead(settings, args))


async def _dead(settings: Settings, args: argparse.Namespace) -> int:
    names = Names(settings.prefix)
    redis = await settings.redis()
    try:
        if args.action == "show":
            letter = await deadletters.find(redis, names, args.letter_id)
            if letter is None:
                print(f"no dead letter {args.letter_id}", file=sys.stderr)
                return EXIT_FAILED
            print(json.dumps({"id": letter.id, **letter.fields}, indent=2, ensure_ascii=False))
            return EXIT_OK
        older = _duration(args.older_than).total_seconds() if args.older_than else None
        chosen = [
            letter
            async for letter in deadletters.letters(redis, names)
            if deadletters.matches(letter, reason=args.reason, older_than_s=older)
            and (not getattr(args, "letter_ids", None) or letter.id in args.letter_ids)
        ]
        if args.action == "list":
            # The letter id is what `dead show/replay/purge` take: never cut, however narrow.
            table = Table("letter", "failed at (UTC)", "reason", "job id", "error")
            table.columns[0].no_wrap = table.columns[1].no_wrap = True
            table.columns[0].min_width = max((len(letter.id) for letter in chosen), default=6)
            for letter in chosen[: args.limit]:
                failed_at = dt.datetime.fromtimestamp(letter.failed_at_ms / 1000, dt.UTC)
                table.add_row(letter.id, failed_at.strftime("%Y-%m-%d %H:%M:%S"), letter.reason,
                              letter.job_id, letter.error[:80])  # fmt: skip
            Console().print(table)
            print(f"{len(chosen)} dead letter(s)" + (" shown" if len(chosen) <= args.limit else
                  f", first {args.limit} shown"))  # fmt: skip
            return EXIT_OK
        if not (args.all or args.reason or args.older_than or getattr(args, "letter_ids", None)):
            print(f"dead {args.action}: name letters, or choose with --reason, --older-than "
                  "or --all", file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
        if args.action == "purge":
            print(f"purged {await deadletters.purge(redis, names, chosen)} dead letter(s)")
            return EXIT_OK
        replayable = [letter for letter in chosen if letter.replayable()]
        for letter, entry_id in await deadletters.replay(redis, names, replayable):
            print(f"replayed {letter.id} as entry {entry_id} (job {letter.job_id})")
        if skipped := len(chosen) - len(replayable):
            print(f"{skipped} letter(s) carry no job to replay (kept)", file=sys.stderr)
        return EXIT_OK
    finally:
        await redis.aclose()


def prune_ledger(settings: Settings, args: argparse.Namespace) -> int:
    older_than = _duration(args.older_than or settings.ledger_retention)
    if not older_than:
        print("ledger prune: --older-than must be more than 0", file=sys.stderr)
        return EXIT_FAILED

    async def prune() -> int:
        async with _services(settings) as (_redis, engine):
            return await ledger.prune(engine, older_than=older_than)

    print(f"pruned {asyncio.run(prune()):,} ledger row(s) older than {older_than}")
    return EXIT_OK


def _duration(text: str) -> dt.timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise SettingsError(f"--older-than: {error}") from None


def submit_file(settings: Settings, args: argparse.Namespace) -> int:
    path = Path(args.file)
    lines = (sys.stdin if args.file == "-" else path.open(encoding="utf-8")).read().splitlines()

    async def send() -> Totals:
        async with UpdateClient(
            await settings.redis(), prefix=settings.prefix, owns_redis=True
        ) as client:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())  # fmt: skip
            with Progress(*columns, console=Console(stderr=True)) as progress:
                task = progress.add_task("jobs", total=len(lines))
                return await submit_lines(client, lines, in_flight=args.in_flight or 100,
                                          wait=not args.no_wait, timeout=args.timeout,
                                          advance=lambda: progress.advance(task))  # fmt: skip

    totals = asyncio.run(send())
    if args.no_wait:
        print(f"enqueued {totals.sent:,} job(s); not waiting for replies")
    else:
        statuses = ", ".join(
            f"{count:,} {status}" for status, count in sorted(totals.statuses.items())
        )
        print(f"{totals.sent:,} job(s) sent, {totals.unsent:,} line(s) not sent: {statuses}")
    for code, count in totals.codes.most_common():
        print(f"  {code:<22}{count:>8,}")
    for line, job_id, code, message in totals.failures:
        print(f"line {line}: {job_id or '-'}: {code}: {message}", file=sys.stderr)
    return EXIT_FAILED if totals.failed else EXIT_OK
