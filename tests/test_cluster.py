"""Redis Cluster (DESIGN.md §11, Scale-out): a real cluster of three primaries and three
replicas on loopback, found from the URL of any one node.

The end-to-end and ordering tests of other modules run here again, against the cluster: this
module points their ``redis_url`` and ``redis`` fixtures at it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.clusters import PrivateCluster, running
from tests.conftest import REDIS_URL, WorkerFactory, eventually
from tests.faults import free_port
from tests.test_operate import cli, http_get
from tests.test_order import (
    test_jobs_on_a_row_apply_in_order_across_three_worker_processes as test_order_across_workers,
)
from tests.test_order import (  # noqa: F401 - the fixtures the ordering test takes
    worker_settings,
    workers,
)
from tests.test_service import (
    test_a_plain_redis_producer_gets_its_reply_on_the_channel_and_under_the_result_key as test_redis_cli_producer,
)  # fmt: skip
from tests.test_service import (
    test_client_update_submit_result_and_replay as test_client,
)
from tests.test_service import (
    test_garbage_goes_to_the_dead_letter_stream_and_the_worker_carries_on as test_dead_letters,
)
from tests.test_service import (
    test_many_jobs_through_several_workers_each_apply_once as test_several_workers,
)
from tests.test_web import Dash, dash_for  # noqa: F401 - the fixture the dashboard tests take
from tests.test_web import (
    test_overview_partitions_and_workers_follow_a_live_worker as test_dashboard_overview,
)
from tests.test_web import (
    test_replay_needs_a_login_and_the_csrf_token_then_the_job_runs_once as test_dashboard_replay,
)
from worker.client import UpdateClient
from worker.errors import SettingsError
from worker.settings import load_settings
from worker.stream.client import RedisTarget, open_redis, primary_of

__all__ = [
    "test_client",
    "test_dashboard_overview",
    "test_dashboard_replay",
    "test_dead_letters",
    "test_order_across_workers",
    "test_redis_cli_producer",
    "test_several_workers",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    with running(PrivateCluster(tmp_path_factory.mktemp("cluster"))) as deployment:
        yield deployment


@pytest.fixture
def redis_url(cluster: PrivateCluster) -> str:
    """The URL of the one node that is a replica at the start: any node will do."""
    return cluster.nodes[-1].url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_url)
    await client.initialize()
    yield client
    await client.aclose()


async def test_the_url_of_any_node_finds_the_cluster(cluster: PrivateCluster) -> None:
    for node in cluster.nodes:
        client = await open_redis(node.url)
        try:
            assert isinstance(client, RedisCluster)
            assert len(client.get_primaries()) == 3
        finally:
            await client.aclose()
    single = await open_redis(REDIS_URL)
    assert type(single) is Redis
    await single.aclose()
    forced = await open_redis(RedisTarget(cluster.url, cluster="no"))
    assert type(forced) is Redis
    await forced.aclose()


async def test_a_prefix_with_braces_is_refused_on_a_cluster(cluster: PrivateCluster) -> None:
    settings = load_settings({"WORKER_REDIS_URL": cluster.url, "WORKER_PREFIX": "{updates}"})
    with pytest.raises(SettingsError, match="braces: on a Redis Cluster they would put every"):
        await settings.redis()
    with pytest.raises(ValueError, match="braces"):
        async with UpdateClient(cluster.url, prefix="{updates}") as client:
            await client.submit({"table": "users", "key": {"id": 1}, "set": {"age": 1}})
    plain = load_settings({"WORKER_REDIS_URL": REDIS_URL, "WORKER_PREFIX": "{updates}"})
    await (await plain.redis()).aclose()  # one server: one slot is all there is anyway


async def test_the_partitions_spread_over_the_three_primaries(
    start_worker: WorkerFactory, redis: RedisCluster, prefix: str, redis_url: str
) -> None:
    await start_worker()
    jobs = [{"id": f"s{n}", "table": "items", "key": {"id": 1 + n % 4}, "inc": {"qty": 1}}
            for n in range(64)]  # fmt: skip
    for job in jobs[:32]:  # as redis-cli -c would: the ingest
        await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(job)})
    async with UpdateClient(redis_url, prefix=prefix) as client:
        await client.submit_many(jobs[32:])  # straight to the partitions
        replies = [await client.result(str(job["id"]), timeout=30) for job in jobs]
    assert {reply.status for reply in replies} == {"ok"}
    holders = {primary_of(redis, f"{prefix}:{{p{n}}}:jobs") for n in range(16)}
    primaries = {node.name for node in redis.get_primaries()}
    assert holders == primaries
    groups = [await redis.xinfo_groups(f"{prefix}:{{p{n}}}:jobs") for n in range(16)]
    assert all(found for found in groups)  # every partition stream exists, on its primary


async def test_check_stats_dead_and_metrics_work_on_a_cluster(
    start_worker: WorkerFactory, redis: RedisCluster, prefix: str, redis_url: str,
    database_url: str,
) -> None:  # fmt: skip
    port = free_port()
    await start_worker(metrics_port=port)
    env = {"WORKER_REDIS_URL": redis_url, "WORKER_DATABASE_URL": database_url,
           "WORKER_PREFIX": prefix}  # fmt: skip
    await redis.xadd(f"{prefix}:jobs", {"job": "not json at all"})  # a dead letter
    await eventually(lambda: redis.xlen(f"{prefix}:dead"))
    checked = await cli("check", **env)
    assert checked.returncode == 0, checked.stderr
    stats = await cli("stats", **env)
    assert stats.returncode == 0, stats.stderr
    primaries = {node.name for node in redis.get_primaries()}
    shown = {name for name in primaries if name in stats.stdout}
    assert shown == primaries, stats.stdout  # each primary holds some of the partitions
    listed = await cli("dead", "list", **env)
    assert "unparsable" in listed.stdout, listed.stdout + listed.stderr
    replayed = await cli("dead", "replay", "--all", **env)
    assert replayed.returncode == 0, replayed.stderr
    await eventually(lambda: redis.xlen(f"{prefix}:dead"))  # dead again: still not JSON
    purged = await cli("dead", "purge", "--all", **env)
    assert purged.returncode == 0, purged.stderr
    assert await redis.xlen(f"{prefix}:dead") == 0
    _, metrics = await http_get(port, "/metrics")
    held = [line for line in metrics.splitlines()
            if line.startswith("update_worker_partitions_by_primary{")]  # fmt: skip
    assert len(held) == 3, held
    assert sum(float(line.rsplit(" ", 1)[1]) for line in held) == 16


async def test_the_dashboard_shows_which_primary_holds_each_partition(
    dash_for: Callable[..., Any],  # noqa: F811 - the fixture imported above
    start_worker: WorkerFactory,
    redis: RedisCluster,
) -> None:
    await start_worker()
    dash: Dash = await dash_for()
    page = await dash.page("/partitions")
    assert "<th>primary</th>" in page
    primaries = {node.name for node in redis.get_primaries()}
    assert {name for name in primaries if name in page} == primaries
