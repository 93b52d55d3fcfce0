"""Redis with TLS and the README's minimal ACL: a private redis-server with throwaway
certificates (openssl), the worker under exactly the documented user, and the failures an
operator must be able to read: plaintext to the TLS port, and a wrong CA."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import eventually
from tests.test_cli import CLI, ROOT, clean_env, free_port
from worker.job.replies import Reply
from worker.ops.admin import backlog
from worker.stream import deployment
from worker.stream.client import RedisTLS, connect
from worker.stream.mover import Mover
from worker.stream.names import Names
from worker.stream.owners import Leases
from worker.stream.reading import Reader
from worker.stream.transport import Transport

PASSWORD = "w0rker-Secret"  # noqa: S105 - a throwaway server's


def readme_acl(prefix: str) -> str:
    """The README's minimal ACL line, for ``prefix`` instead of ``updates``."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^user update-worker on .*$", readme, re.M)
    assert line, "the README's ACL line is missing"
    return line[0].replace(">CHANGE-ME", f">{PASSWORD}").replace("updates:", f"{prefix}:")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(name: str, cwd: Path) -> None:
    openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip


@dataclass
class TlsRedis:
    port: int
    ca: Path
    other_ca: Path

    def url(self, user: str = "", password: str = "", scheme: str = "rediss") -> str:
        credentials = f"{user}:{password}@" if password else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/0"

    def admin(self) -> Redis:
        return connect(self.url(), tls=self.tls())

    def tls(self) -> RedisTLS:
        """The CA, and the client certificate (which a server with tls-auth-clients no ignores)."""
        directory = self.ca.parent
        return RedisTLS(str(self.ca), str(directory / "client.pem"), str(directory / "client.key"))


@pytest.fixture(params=["no"], ids=["server-cert"])
def client_certs(request: pytest.FixtureRequest) -> str:
    """Redis's ``tls-auth-clients``: whether clients must present a certificate."""
    return str(request.param)


@pytest.fixture
async def tls_redis(tmp_path: Path, prefix: str, client_certs: str) -> AsyncIterator[TlsRedis]:
    assert shutil.which("openssl"), "openssl is needed to make the test certificates"
    assert shutil.which("redis-server"), "redis-server is needed (Debian package redis-server)"
    make_ca("ca", tmp_path)
    make_ca("other-ca", tmp_path)
    openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=update-worker", cwd=tmp_path)  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "1", cwd=tmp_path)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext", cwd=tmp_path)  # fmt: skip
    port = free_port()
    (tmp_path / "redis.conf").write_text("\n".join([
        "port 0", f"tls-port {port}", "bind 127.0.0.1", "save \"\"", "appendonly no",
        f"dir {tmp_path}", "tls-cert-file server.pem", "tls-key-file server.key",
        "tls-ca-cert-file ca.pem", f"tls-auth-clients {client_certs}",
        "user default on nopass ~* &* +@all",  # the test's own producer and checks
        readme_acl(prefix),
    ]) + "\n")  # fmt: skip
    command = ["redis-server", str(tmp_path / "redis.conf")]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL)  # noqa: ASYNC220
    redis = TlsRedis(port, tmp_path / "ca.pem", tmp_path / "other-ca.pem")
    admin = redis.admin()
    try:
        await eventually(admin.ping, timeout=10)
        yield redis
    finally:
        await admin.aclose()
        server.terminate()
        server.wait(10)


async def test_every_worker_command_runs_under_the_minimal_acl(
    tls_redis: TlsRedis, prefix: str
) -> None:
    redis = connect(
        tls_redis.url("update-worker", PASSWORD), tls=RedisTLS(ca_file=str(tls_redis.ca))
    )
    names = Names(prefix)
    transport = Transport(redis, names, group="g", consumer="c1", result_ttl=60)
    try:
        assert await redis.ping()
        assert await deployment.record_partitions(redis, names, 2) == 2  # HSETNX + HGET
        await transport.ensure_groups(2)
        offer = deployment.Offer(tables={}, settings={})
        await deployment.announce(redis, names, "c1", offer)  # HSET + HGETALL (+ HDEL)
        async with tls_redis.admin() as admin:
            for number in range(3):  # three jobs on the ingest, as a producer sends them
                await admin.xadd(names.stream, {"job": f'{{"table":"t","key":{{"id":{number}}}}}'})
        mover = Mover(redis, names, me="c1", group="g", partitions=2, lease_ms=5000)
        assert await mover.acquire()  # EVALSHA: EXISTS, INCR, SET
        assert await mover.renew()  # EVALSHA: GET, PEXPIRE
        await mover.drain()  # EVALSHA: XAUTOCLAIM, XREADGROUP, XINFO GROUPS, HGET, HSET, XADD
        leases = Leases(redis, names, me="c1", partitions=2, lease_ms=5000)
        assert [await leases.acquire(number) for number in range(2)] == [True, True]  # SET NX PX
        assert await leases.renew() == []
        assert set((await leases.survey()).values()) == {"c1"}
        reader = Reader(redis, names, group="g", consumer="c1")
        entries = (await reader.read([0, 1], count=10)).entries  # EVALSHA: XREADGROUP, XINFO
        assert len(entries) == 3
        await reader.wait({0: "$"}, block_ms=10)  # XREAD
        claimed = await reader.claim_all(entries[0].partition)  # XAUTOCLAIM, XPENDING, XRANGE
        assert claimed.entries
        await reader.count_start(claimed.entries)  # XCLAIM
        reply = Reply(id="acl-1", status="ok", rowcount=1)
        await transport.reply(entries[0], reply, channel=f"{prefix}:replies")
        await transport.dead_letter(entries[1], reason="unparsable", reply=reply, channel=None)
        await transport.drop_deleted(0, ["0-1"])
        assert await transport.stored_reply("acl-1") is not None
        assert (await backlog(redis, names, "g", 2))[2] == 0  # XLEN + XPENDING (metrics)
        await leases.release(0)  # EVALSHA: GET, DEL
        await mover.release()
        await deployment.withdraw(redis, names, "c1")
        assert not await transport.leave(2)  # XPENDING, XGROUP DELCONSUMER: one entry left
        for forbidden in (redis.get("elsewhere:key"), redis.flushall(), redis.keys("*")):
            with pytest.raises(NoPermissionError):
                await forbidden
    finally:
        await transport.aclose()


async def test_a_worker_process_under_tls_and_the_acl(
    tls_redis: TlsRedis, engine: AsyncEngine, database_url: str, prefix: str
) -> None:
    del engine  # seeded before the worker reflects
    env = clean_env(WORKER_REDIS_URL=tls_redis.url("update-worker", PASSWORD), WORKER_PREFIX=prefix,
                    WORKER_REDIS_CA_FILE=str(tls_redis.ca), WORKER_DATABASE_URL=database_url,
                    WORKER_CLAIM_IDLE_MS="600", WORKER_LOG_FORMAT="json")  # fmt: skip
    worker = await asyncio.create_subprocess_exec(
        *CLI, "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with tls_redis.admin() as admin:
            job = {
                "id": f"tls-{uuid.uuid4().hex[:6]}",
                "table": "items",
                "inc": {"qty": 1},
                "key": {"id": 1},
            }
            await admin.xadd(f"{prefix}:jobs", {"job": json.dumps(job)})
            await admin.xadd(f"{prefix}:jobs", {"job": "not json"})
            stored: Any = await eventually(
                lambda: admin.get(f"{prefix}:result:{job['id']}"), timeout=30
            )
            assert json.loads(stored)["rowcount"] == 1
            await eventually(lambda: admin.xlen(f"{prefix}:dead"), timeout=10)
        check = await asyncio.to_thread(subprocess.run, [*CLI, "check"], env=env, capture_output=True,
                                        text=True, check=False)  # fmt: skip
        # The group and the ledger are in order; `check` itself needs no more than the worker.
        assert check.returncode == 0, check.stderr
    finally:
        worker.terminate()
        _, stderr = await worker.communicate()
    assert worker.returncode == 0, stderr.decode()[-2000:]
    assert PASSWORD not in stderr.decode()


async def test_plaintext_to_the_tls_port_and_a_wrong_ca_fail_clearly(tls_redis: TlsRedis) -> None:
    cases = {
        "plaintext": {"WORKER_REDIS_URL": tls_redis.url(scheme="redis")},
        "wrong CA": {
            "WORKER_REDIS_URL": tls_redis.url(),
            "WORKER_REDIS_CA_FILE": str(tls_redis.other_ca),
        },
        "no CA": {"WORKER_REDIS_URL": tls_redis.url()},  # the system's CAs do not know it either
    }
    for name, settings in cases.items():
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "worker", "check"], capture_output=True, text=True,
            timeout=60, check=False, env=clean_env(**settings, WORKER_DATABASE_URL=f"sqlite+aiosqlite:///{tls_redis.ca.parent / 'check.db'}"),
        )  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (name, result.stderr)
        redis_lines = [line for line in lines if line.startswith("redis:")]
        assert len(redis_lines) == 1, (name, lines)
        if name == "plaintext":
            assert "a TLS port? use rediss://" in redis_lines[0], redis_lines
        else:
            assert "certificate verify failed" in redis_lines[0], (name, redis_lines)
        print(name, "->", redis_lines[0])


@pytest.mark.parametrize("client_certs", ["yes"], ids=["client-cert"], indirect=True)
async def test_a_server_that_wants_client_certificates_gets_the_configured_one(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    url = tls_redis.url("update-worker", PASSWORD)
    database = f"sqlite+aiosqlite:///{tmp_path / 'check.db'}"
    tls = tls_redis.tls()
    with_cert = {"WORKER_REDIS_CA_FILE": tls.ca_file or "", "WORKER_REDIS_CERT_FILE": tls.cert_file or "",
                 "WORKER_REDIS_KEY_FILE": tls.key_file or ""}  # fmt: skip
    results = {}
    for name, settings in {
        "with": with_cert,
        "without": {"WORKER_REDIS_CA_FILE": str(tls_redis.ca)},
    }.items():
        results[name] = await asyncio.to_thread(
            subprocess.run, [*CLI, "check"], capture_output=True, text=True, timeout=60, check=False,
            env=clean_env(WORKER_REDIS_URL=url, WORKER_DATABASE_URL=database, **settings),
        )  # fmt: skip
    # With the certificate only the (expected) group and ledger lines remain; without, Redis refuses.
    assert [line.split(":")[0] for line in results["with"].stderr.splitlines()] == [
        "group",
        "ledger",
    ]
    refused = results["without"].stderr.splitlines()
    assert (results["without"].returncode, refused[0].split(":")[0]) == (1, "redis"), refused


def test_commands_are_packed_by_hiredis_into_the_same_bytes() -> None:
    """The worker's clients pack commands in C; the bytes are redis-py's own, and what Redis
    cannot take is refused the same way."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from worker.stream.client import connect

    client = connect("redis://127.0.0.1:6379/0")
    fast, plain = client.connection_pool.connection_class(), Connection()
    assert type(fast).pack_command is not Connection.pack_command
    commands: list[tuple[str | bytes | int | float, ...]] = [
        ("SET", "k", b"v", "EX", 86_400), ("XADD", "s", "*", "job", '{"é": 1}'),
        ("SCRIPT LOAD", "return 1"), ("EVALSHA", "f00", 1, "k", 0.25, 10**20),
    ]  # fmt: skip
    for command in commands:
        assert b"".join(fast.pack_command(*command)) == b"".join(plain.pack_command(*command))
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", True)
