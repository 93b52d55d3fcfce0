"""Settings from ``WORKER_*`` environment variables and CLI flags (DESIGN.md §7).

:func:`load_settings` reads an injected environment mapping, so tests never touch ``os.environ``.
A bad value, or an unknown ``WORKER_*`` name (a typo), stops start-up with one line naming it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from worker.durations import parse_duration
from worker.errors import SettingsError
from worker.stream.client import (
    AnyRedis,
    RedisTarget,
    RedisTLS,
    check_prefix,
    open_redis,
    parse_sentinels,
)

ENV_PREFIX: Final = "WORKER_"
CommaList = Annotated[tuple[str, ...], NoDecode]


def _default_consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Settings(BaseSettings):
    """Every setting; the environment variable is ``WORKER_`` + the upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    redis_url: str = Field("redis://localhost:6379/0", description="Redis URL; rediss:// for TLS")
    redis_ca_file: str | None = Field(
        None, description="CA certificate(s) that verify a rediss:// server (default: the system's)"
    )
    redis_cert_file: str | None = Field(None, description="client certificate for rediss://")
    redis_key_file: str | None = Field(None, description="client key for rediss://")
    redis_cluster: Literal["auto", "yes", "no"] = Field(
        "auto", description="Redis Cluster: auto (the server says), yes or no"
    )
    redis_sentinels: CommaList = Field(
        (), description="comma list of sentinels (host:port or redis(s)://...) naming the primary"
    )
    redis_sentinel_service: str = Field(
        "mymaster", min_length=1, description="the name the sentinels know the primary by"
    )
    database_url: str = Field(
        "sqlite+aiosqlite:///./update-worker.db",
        description="SQLAlchemy async URL: postgresql+asyncpg://... or sqlite+aiosqlite:///...",
    )
    prefix: str = Field(
        "updates", pattern=r"^[A-Za-z0-9._:@/{}-]{1,100}$", description="Redis name prefix"
    )
    group: str = Field("update-workers", min_length=1, description="consumer group")
    consumer: str = Field(
        default_factory=_default_consumer, min_length=1, description="consumer name"
    )
    concurrency: int = Field(
        8, ge=1, le=1024, description="transactions run at once (and the database pool size)"
    )
    group_size: int = Field(
        200, ge=1, le=1000, description="most single-row jobs committed in one transaction"
    )
    batch_size: int = Field(400, ge=1, le=10_000, description="entries read per XREADGROUP")
    block_ms: int = Field(2000, ge=1, le=60_000, description="how long one XREADGROUP blocks")
    result_ttl: int = Field(86_400, ge=1, description="seconds a reply stays under its result key")
    partitions: int = Field(
        16, ge=1, le=1024, description="partition streams; fixed once the first worker starts"
    )
    lease_ms: int = Field(
        5_000, ge=200, le=600_000, description="a partition lease's TTL (renewed well before)"
    )
    claim_idle_ms: int = Field(
        15_000, ge=100, description="longest pause between rounds of a job that keeps failing"
    )
    max_deliveries: int = Field(5, ge=1, description="deliveries before an entry is dead-lettered")
    max_attempts: int = Field(5, ge=1, le=100, description="tries of a transient failure")
    max_job_bytes: int = Field(65_536, ge=256, description="largest accepted job")
    max_returning: int = Field(1000, ge=0, description="most RETURNING rows put in a reply")
    statement_timeout_ms: int = Field(
        30_000, ge=0, description="PostgreSQL statement_timeout per statement (0: none)"
    )
    lock_timeout_ms: int = Field(
        5_000, ge=0, description="wait for a row lock: PostgreSQL lock_timeout, SQLite busy_timeout"
    )
    idle_in_transaction_timeout_ms: int = Field(
        60_000, ge=0, description="PostgreSQL idle_in_transaction_session_timeout (0: none)"
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="time in-flight jobs get on shutdown")
    tables: CommaList = Field((), description="comma list of tables jobs may update (default: all)")
    readonly_columns: CommaList = Field((), description="comma list of table.column never set")
    writable_keys: CommaList = Field(
        (), description="comma list of table.column keys that may be set"
    )
    models: str | None = Field(None, description="package.module:Base to use instead of reflection")
    orm: Literal["auto", "always", "never"] = Field(
        "auto", description="with WORKER_MODELS: jobs through the unit of work (auto: where the "
        "model has validators, update events or a version counter)",
    )  # fmt: skip
    max_rows_default: int | None = Field(
        None, ge=0, description="expect.max_rows of every job that sets no cap of its own"
    )
    allow_all: bool = Field(True, description='whether `"all": true` (no filter) is accepted')
    ledger_retention: str = Field(
        "7d", description="ledger rows older than this are pruned (s, m, h, d, w); 0 keeps all"
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65_535, description="port of /metrics, /healthz and /readyz (off if unset)"
    )
    web_host: str = Field("127.0.0.1", min_length=1, description="address `web` listens on")
    web_port: int = Field(8080, ge=0, le=65_535, description="port of `web`, the dashboard")
    web_token: SecretStr | None = Field(
        None, description="lets `web` replay and purge, 16+ characters (read-only without it)"
    )
    log_format: Literal["text", "json"] = Field("text", description="text or json")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("web_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("needs 16 characters or more: it is all that guards the actions")
        return value

    @field_validator("tables", "readonly_columns", "writable_keys", "redis_sentinels",
                     mode="before")  # fmt: skip
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("ledger_retention")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        parse_sentinels(value)
        if value and info.data.get("redis_cluster") == "yes":
            raise ValueError("a Redis Cluster has no sentinels: set WORKER_REDIS_CLUSTER or "
                             "WORKER_REDIS_SENTINELS, not both")  # fmt: skip
        return value

    @field_validator("orm")
    @classmethod
    def _orm_needs_models(cls, value: str, info: ValidationInfo) -> str:
        if value != "auto" and not info.data.get("models"):
            raise ValueError(f"{value!r} needs WORKER_MODELS: reflected tables have no ORM rules "
                             "(validators, events, version counters) to honour")  # fmt: skip
        return value

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
            raise ValueError("must start with postgresql+asyncpg:// or sqlite+aiosqlite://")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment comes in through load_settings(environ), never from os.environ here.
        return (init_settings,)

    def redis_target(self) -> RedisTarget:
        """Where Redis is: the URL, TLS files, cluster mode and sentinels."""
        return RedisTarget(
            self.redis_url,
            RedisTLS(self.redis_ca_file, self.redis_cert_file, self.redis_key_file),
            cluster=self.redis_cluster,
            sentinels=self.redis_sentinels,
            sentinel_service=self.redis_sentinel_service,
        )

    async def redis(self, *, block_ms: int = 0) -> AnyRedis:
        """A Redis client for these settings: one server, a cluster, or Sentinel's primary."""
        redis = await open_redis(self.redis_target(), block_ms=block_ms)
        try:
            check_prefix(redis, self.prefix)
        except ValueError as error:
            await redis.aclose()
            raise SettingsError(str(error)) from None
        return redis

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "redis_sentinels":
                yield name, tuple(mask_url(item) for item in value)
            else:
                yield name, mask_url(value) if name in ("redis_url", "database_url") else value


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' own env source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


#: Settings whose value never goes into a message.
_SECRETS: Final = frozenset({"web_token"})


def load_settings(environ: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``environ`` (``WORKER_*``) overlaid with command-line ``flags`` (by field)."""
    flags = {name: value for name, value in (flags or {}).items() if value is not None}
    known = Settings.model_fields
    for variable in environ:
        if (
            variable.upper().startswith(ENV_PREFIX)
            and variable[len(ENV_PREFIX) :].lower() not in known
        ):
            raise SettingsError(f"{variable}: unknown setting (see `update-worker run --help`)")
    from_env = _MappingEnvSource(Settings, environ)()
    try:
        return Settings(**{**from_env, **flags})
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        origin = flag_name(field) if field in flags else ENV_PREFIX + field.upper()
        shown = mask_url(str(first["input"])) if isinstance(first["input"], str) else first["input"]
        message = first["msg"].removeprefix("Value error, ")
        if field in _SECRETS:
            raise SettingsError(f"{origin}: {message}") from None
        raise SettingsError(f"{origin}: {message} (got {shown!r})") from None


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def field_infos() -> Mapping[str, FieldInfo]:
    return Settings.model_fields


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs, errors and --help; each of
    a comma list of them (sentinels, several hosts)."""
    if "," in url:
        return ",".join(mask_url(part) for part in url.split(","))
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
