"""Redis Cluster and Sentinel deployments of the tests' own: real redis-server processes on free
loopback ports, started and stopped by the fixtures, with failovers on demand."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from redis.asyncio import Redis

from tests.faults import free_port

_HIGHEST_CLUSTER_PORT = 55_535

Deployment = TypeVar("Deployment", "PrivateCluster", "PrivateSentinel")


def _binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is needed for the cluster tests (Debian package redis-server)"
    return found


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port a cluster node can take: at most 55535, with its cluster bus port (10,000
    higher) free too; redis-server refuses a higher one."""
    while True:
        port = free_port()
        if port <= _HIGHEST_CLUSTER_PORT and _bindable(port + 10_000):
            return port


class Node:
    """One redis-server process, in a directory of its own."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.root = directory
        self.extra = extra
        self._choose_port()
        #: For a sentinel: the service it watches and the primary's port.
        self.sentinel_of: tuple[str, int] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.sentinel_of is not None:
            service, primary = self.sentinel_of
            config = self.directory / "sentinel.conf"  # a sentinel rewrites it as it learns
            config.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {service} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 5000\n"
            )
            self.process = subprocess.Popen(
                [_binary("redis-server"), str(config), "--sentinel",
                 "--logfile", str(self.directory / "sentinel.log")],
            )  # fmt: skip
            return
        self.process = subprocess.Popen(
            [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no",
             "--logfile", str(self.directory / "redis.log"), *self.extra],
        )  # fmt: skip

    def _choose_port(self) -> None:
        self.port = free_cluster_port() if "--cluster-enabled" in self.extra else free_port()
        self.directory = self.root / str(self.port)
        self.directory.mkdir(parents=True)

    async def launch(self) -> None:
        """Start, and wait until it answers. A free port can be taken between the check and
        the server's bind (an outgoing connection's local port, say): then another port."""
        for _ in range(3):
            self.start()
            with contextlib.suppress(TimeoutError):
                await _until(self.ping, f"redis-server on {self.port} answers", timeout=10)
                return
            self.kill()
            self._choose_port()
        raise RuntimeError(f"redis-server would not start; see {self.root}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def ping(self) -> bool:
        async with Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1) as client:
            return bool(await client.ping())

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5)


class PrivateCluster:
    """Three primaries and three replicas (``redis-cli --cluster create ... --cluster-replicas
    1``). ``failover`` promotes a primary's replica the planned way; ``kill_primary`` SIGKILLs a
    primary and waits until the cluster has promoted its replica."""

    NODE_TIMEOUT_MS = 1500

    def __init__(self, directory: Path) -> None:
        self.nodes = [
            Node(directory, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS))
            for _ in range(6)
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return self.nodes[0].url

    async def start(self) -> None:
        for node in self.nodes:
            await node.launch()
        created = await asyncio.to_thread(
            subprocess.run,
            [_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        await _until(self.healthy, "the cluster is ok on every node")

    async def healthy(self) -> bool:
        """Every live node says the cluster is ok, three are primaries, and every replica is in
        sync with its primary (a replica still syncing would not confirm a WAIT)."""
        for node in self.live():
            async with node.client() as client:
                info = await client.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in str(info):
                    return False
                replication = await client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        return len(await self.primaries()) == 3

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.process and node.process.poll() is None]

    async def roles(self) -> dict[int, str]:
        """Port -> ``master`` or ``slave``, as each live node sees itself."""
        found = {}
        for node in self.live():
            async with node.client() as client:
                found[node.port] = str((await client.info("replication"))["role"])
        return found

    async def primaries(self) -> list[Node]:
        roles = await self.roles()
        return [node for node in self.live() if roles.get(node.port) == "master"]

    async def replica_of(self, primary: Node) -> Node:
        for node in self.live():
            async with node.client() as client:
                info = await client.info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == primary.port:
                    return node
        raise AssertionError(f"no replica of {primary.port}")

    async def failover(self, primary: Node) -> Node:
        """``CLUSTER FAILOVER`` on the primary's replica: the planned way. The new primary."""
        replica = await self.replica_of(primary)
        async with replica.client() as client:
            await client.execute_command("CLUSTER", "FAILOVER")

        async def promoted() -> bool:
            return (await self.roles()).get(replica.port) == "master" and await self.healthy()

        await _until(promoted, f"{replica.port} took over from {primary.port}")
        return replica

    async def kill_primary(self, primary: Node) -> Node:
        """SIGKILL ``primary``; returns its replica once the cluster promoted it."""
        replica = await self.replica_of(primary)
        primary.kill()

        async def promoted() -> bool:
            return (await self.roles()).get(replica.port) == "master" and await self.healthy()

        await _until(promoted, f"{replica.port} promoted after {primary.port} died")
        return replica

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class PrivateSentinel:
    """One primary, one replica and three sentinels watching them as ``mymaster``."""

    SERVICE = "mymaster"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = Node(directory)
        self.replica = Node(directory)
        self.sentinels = [Node(directory) for _ in range(3)]

    @property
    def addresses(self) -> str:
        """WORKER_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    async def start(self) -> None:
        await self.primary.launch()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.primary.port))
        await self.replica.launch()
        for sentinel in self.sentinels:
            sentinel.sentinel_of = (self.SERVICE, self.primary.port)
            await sentinel.launch()

        async def replicating() -> bool:
            async with self.replica.client() as client:
                return str((await client.info("replication"))["master_link_status"]) == "up"

        async def watched() -> bool:
            for sentinel in self.sentinels:
                async with sentinel.client() as client:
                    found = await client.execute_command("SENTINEL", "REPLICAS", self.SERVICE)
                    if not found:
                        return False
            return True

        await _until(replicating, "the replica is in sync")
        await _until(watched, "every sentinel knows the replica")

    async def kill_primary(self) -> None:
        """SIGKILL the primary; returns once the sentinels name the replica instead, and the
        old primary is back as the new one's replica (as an operator would restart it)."""
        self.primary.kill()

        async def promoted() -> bool:
            async with self.sentinels[0].client() as client:
                address = await client.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
                )
            return int(address[1]) == self.replica.port

        await _until(promoted, "the sentinels promoted the replica")
        self.primary, self.replica = self.replica, self.primary
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.primary.port))
        await self.replica.launch()

    def stop(self) -> None:
        for node in (self.primary, self.replica, *self.sentinels):
            node.kill()


@contextlib.contextmanager
def running(deployment: Deployment) -> Iterator[Deployment]:
    """``deployment`` started (outside any event loop: for a fixture), and stopped after."""
    try:
        asyncio.run(deployment.start())
        yield deployment
    finally:
        deployment.stop()
