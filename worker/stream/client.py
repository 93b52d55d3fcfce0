"""Redis clients: one server, a Redis Cluster (found by itself), or a primary that Sentinel
watches; timeouts that fit blocking reads, and TLS that always verifies.

A deployment's Redis is named by ``WORKER_REDIS_URL``. :func:`open_redis` asks that server
whether it is a cluster node (``INFO cluster``) and then returns redis-py's cluster client,
which follows slot moves and failovers (``WORKER_REDIS_CLUSTER`` forces either way). With
``WORKER_REDIS_SENTINELS``, the sentinels name the primary, and the client follows them
through a failover; the URL then gives only the credentials, the database and the scheme.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Any client the worker and its tools take: one server (or Sentinel's primary), or a cluster.
AnyRedis = Redis | RedisCluster

#: Extra socket time beyond a blocking read's own BLOCK, so the read returns before the socket
#: times out (redis-py 8 defaults to 5 s, shorter than a long BLOCK); also the connect timeout.
_SOCKET_MARGIN_S: Final = 5.0
#: Connections one client opens at most. Past that, a command waits for a free connection (up
#: to ``_POOL_WAIT_S``) instead of failing at once, as redis-py's default pool of 100 does:
#: a burst of concurrent sends must queue, never lose a job to ``MaxConnectionsError``.
MAX_CONNECTIONS: Final = 100
_POOL_WAIT_S: Final = 20.0
#: Connections a cluster client opens to one node at most.
_CLUSTER_CONNECTIONS: Final = 1200


@dataclass(frozen=True, slots=True)
class RedisTLS:
    """Files for ``rediss://`` (WORKER_REDIS_CA_FILE, _CERT_FILE, _KEY_FILE)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def connect(url: str, *, block_ms: int = 0, tls: RedisTLS | None = None) -> Redis:
    """A client whose socket timeout outlasts a blocking read of ``block_ms``, and whose
    commands wait for a free connection rather than fail when all are busy.

    ``rediss://`` always verifies the server's certificate and host name, against the CA file
    or the system's CAs; a client certificate is presented when one is given.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=_POOL_WAIT_S,
        socket_timeout=_socket_timeout(block_ms),
        socket_connect_timeout=_SOCKET_MARGIN_S,
        **_tls_options(url, tls or RedisTLS()),
    )
    pool.connection_class = _packing_in_c(pool.connection_class)
    return Redis.from_pool(pool)


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis, in C: redis-py's asyncio connections pack them in Python
    (the largest share of a worker's time on the reply path). The bytes are the same; an
    argument hiredis does not take (a bool, a memoryview) goes the Python way, which raises
    redis-py's own error for what Redis cannot take."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # "SCRIPT LOAD" is two words, as redis-py splits them
            args = (*args[0].encode().split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


_PACKING_IN_C: dict[str, type[AbstractConnection]] = {}


def _packing_in_c(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or Unix socket) packing with hiredis; one class each."""
    name = connection_class.__name__
    if name not in _PACKING_IN_C:
        _PACKING_IN_C[name] = type(name, (_HiredisPacking, connection_class), {})
    return _PACKING_IN_C[name]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where a deployment's Redis is: WORKER_REDIS_URL and the settings that go with it."""

    url: str
    tls: RedisTLS = RedisTLS()
    #: ``auto``: a cluster when the server says it is a cluster node.
    cluster: Literal["auto", "yes", "no"] = "auto"
    #: Sentinel addresses (``host:port``, ``redis://[:password@]host:port``, ``rediss://...``).
    sentinels: Sequence[str] = ()
    #: The name the sentinels know the primary by.
    sentinel_service: str = "mymaster"


async def open_redis(target: RedisTarget | str, *, block_ms: int = 0) -> AnyRedis:
    """A client for ``target``: Sentinel's primary, a cluster, or the one server."""
    if isinstance(target, str):
        target = RedisTarget(target)
    if target.sentinels:
        return _sentinel_primary(target, block_ms=block_ms)
    if target.cluster != "yes":
        single = connect(target.url, block_ms=block_ms, tls=target.tls)
        try:
            if target.cluster == "no" or not await is_cluster_node(single):
                return single
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # Unreachable: the caller's first command says so in its own words (``check``
            # names each service that is down). A cluster can be forced in the meantime.
            return single
        except BaseException:
            await single.aclose()
            raise
        await single.aclose()
    cluster = RedisCluster.from_url(
        target.url,
        socket_timeout=_socket_timeout(block_ms),
        socket_connect_timeout=_SOCKET_MARGIN_S,
        # Per node, and refused (not queued) past it: room for a blocked XREAD per partition
        # a worker waits on (worker/stream/reading.py), up to WORKER_PARTITIONS' 1024.
        max_connections=_CLUSTER_CONNECTIONS,
        **_tls_options(target.url, target.tls),
    )
    try:
        await cluster.initialize()  # the slot map: a Pub/Sub subscription needs it at once
    except BaseException:
        await cluster.aclose()
        raise
    return cluster


async def is_cluster_node(redis: Redis) -> bool:
    """Whether ``redis`` runs in cluster mode (``cluster_enabled:1``)."""
    try:
        info = await redis.info("cluster")
    except NoPermissionError:
        return False  # an ACL user without INFO: WORKER_REDIS_CLUSTER=yes says otherwise
    return bool(int(info.get("cluster_enabled", 0)))


def is_cluster(redis: AnyRedis) -> bool:
    return isinstance(redis, RedisCluster)


def primary_of(redis: AnyRedis, key: str) -> str | None:
    """On a cluster, the primary (``host:port``) holding ``key``'s slot; None on one server."""
    if not isinstance(redis, RedisCluster):
        return None
    node = redis.get_node_from_key(key)
    return None if node is None else str(node.name)


def check_prefix(redis: AnyRedis, prefix: str) -> None:
    """Refuse a prefix with a hash tag on a cluster: every key would hash to its one slot,
    so every partition would sit on one primary."""
    if is_cluster(redis) and ("{" in prefix or "}" in prefix):
        raise ValueError(f"WORKER_PREFIX {prefix!r} has braces: on a Redis Cluster they would "
                         "put every key in one slot; the partitions bring their own {p<n>} "
                         "tags, so use a prefix without braces")  # fmt: skip


def _sentinel_primary(target: RedisTarget, *, block_ms: int) -> Redis:
    """The primary that the sentinels name ``target.sentinel_service``, followed through
    failovers: each new connection asks the sentinels where the primary is now."""
    addresses, sentinel_options = _sentinels(target.sentinels, target.tls)
    primary = urlsplit(target.url)
    options: dict[str, Any] = {
        "username": unquote(primary.username) if primary.username else None,
        "password": unquote(primary.password) if primary.password else None,
        "db": int(primary.path.strip("/") or 0),
        "socket_timeout": _socket_timeout(block_ms),
        "socket_connect_timeout": _SOCKET_MARGIN_S,
        **_tls_options(target.url, target.tls, ssl_flag=True),
    }
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_options)
    client: Redis = sentinel.master_for(target.sentinel_service, redis_class=Redis, **options)
    return client


def parse_sentinels(
    given: Sequence[str],
) -> tuple[list[tuple[str, int]], tuple[str, str | None, str | None]]:
    """Each sentinel's host and port (26379 when none is given), and the scheme, user and
    password they all share. Raises ValueError for anything else."""
    addresses: list[tuple[str, int]] = []
    shared: set[tuple[str, str | None, str | None]] = set()
    for item in given:
        url = urlsplit(item if "://" in item else f"redis://{item}")
        try:
            port = url.port or 26379
        except ValueError:
            port = 0
        if url.scheme not in ("redis", "rediss") or not url.hostname or not port:
            raise ValueError(f"a sentinel is host:port or redis(s)://[user:password@]host:port, "
                             f"not {item.rpartition('@')[2]!r}")  # fmt: skip
        addresses.append((url.hostname, port))
        shared.add((url.scheme, url.username, url.password))
    if len(shared) > 1:
        raise ValueError("every sentinel must take the same scheme, user and password")
    return addresses, (shared.pop() if shared else ("redis", None, None))


def _sentinels(given: Sequence[str], tls: RedisTLS) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Each sentinel's host and port, and the options they share (password, TLS)."""
    addresses, (scheme, username, password) = parse_sentinels(given)
    options: dict[str, Any] = {
        "username": unquote(username) if username else None,
        "password": unquote(password) if password else None,
        "socket_timeout": _SOCKET_MARGIN_S,
        "socket_connect_timeout": _SOCKET_MARGIN_S,
        **_tls_options(f"{scheme}://", tls, ssl_flag=True),
    }
    return addresses, options


def _socket_timeout(block_ms: int) -> float:
    return max(_SOCKET_MARGIN_S, block_ms / 1000 + _SOCKET_MARGIN_S)


def _tls_options(url: str, tls: RedisTLS, *, ssl_flag: bool = False) -> dict[str, Any]:
    """What ``rediss://`` asks for: a verified certificate and host name, always."""
    if not url.startswith("rediss://"):
        return {}
    options = {"ssl": True} if ssl_flag else {}
    return options | {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": tls.ca_file,
        "ssl_certfile": tls.cert_file,
        "ssl_keyfile": tls.key_file,
    }


__all__ = [
    "AnyRedis",
    "RedisTLS",
    "RedisTarget",
    "check_prefix",
    "connect",
    "is_cluster",
    "open_redis",
    "parse_sentinels",
    "primary_of",
]
