"""The dashboard over HTTP (Starlette app in process, httpx), on both backends with the real
Redis: every page, the actions and who may take them, escaping, CSRF, and what never reaches
a page. The browser drives it in tests/test_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory, eventually
from tests.test_cli import run_cli
from tests.test_recovery import inc_job, orphan, qty, result
from worker.client import UpdateClient
from worker.ops.web import letters, readings
from worker.ops.web.app import Web, allowed_hosts, dashboard, templates
from worker.ops.web.guard import SESSION, Guard
from worker.ops.web.readings import Sampler
from worker.stream import deployment
from worker.stream.names import Names, text

TOKEN = "s3cret-token-0123456789"  # noqa: S105 - the test's own
XSS = "<script>alert(1)</script>"


@dataclass
class Dash:
    http: httpx.AsyncClient
    sampler: Sampler

    async def page(self, path: str, status: int = 200) -> str:
        response = await self.http.get(path)
        assert response.status_code == status, (path, response.status_code, response.text)
        return response.text

    async def csrf(self, path: str = "/dead") -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', await self.page(path))
        assert found, path
        return found[1]

    async def log_in(self, token: str = TOKEN) -> httpx.Response:
        form = {"csrf": await self.csrf("/login"), "token": token, "next": "/dead"}
        return await self.http.post("/login", data=form)

    async def act(self, confirmed: bool = True, **form: Any) -> httpx.Response:
        data = {"csrf": await self.csrf(), **form, **({"confirmed": "yes"} if confirmed else {})}
        return await self.http.post("/dead/act", data=data)


@pytest.fixture
async def dash_for(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def make(token: str | None = TOKEN, **sampler: Any) -> Dash:
        names = Names(prefix)
        sampling = Sampler(redis, names, "update-workers", **sampler)
        web = Web(redis, engine, names, "update-workers", sampling, Guard.of(token), templates())
        transport = httpx.ASGITransport(app=dashboard(web))
        client = httpx.AsyncClient(transport=transport, base_url="http://dashboard.test")
        clients.append(client)
        await sampling.sample()
        return Dash(client, sampling)

    yield make
    for client in clients:
        await client.aclose()


def number(page: str, element_id: str) -> int:
    found = re.search(rf'id="{element_id}"[^>]*>([\d,]+)<', page)
    assert found, element_id
    return int(found[1].replace(",", ""))


async def test_overview_partitions_and_workers_follow_a_live_worker(
    dash_for: Callable[..., Any], start_worker: WorkerFactory, prefix: str, redis_url: str
) -> None:
    dash: Dash = await dash_for()
    async with UpdateClient(redis_url, prefix=prefix) as client:
        ids = await client.submit_many([inc_job(f"j{n}", 1 + n % 5) for n in range(40)])
        ids.append(await client.submit({"id": "bad", "table": "items", "key": {"id": 1},
                                        "set": {"nope": 1}}))  # fmt: skip
        await dash.sampler.sample()
        before = await dash.page("/")
        assert number(before, "backlog") == 41
        assert number(before, "live-workers") == 0
        worker = await start_worker()
        for job_id in ids:
            await client.result(job_id, timeout=20)

    async def counted() -> tuple[tuple[str, int, int], ...] | None:
        replies = (await dash.sampler.sample()).replies  # the heartbeat carries them, each second
        return replies if sum(recent for _, recent, _ in replies) == 41 else None

    assert await eventually(counted, timeout=10) == (("ok", 40, 40), ("unknown_column", 1, 1))
    after = await dash.page("/")
    assert number(after, "backlog") == 0
    assert number(after, "pending") == 0
    assert number(after, "live-workers") == 1
    rows = re.findall(
        r'<td>([a-z_]+)</td><td class="n">([\d,]+)</td><td class="n">([\d,]+)</td>', after
    )
    assert rows == [("ok", "40", "40"), ("unknown_column", "1", "1")]
    assert "<polyline" in after  # two samples: the chart has a line
    assert max(rate for _, rate in dash.sampler.latest.history) > 0
    partitions = await dash.page("/partitions")
    assert partitions.count("data-partition=") == 16
    assert worker.settings.consumer in partitions
    assert "stalled" not in re.sub(r"<p class.*", "", partitions)
    workers = await dash.page("/workers")
    assert worker.settings.consumer in workers
    assert "alive" in workers
    held = re.search(r"<td>([\d, ]+)</td>", workers)
    assert held is not None
    assert len(held[1].split(",")) == 16
    partial = await dash.page("/?partial=1")
    assert "<html" not in partial
    assert 'id="backlog"' in partial


async def test_a_partition_with_work_and_no_progress_stands_out(
    dash_for: Callable[..., Any], redis: Redis, prefix: str
) -> None:
    names = Names(prefix)
    await deployment.record_partitions(redis, names, 16)
    job = inc_job("waiting")
    await orphan(redis, prefix, job)  # read by a "ghost" that no deployment record knows
    dash: Dash = await dash_for(stall_s=0.2)
    stalled = [view for view in dash.sampler.latest.partitions if view.stalled]
    assert [view.stalled for view in stalled] == ["no live owner"]
    # An owner that is alive (fresh heartbeat) but answers nothing: stalled after stall_s.
    offer = deployment.Offer(tables={}, settings={})
    await deployment.announce(redis, names, "slowpoke", offer)
    await redis.set(names.owner(stalled[0].number), "slowpoke")
    await dash.sampler.sample()
    assert dash.sampler.latest.partitions[stalled[0].number].stalled is None  # just seen
    await asyncio.sleep(0.25)
    await dash.sampler.sample()
    view = dash.sampler.latest.partitions[stalled[0].number]
    assert view.stalled is not None
    assert view.stalled.startswith("no job answered for")
    page = await dash.page("/partitions")
    assert page.count('class="stalled"') == 1
    assert "slowpoke" in page
    assert number(await dash.page("/"), "stalled") == 1


async def add_letter(redis: Redis, prefix: str, *, reason: str, job: str | None,
                     age_s: float = 0, error: str = "gave up") -> str:  # fmt: skip
    fields: dict[Any, Any] = {"reason": reason, "entry_id": "1-0", "error_code": "internal", "error": error,
              "failed_at_ms": str(int((time.time() - age_s) * 1000))}  # fmt: skip
    if job is not None:
        fields["job"] = job
    return text(await redis.xadd(f"{prefix}:dead", fields))


async def test_dead_letters_are_listed_filtered_shown_and_escaped(
    dash_for: Callable[..., Any], redis: Redis, prefix: str
) -> None:
    hostile = await add_letter(redis, prefix, reason="unparsable", job=XSS,
                               error='<img src=x onerror="alert(2)">')  # fmt: skip
    old = await add_letter(redis, prefix, reason="max_deliveries",
                           job=json.dumps(inc_job("old-1")), age_s=7200)  # fmt: skip
    await add_letter(redis, prefix, reason="max_deliveries", job=json.dumps(inc_job("new-1")))
    dash: Dash = await dash_for()
    listing = await dash.page("/dead")
    assert "3 of 3 dead letters match" in listing
    assert "<img src=x" not in listing
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in listing
    assert "2 of 3" in await dash.page("/dead?reason=max_deliveries")
    older = await dash.page("/dead?older_than=1h")
    assert "1 of 3" in older
    assert old in older
    bogus = await dash.page("/dead?older_than=soon")
    assert "0 of 3" in bogus
    assert "older than: &#39;soon&#39; is not a duration" in bogus
    shown = await dash.page(f"/dead/{hostile}")
    assert XSS not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert "<script" not in shown.replace('<script src="/static/dash.js" defer></script>', "")
    await dash.page("/dead/1-1", status=404)


async def test_replay_needs_a_login_and_the_csrf_token_then_the_job_runs_once(
    dash_for: Callable[..., Any], start_worker: WorkerFactory, redis: Redis, prefix: str,
    engine: AsyncEngine,
) -> None:  # fmt: skip
    letter = await add_letter(redis, prefix, reason="max_deliveries",
                              job=json.dumps(inc_job("again-1", 3)))  # fmt: skip
    before = await qty(engine, 3)
    dash: Dash = await dash_for()
    page = await dash.page(f"/dead/{letter}")
    assert 'id="replay"' not in page
    assert "Log in" in page
    refused = await dash.act(action="replay", scope="selected", ids=letter)
    assert refused.status_code == 403
    assert "Log in with the token" in refused.text
    wrong = await dash.log_in("not-the-token-at-all")
    assert wrong.status_code == 403
    assert SESSION not in dash.http.cookies
    signed = await dash.log_in()
    assert (signed.status_code, signed.headers["location"]) == (303, "/dead")
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION}=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert TOKEN not in cookie
    assert 'id="replay"' in await dash.page(f"/dead/{letter}")
    no_csrf = await dash.http.post("/dead/act", data={"action": "replay", "ids": letter,
                                                      "confirmed": "yes"})  # fmt: skip
    assert no_csrf.status_code == 403
    assert "CSRF" in no_csrf.text
    forged = await dash.http.post("/dead/act", data={"action": "replay", "ids": letter,
                                                     "confirmed": "yes", "csrf": "0" * 64})  # fmt: skip
    assert forged.status_code == 403
    asked = await dash.act(confirmed=False, action="replay", scope="selected", ids=letter)
    assert asked.status_code == 200
    assert letter in asked.text
    assert await redis.xlen(f"{prefix}:dead") == 1  # nothing done before the confirmation
    await start_worker()
    done = await dash.act(action="replay", scope="selected", ids=letter)
    assert (done.status_code, done.headers["location"]) == (
        303,
        "/dead?done=replayed&count=1&kept=0",
    )
    assert "replayed 1 dead letter." in await dash.page(done.headers["location"])
    assert await redis.xlen(f"{prefix}:dead") == 0
    reply = await result(redis, prefix, "again-1", status="ok")
    assert reply.rowcount == 1
    looked_up = await dash.page("/job?id=again-1")
    assert "&#34;status&#34;: &#34;ok&#34;" in looked_up  # the stored reply
    assert 'id="ledger-row"' in looked_up
    assert "again-1" in looked_up
    assert await qty(engine, 3) == before + 1  # applied once
    assert TOKEN not in looked_up


async def test_all_matching_a_filter_means_those_the_operator_saw_when_confirming(
    dash_for: Callable[..., Any], redis: Redis, prefix: str
) -> None:
    seen = [await add_letter(redis, prefix, reason="unparsable", job="{") for _ in range(3)]
    other = await add_letter(redis, prefix, reason="max_deliveries", job=None)
    dash: Dash = await dash_for()
    await dash.log_in()
    asked = await dash.act(confirmed=False, action="purge", scope="matching", reason="unparsable",
                           older_than="")  # fmt: skip
    assert "Delete 3 dead letters?" in asked.text
    until = re.search(r'name="until" value="([^"]+)"', asked.text)
    assert until is not None
    assert until[1] == seen[-1]
    later = await add_letter(redis, prefix, reason="unparsable", job="{")
    done = await dash.act(action="purge", scope="matching", reason="unparsable", older_than="",
                          until=until[1])  # fmt: skip
    assert done.headers["location"] == "/dead?done=purged&count=3&kept=0"
    left = [text(entry_id) for entry_id, _ in await redis.xrange(f"{prefix}:dead") or []]
    assert left == [other, later]
    # A selection: the letter with no job is kept and said so.
    replayed = await dash.act(action="replay", scope="selected", ids=[other, later])
    assert replayed.headers["location"] == "/dead?done=replayed&count=1&kept=1"
    assert "1 carried no job to replay and was kept" in await dash.page(
        replayed.headers["location"]
    )
    assert [text(entry_id) for entry_id, _ in await redis.xrange(f"{prefix}:dead") or []] == [other]
    assert (await dash.act(action="purge", scope="selected")).status_code == 403  # none chosen
    bad_filter = await dash.act(action="purge", scope="matching", older_than="soon")
    assert bad_filter.status_code == 403


async def test_without_a_token_the_dashboard_is_read_only(
    dash_for: Callable[..., Any], redis: Redis, prefix: str
) -> None:
    letter = await add_letter(redis, prefix, reason="unparsable", job="{")
    dash: Dash = await dash_for(token=None)
    assert 'id="read-only"' in await dash.page("/")
    assert "read-only" in await dash.page("/login")
    page = await dash.page(f"/dead/{letter}")
    assert 'id="replay"' not in page
    assert 'id="purge"' not in page
    assert 'name="ids"' not in await dash.page("/dead")
    refused = await dash.act(action="purge", scope="selected", ids=letter)
    assert refused.status_code == 403
    assert "read-only" in refused.text
    assert await redis.xlen(f"{prefix}:dead") == 1


async def test_every_response_carries_the_security_headers(dash_for: Callable[..., Any]) -> None:
    dash: Dash = await dash_for()
    for path in ("/", "/dead", "/login", "/nope", "/static/dash.js"):
        headers = (await dash.http.get(path)).headers
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
    visit = (await dash.http.get("/")).headers.get("set-cookie", "")
    assert "HttpOnly" in visit or "uw_visit" in dash.http.cookies


def test_the_web_command_refuses_a_short_token_and_a_taken_port() -> None:
    short = run_cli("web", WORKER_WEB_TOKEN="tiny-secret")  # noqa: S106 - the test's own
    assert short.returncode == 2
    assert short.stderr.startswith("update-worker: WORKER_WEB_TOKEN: needs 16 characters or more")
    assert "tiny-secret" not in short.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_cli("web", WORKER_WEB_PORT=str(port), WORKER_REDIS_URL=REDIS_URL)
    assert busy.returncode == 2
    assert f"web: cannot listen on 127.0.0.1:{port}" in busy.stderr


async def test_a_long_dead_letter_stream_is_listed_newest_first_and_read_only_so_far(
    dash_for: Callable[..., Any], redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(letters, "SHOWN", 3)
    monkeypatch.setattr(letters, "SCANNED", 5)
    ids = [await add_letter(redis, prefix, reason="unparsable" if n % 2 else "max_deliveries",
                            job="{") for n in range(9)]  # fmt: skip
    dash: Dash = await dash_for()
    await dash.log_in()
    every = await dash.page("/dead")
    assert "9 of 9 dead letters match; the newest 3 are shown." in every
    assert re.findall(r'data-letter="([^"]+)"', every) == ids[::-1][:3]
    some = await dash.page("/dead?reason=unparsable")
    assert "2 of the newest 5 of 9 dead letters match" in some  # ids 8, 7, 6, 5, 4: 7 and 5
    assert "Purge all matching" in some
    asked = await dash.act(confirmed=False, action="purge", scope="matching", reason="unparsable",
                           older_than="")  # fmt: skip
    assert "Delete 4 dead letters?" in asked.text  # an action reads every letter


async def test_on_loopback_only_loopback_names_are_answered(
    dash_for: Callable[..., Any], redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) is refused."""
    dash: Dash = await dash_for()
    web = Web(redis, engine, Names(prefix), "update-workers", dash.sampler, Guard.of(TOKEN),
              templates())  # fmt: skip
    app = dashboard(web, hosts=allowed_hosts("127.0.0.1"))
    for host, status in (("127.0.0.1:8080", 200), ("localhost:8080", 200), ("[::1]:8080", 200),
                         ("attacker.example:8080", 400)):  # fmt: skip
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url=f"http://{host}") as client:  # fmt: skip
            assert (await client.get("/")).status_code == status, host
    assert allowed_hosts("0.0.0.0") == ("*",)  # noqa: S104 - reached by names not known here


@pytest.mark.parametrize("target", ["//attacker.example/", "/\t/attacker.example", "https://a.example/",
                                    "/\\\\attacker.example", "dead"])  # fmt: skip
async def test_a_login_only_ever_leads_back_into_the_dashboard(
    dash_for: Callable[..., Any], target: str
) -> None:
    dash: Dash = await dash_for()
    form = {"csrf": await dash.csrf("/login"), "token": TOKEN, "next": target}
    signed = await dash.http.post("/login", data=form)
    assert (signed.status_code, signed.headers["location"]) == (303, "/")


async def test_a_sampling_failure_is_shown_and_sampling_goes_on(
    dash_for: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    dash: Dash = await dash_for()
    dash.sampler.interval_s = 0.01
    calls = 0

    async def broken(*_args: Any) -> Any:
        nonlocal calls
        calls += 1
        raise ValueError("a reply nobody expected")

    monkeypatch.setattr(readings, "snapshot", broken)
    running = asyncio.create_task(dash.sampler.run())
    try:
        await eventually(lambda: asyncio.sleep(0, calls > 2))
        assert not running.done()
        assert dash.sampler.latest.problems == ("dashboard: ValueError('a reply nobody expected')",)
        assert (await dash.http.get("/healthz")).status_code == 503
        assert "a reply nobody expected" in await dash.page("/")
    finally:
        running.cancel()


async def test_until_orders_letters_by_their_whole_id(
    dash_for: Callable[..., Any], redis: Redis, prefix: str
) -> None:
    """Two letters in the same millisecond: "until" the first spares the second."""
    ms = int(time.time() * 1000)
    for sequence in (0, 1):
        await redis.xadd(
            f"{prefix}:dead", {"reason": "unparsable", "job": "{"}, id=f"{ms}-{sequence}"
        )
    dash: Dash = await dash_for()
    await dash.log_in()
    done = await dash.act(action="purge", scope="matching", reason="unparsable", until=f"{ms}-0")
    assert done.headers["location"] == "/dead?done=purged&count=1&kept=0"
    assert [text(entry_id) for entry_id, _ in await redis.xrange(f"{prefix}:dead") or []] == [
        f"{ms}-1"
    ]
    junk = await dash.act(action="purge", scope="matching", until="yesterday")
    assert junk.status_code == 403
    assert "until: &#39;yesterday&#39; is not a stream entry id" in junk.text
    gone = await dash.act(action="purge", scope="selected", ids=[f"{ms}-0", "1-1"])
    assert gone.headers["location"] == "/dead?done=purged&count=0&kept=0"  # already gone: none
    assert await redis.xlen(f"{prefix}:dead") == 1


async def test_no_page_carries_the_token_or_a_password(
    dash_for: Callable[..., Any], redis: Redis, prefix: str
) -> None:
    await add_letter(redis, prefix, reason="unparsable", job="{")
    dash: Dash = await dash_for()
    await dash.log_in()
    letter = text((await redis.xrange(f"{prefix}:dead") or [])[0][0])
    for path in ("/", "/partitions", "/workers", "/dead", f"/dead/{letter}", "/job?id=x",
                 "/login", "/?partial=1", "/dead?partial=1"):  # fmt: skip
        response = await dash.http.get(path)
        assert response.status_code == 200, path
        assert TOKEN not in response.text, path
        assert TOKEN not in str(response.headers), path
        assert "password" not in response.text.replace('type="password"', "").replace(
            'autocomplete="current-password"', ""
        ), path
