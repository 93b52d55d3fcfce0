"""Redis clients: timeouts that fit blocking reads, and TLS that always verifies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

#: Extra socket time beyond a blocking read's own BLOCK, so the read returns before the socket
#: times out (redis-py 8 defaults to 5 s, shorter than a long BLOCK); also the connect timeout.
_SOCKET_MARGIN_S: Final = 5.0
#: Connections one client opens at most. Past that, a command waits for a free connection (up
#: to ``_POOL_WAIT_S``) instead of failing at once, as redis-py's default pool of 100 does:
#: a burst of concurrent sends must queue, never lose a job to ``MaxConnectionsError``.
MAX_CONNECTIONS: Final = 100
_POOL_WAIT_S: Final = 20.0


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
    timeout = max(_SOCKET_MARGIN_S, block_ms / 1000 + _SOCKET_MARGIN_S)
    options: dict[str, Any] = {}
    if url.startswith("rediss://"):
        tls = tls or RedisTLS()
        options = {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "ssl_ca_certs": tls.ca_file,
            "ssl_certfile": tls.cert_file,
            "ssl_keyfile": tls.key_file,
        }
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=_POOL_WAIT_S,
        socket_timeout=timeout,
        socket_connect_timeout=_SOCKET_MARGIN_S,
        **options,
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


__all__ = ["RedisTLS", "connect"]
