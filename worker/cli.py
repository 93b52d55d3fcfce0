"""The ``update-worker`` command line (DESIGN.md §8).

Every setting is also a flag on every command (``--redis-url``, ``--concurrency`` ...), read
through the same validation as the environment, so a bad value names its flag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from worker.client import UpdateClient
from worker.errors import InvalidJob, SettingsError, classify
from worker.job.json_schema import job_json_schema
from worker.ops import commands, logs, shorthand
from worker.ops.logs import mask_secrets
from worker.settings import Settings, field_infos, flag_name, load_settings, mask_url

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    flags = {name: getattr(args, name, None) for name in field_infos()}
    try:
        settings = load_settings(os.environ, flags)
        logs.configure(log_format=settings.log_format, level=settings.log_level)
        return int(args.handler(settings, args))
    except SettingsError as error:
        print(f"update-worker: {error}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidJob as error:
        print(f"update-worker: invalid job, not sent: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RedisError, SQLAlchemyError) as error:
        # An unreachable service: the one line `check` would give, not a traceback.
        print(f"update-worker: {unreachable(error)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def unreachable(error: BaseException) -> str:
    """One line naming the service that failed, with any password masked."""
    message = mask_secrets(classify(error).message)
    component = "redis" if isinstance(error, RedisError) else "database"
    return message if message.startswith(f"{component}:") else f"{component}: {message}"


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.service.startup import serve  # noqa: PLC0415 - keeps `schema` and `--help` fast

    try:
        with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
            runner.run(serve(settings, burst=args.burst))
    except (OSError, SQLAlchemyError, RedisError) as error:
        print(f"update-worker: cannot start: {mask_url(classify(error).message)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _fastest_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (``pip install 'update-worker[speed]'``):
    the worker spends less of its CPU in the loop and the socket writes. asyncio's own
    otherwise; both are correct."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _submit(settings: Settings, args: argparse.Namespace) -> int:
    if args.file is not None:
        if given := [flag for flag, value in (("a JSON job", args.job), ("--table", args.table),
                     ("--id", args.id), ("--dry-run", args.dry_run)) if value]:  # fmt: skip
            raise SettingsError(f"submit -f: {', '.join(given)} cannot be combined with a file; "
                                "each line is a whole job")  # fmt: skip
        return commands.submit_file(settings, args)
    if args.in_flight is not None:
        raise SettingsError("submit: --in-flight goes with -f (a file of jobs)")
    job = shorthand.job_from_args(settings, args)
    reply = asyncio.run(
        _submit_and_wait(settings, job, wait=not args.no_wait, timeout=args.timeout)
    )
    if reply is None:
        return EXIT_OK
    if isinstance(reply, str):
        print(f"update-worker: {reply}", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(reply))
    return EXIT_OK if reply.get("status") == "ok" else EXIT_FAILED


async def _submit_and_wait(
    settings: Settings, job: dict[str, Any], *, wait: bool, timeout: float
) -> dict[str, Any] | str | None:
    async with UpdateClient(
        await settings.redis(), prefix=settings.prefix, owns_redis=True
    ) as client:
        if not wait:
            job.setdefault("reply_to", client.names.replies)
            print(await client.submit(job))
            return None
        job_id = await client.submit(job)
        try:
            reply = await client.result(job_id, timeout=timeout)
        except TimeoutError as error:
            return str(error)
        return reply.model_dump(mode="json", exclude_none=True)


def _schema(_settings: Settings, _args: argparse.Namespace) -> int:
    print(json.dumps(job_json_schema(), indent=2))
    return EXIT_OK


def _demo(settings: Settings, _args: argparse.Namespace) -> int:
    from worker.demo import run_demo  # noqa: PLC0415 - only the demo needs it

    return asyncio.run(run_demo(settings))


def _web(settings: Settings, _args: argparse.Namespace) -> int:
    from worker.ops.web.app import serve_web  # noqa: PLC0415 - keeps the other commands fast

    with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
        runner.run(serve_web(settings))
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    settings_flags = argparse.ArgumentParser(add_help=False)
    group = settings_flags.add_argument_group(
        "settings (each also WORKER_<NAME> in the environment)"
    )
    for name, info in field_infos().items():
        default = info.get_default(call_default_factory=False)
        shown = mask_url(default) if isinstance(default, str) else default
        hint = f"{info.description} (env WORKER_{name.upper()}, default: {shown})"
        # SUPPRESS: a flag not given leaves no attribute, so a nested command (``dead purge``)
        # never overwrites one given before it (``dead --prefix x purge``).
        group.add_argument(flag_name(name), dest=name, metavar="VALUE", default=argparse.SUPPRESS,
                           help=hint.replace("%", "%%"))  # fmt: skip

    parser = argparse.ArgumentParser(
        prog="update-worker", description="Runs UPDATE jobs from a Redis stream."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[Settings, argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, parents=[settings_flags], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    run = command("run", _run, "run a worker until SIGTERM or SIGINT")
    run.add_argument("--burst", action="store_true", help="exit once the stream has nothing new")

    _submit_arguments(command("submit", _submit, "submit a job and print its reply"))
    command("schema", _schema, "print the JSON Schema of a job")

    text = ("exit 0 when Redis, the database, the group, the ledger and the deployment are in "
            "order; else one line per problem")  # fmt: skip
    check = command("check", commands.check, text)
    text = "also require this host's worker (WORKER_METRICS_PORT) to answer /readyz"
    check.add_argument("--local", action="store_true", help=text)
    text = "show the partition count; --set N changes it once nothing runs and all is drained"
    count = command("partitions", commands.partitions, text)
    count.add_argument("--set", type=_positive, metavar="N", help="the new partition count")
    stats = command("stats", commands.stats, "partitions, owners, pending, consumers, jobs/s")
    stats.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    stats.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")

    dead = command("dead", commands.dead, "list, show, replay or purge dead letters")
    actions = dead.add_subparsers(dest="action", required=True)
    for action, text in (
        ("list", "list dead letters, oldest first"),
        ("replay", "put jobs back on the job stream, under their own ids"),
        ("purge", "delete dead letters"),
    ):
        sub = actions.add_parser(action, parents=[settings_flags], help=text, description=text)
        if action != "list":
            sub.add_argument("letter_ids", nargs="*", metavar="LETTER_ID")
            sub.add_argument("--all", action="store_true", help="every dead letter")
        sub.add_argument("--reason", help="only letters with this reason")
        sub.add_argument("--older-than", metavar="DURATION", help="only letters older, e.g. 7d")
        if action == "list":
            sub.add_argument("--limit", type=int, default=50)
    show = actions.add_parser("show", parents=[settings_flags], help="one dead letter in full")
    show.add_argument("letter_id")

    ledger = command("ledger", commands.prune_ledger, "ledger housekeeping")
    ledger_actions = ledger.add_subparsers(dest="action", required=True)
    text = "delete ledger rows of jobs finished long ago"
    prune = ledger_actions.add_parser("prune", parents=[settings_flags], help=text)
    prune.add_argument("--older-than", metavar="DURATION",
                       help="e.g. 7d (default: WORKER_LEDGER_RETENTION)")  # fmt: skip
    command("demo", _demo, "run the seed scenario end to end on SQLite")
    command("web", _web, "serve the dashboard (WORKER_WEB_HOST:WORKER_WEB_PORT) until Ctrl-C")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _submit_arguments(submit: argparse.ArgumentParser) -> None:
    submit.add_argument("job", nargs="?", help="the job as JSON")
    submit.add_argument("--table")
    for field, hint in (
        ("set", "column=value"),
        ("inc", "column=number"),
        ("where", "column=value"),
        ("key", "column=value"),
    ):
        submit.add_argument(
            f"--{field}", action="append", metavar=hint, help=f"repeatable; {field} {hint}"
        )
    submit.add_argument("--returning", action="append", metavar="COLUMN")
    submit.add_argument(
        "--all", action="store_true", help="update every row (no filter), on purpose"
    )
    submit.add_argument("--dry-run", action="store_true", help="run, report, roll back")
    submit.add_argument("--id", help="idempotency key (default: the job's own, else a fresh one)")
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    submit.add_argument("--no-wait", action="store_true", help="enqueue only; print the job id(s)")
    submit.add_argument("-f", "--file", help="a JSONL file of jobs, one per line (- for stdin)")
    submit.add_argument("--in-flight", type=_positive, default=None, metavar="N",
                        help="with -f: most jobs awaiting a reply (default: 100)")  # fmt: skip
