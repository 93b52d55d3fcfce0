"""Settings from an injected environment, and the one error classification."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import redis.exceptions
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

from worker import errors
from worker.errors import SettingsError, classify
from worker.settings import load_settings, mask_url


def test_settings_come_from_the_given_mapping_only() -> None:
    settings = load_settings({
        "WORKER_CONCURRENCY": "3", "WORKER_TABLES": "books, users", "WORKER_PREFIX": "{orders}",
        "HOME": "/ignored",
    })  # fmt: skip
    assert settings.concurrency == 3
    assert settings.tables == ("books", "users")
    assert settings.prefix == "{orders}"
    assert settings.group == "update-workers"
    assert settings.result_ttl == 86_400


def test_flags_override_the_environment() -> None:
    settings = load_settings({"WORKER_CONCURRENCY": "3"}, {"concurrency": "5", "batch_size": None})
    assert settings.concurrency == 5
    assert settings.batch_size == 400


@pytest.mark.parametrize(
    ("environ", "flags", "named"),
    [
        ({"WORKER_CONCURRENCY": "many"}, {}, "WORKER_CONCURRENCY"),
        ({"WORKER_CONCURRENCY": "0"}, {}, "WORKER_CONCURRENCY"),
        ({}, {"concurrency": "x"}, "--concurrency"),
        ({"WORKER_CONCURENCY": "3"}, {}, "WORKER_CONCURENCY: unknown setting"),
        ({"WORKER_DATABASE_URL": "mysql://u:secret@h/db"}, {}, "WORKER_DATABASE_URL"),
        ({"WORKER_LOG_FORMAT": "xml"}, {}, "WORKER_LOG_FORMAT"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    environ: dict[str, str], flags: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ, flags)
    message = str(caught.value)
    assert message.startswith(named)
    assert "\n" not in message
    assert "secret" not in message


def test_urls_are_masked_everywhere_they_are_shown() -> None:
    assert mask_url("redis://user:s3cret@host:6380/0") == "redis://user:***@host:6380/0"
    assert mask_url("postgresql+asyncpg://u:pw@db/x") == "postgresql+asyncpg://u:***@db/x"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    settings = load_settings({"WORKER_REDIS_URL": "redis://u:s3cret@h:1/0"})
    assert "s3cret" not in repr(settings)
    sentinels = "redis://:s3cret@a:26379,redis://:s3cret@b:26379"
    assert mask_url(sentinels) == "redis://:***@a:26379,redis://:***@b:26379"
    assert "s3cret" not in repr(load_settings({"WORKER_REDIS_SENTINELS": sentinels}))
    assert mask_url("redis://:s3cret@h:port/0") == "<unparsable url>"


class _AsyncpgLike(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def _dbapi(
    orig: BaseException, kind: type[sa_exc.DBAPIError] = sa_exc.DBAPIError
) -> sa_exc.DBAPIError:
    return kind("UPDATE t SET a=1", {}, orig)


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        # asyncpg deadlocks and serialization failures arrive as plain DBAPIError + sqlstate.
        (_dbapi(_AsyncpgLike("40P01")), "unavailable", True),
        (_dbapi(_AsyncpgLike("40001")), "unavailable", True),
        (_dbapi(_AsyncpgLike("57P01")), "unavailable", True),
        (_dbapi(_AsyncpgLike("57P02")), "unavailable", True),
        (_dbapi(_AsyncpgLike("57P03")), "unavailable", True),
        (_dbapi(_AsyncpgLike("55P03")), "unavailable", True),  # lock_timeout
        (_dbapi(_AsyncpgLike("08006")), "unavailable", True),
        (_dbapi(_AsyncpgLike("57014")), "timeout", False),
        (_dbapi(_AsyncpgLike("23505"), sa_exc.IntegrityError), "integrity_error", False),
        (_dbapi(_AsyncpgLike("22P02"), sa_exc.DataError), "data_error", False),
        (
            _dbapi(sqlite3.OperationalError("database is locked"), sa_exc.OperationalError),
            "unavailable",
            True,
        ),
        (
            _dbapi(sqlite3.IntegrityError("NOT NULL constraint failed"), sa_exc.IntegrityError),
            "integrity_error",
            False,
        ),
        (_dbapi(_AsyncpgLike("42601")), "internal", False),
        (redis.exceptions.ConnectionError("gone"), "unavailable", True),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), "unavailable", True),
        # A Redis Cluster or Sentinel failing over: each passes once it has settled.
        (redis.exceptions.MovedError("3999 127.0.0.1:7002"), "unavailable", True),
        (
            redis.exceptions.TryAgainError("Multiple keys request during rehashing"),
            "unavailable",
            True,
        ),
        (redis.exceptions.ClusterDownError("The cluster is down"), "unavailable", True),
        (
            redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
            "unavailable",
            True,
        ),
        (
            redis.exceptions.ResponseError(
                "UNBLOCKED force unblock from blocking operation, "
                "instance state changed (master -> replica?)"
            ),
            "unavailable",
            True,
        ),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), "internal", False),
        (
            redis.exceptions.ResponseError("CROSSSLOT Keys in request don't hash to the same slot"),
            "internal",
            False,
        ),
        (ConnectionRefusedError(111, "refused"), "unavailable", True),
        # A version counter saw another writer: load again (the unit-of-work path).
        (
            orm_exc.StaleDataError(
                "UPDATE statement on table 'members' expected to update 1 row(s)"
            ),
            "unavailable",
            True,
        ),
        (TimeoutError(), "timeout", False),
        (KeyError("bug"), "internal", False),
    ],
)
def test_classify_maps_driver_errors_onto_reply_codes(
    error: BaseException, code: str, retryable: bool
) -> None:
    classified = classify(error)
    assert (classified.code, classified.retryable) == (code, retryable)


def test_a_lost_connection_is_transient_whatever_its_sqlstate() -> None:
    error = _dbapi(_AsyncpgLike("XX000"))
    error.connection_invalidated = True
    assert classify(error).code == "unavailable"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    from worker.errors import Backoff

    backoff = Backoff(base_s=0.1, cap_s=0.5)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (30, 0.5)]:
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not a constant
        assert len(set(delays)) > 100


async def test_retry_transient_retries_only_transient_errors_and_only_so_often() -> None:
    from worker.errors import Backoff, retry_transient

    calls: list[str] = []

    def flaky(failures: int, error: Exception) -> Any:
        async def action() -> str:
            calls.append("call")
            if len(calls) <= failures:
                raise error
            return "done"

        return action

    fast = Backoff(base_s=0.001, cap_s=0.001)
    transient = redis.exceptions.ConnectionError("Connection closed by server.")
    assert await retry_transient(flaky(2, transient), attempts=3, backoff=fast, what="t") == "done"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(redis.exceptions.ConnectionError):
        await retry_transient(flaky(5, transient), attempts=3, backoff=fast, what="t")
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(KeyError):  # permanent: raised at once
        await retry_transient(flaky(5, KeyError("bug")), attempts=3, backoff=fast, what="t")
    assert len(calls) == 1


def test_every_reply_code_has_exactly_one_class() -> None:
    codes = ["invalid_job", "unknown_table", "unknown_column", "forbidden_column", "missing_filter",
             "expectation_failed", "id_conflict", "integrity_error", "data_error", "timeout",
             "unavailable", "internal"]  # fmt: skip

    def subclasses(cls: type[errors.WorkerError]) -> list[type[errors.WorkerError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    classes = subclasses(errors.WorkerError)[1:]  # the base only supplies defaults
    assert sorted(cls.code for cls in classes) == sorted(codes)
    assert [cls.code for cls in classes if cls.retryable] == ["unavailable"]


async def test_transient_errors_are_retried_then_replied_unavailable_and_not_final() -> None:
    import json as json_module

    from sqlalchemy.ext.asyncio import create_async_engine

    from worker.db.executor import Executor
    from worker.errors import Backoff, Unavailable
    from worker.job.models import Job, parse_entry
    from worker.job.replies import Reply, UpdateResult

    engine = create_async_engine("sqlite+aiosqlite://")  # never connected: the unit is a stand-in
    executor = Executor(engine, worker="t", max_attempts=4, backoff=Backoff(0.001, 0.001))
    parsed = parse_entry({b"job": json_module.dumps({"id": "r", "table": "t", "set": {"a": 1}, "all": True}).encode()},
                         entry_id="1-0", max_job_bytes=1000)  # fmt: skip
    assert isinstance(parsed, Job)
    failures = {"left": 2}

    async def flaky(attempt: object) -> Reply:
        if failures["left"]:
            failures["left"] -= 1
            raise Unavailable("deadlock detected", reason="deadlock")
        return attempt.succeeded([UpdateResult(rowcount=1)])  # type: ignore[attr-defined, no-any-return]

    ok = await executor._with_retries(parsed, flaky)  # the policy alone, no database
    assert (ok.status, ok.attempts) == ("ok", 3)

    failures["left"] = 10
    given_up = await executor._with_retries(parsed, flaky)
    assert given_up.error is not None
    assert (given_up.error.code, given_up.error.retryable, given_up.attempts) == (
        "unavailable",
        True,
        4,
    )
    assert not given_up.final  # the entry stays pending for a later delivery
    await engine.dispose()
