"""Writes a Redis Cluster must not lose in a failover before the next step is taken.

On one server (or one primary that Sentinel watches) a replica receives the primary's writes
in the order they were made, so a replica that has a later write has every earlier one. On a
cluster two writes to two slots may sit on two primaries: the ingest mover's moves go to the
partitions' primaries, and its ack to the ingest's. If the ack reached a replica and a move did
not, a failover of the partition's primary would lose the job. So, on a cluster, each
primary's moves run over one connection of their own, followed on that connection by
``WAIT 1``: the ack goes out only once a replica of every primary written to has the moves.

A primary with no replica connected has nothing to wait for (a failover there has nothing to
promote): its replica count is looked up at most once a second, so such a primary costs no
WAIT. A replica that is connected but does not confirm in time is a transient fault: the
writes are idempotent, and the caller tries again.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from worker.errors import Unavailable
from worker.stream.scripts import Call, run_each

#: How long a primary's replica count is trusted.
_RECOUNT_S: Final = 1.0


class ReplicatedWrites:
    """Script calls on a cluster, each primary's confirmed by a replica before returning."""

    def __init__(self, cluster: RedisCluster, *, timeout_ms: int) -> None:
        self._cluster = cluster
        self._timeout_ms = timeout_ms
        #: A one-connection client per primary (``host:port``): the writes and their WAIT
        #: must share a connection.
        self._primaries: dict[str, Redis] = {}
        #: Primary -> (connected replicas, when looked up).
        self._replicas: dict[str, tuple[int, float]] = {}

    async def run(self, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
        """Each call's result, in order, once a replica of each primary has them."""
        by_node: dict[str, list[int]] = defaultdict(list)
        for index, (keys, _) in enumerate(calls):
            node = self._cluster.get_node_from_key(keys[0])
            if node is None:
                raise Unavailable(f"no primary holds {keys[0]!r} now", reason="cluster_slot")
            by_node[node.name].append(index)
        results: list[Any] = [None] * len(calls)

        async def on(name: str, indexes: list[int]) -> None:
            client = self._client(name)
            try:
                answers = await run_each(client, script, [calls[index] for index in indexes])
                await self._confirmed(client, name)
            except BaseException:
                # The slot may have moved (a failover, a resharding): fresh map, fresh client.
                await self._forget(name)
                raise
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer

        outcomes = await asyncio.gather(*(on(name, indexes) for name, indexes in by_node.items()),
                                        return_exceptions=True)  # fmt: skip
        if failures := [outcome for outcome in outcomes if isinstance(outcome, BaseException)]:
            await self._cluster.nodes_manager.initialize()
            raise failures[0]
        return results

    async def commands(self, key: str, commands: Sequence[tuple[Any, ...]]) -> None:
        """``commands`` (their keys in ``key``'s slot) in one MULTI on the primary holding
        that slot, confirmed by a replica before returning."""
        node = self._cluster.get_node_from_key(key)
        if node is None:
            raise Unavailable(f"no primary holds {key!r} now", reason="cluster_slot")
        client = self._client(node.name)
        try:
            async with client.pipeline(transaction=True) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                await pipe.execute()
            await self._confirmed(client, node.name)
        except BaseException:
            await self._forget(node.name)
            await self._cluster.nodes_manager.initialize()
            raise

    async def _confirmed(self, client: Redis, name: str) -> None:
        if not await self._replica_count(client, name):
            return
        waited = await client.execute_command("WAIT", 1, self._timeout_ms)
        if int(waited) >= 1:
            return
        if not await self._replica_count(client, name, fresh=True):
            return
        raise Unavailable(f"no replica of {name} confirmed the writes within "
                          f"{self._timeout_ms} ms", reason="replica_lag")  # fmt: skip

    async def _replica_count(self, client: Redis, name: str, *, fresh: bool = False) -> int:
        count, when = self._replicas.get(name, (0, -_RECOUNT_S))
        if fresh or time.monotonic() - when >= _RECOUNT_S:
            count = int((await client.info("replication")).get("connected_slaves", 0))
            self._replicas[name] = (count, time.monotonic())
        return count

    def _client(self, name: str) -> Redis:
        if name not in self._primaries:
            node = self._cluster.get_node(node_name=name)
            assert node is not None  # noqa: S101 - the name came from the cluster's own map
            kwargs = {key: value for key, value in node.connection_kwargs.items()
                      if key not in ("host", "port", "connection_class")}  # fmt: skip
            pool = BlockingConnectionPool(
                host=node.host, port=node.port, max_connections=1,
                connection_class=node.connection_class, **kwargs,
            )  # fmt: skip
            self._primaries[name] = Redis.from_pool(pool)
        return self._primaries[name]

    async def _forget(self, name: str) -> None:
        self._replicas.pop(name, None)
        if (client := self._primaries.pop(name, None)) is not None:
            await client.aclose()

    async def aclose(self) -> None:
        for name in list(self._primaries):
            await self._forget(name)
