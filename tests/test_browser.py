"""The dashboard in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium;
`make test` and `.ci/run` install it) against `update-worker web` and `update-worker run`
processes, on both backends.

It opens the overview with a backlog and no worker, starts a worker and sees the backlog fall
to zero in place (no reload); finds the two dead letters the worker made (a poison entry and a
job whose raw text is a script tag, shown as text: no dialog ever opens); sees no replay
button and a refused POST while logged out; logs in with the token, replays the poison job
after the confirmation, sees the letter leave the list and the job's ok reply in the lookup.
``DASHBOARD_SCREENSHOT=docs/dashboard.png`` saves the overview there (README's picture).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, eventually
from tests.test_cli import CLI, ROOT, clean_env, free_port
from tests.test_operate import http_get
from tests.test_recovery import inc_job, orphan
from worker.client import UpdateClient

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token-0123"  # noqa: S105 - the test's own
#: DASHBOARD_JOBS=60000 makes the drain last long enough to catch it midway on the picture.
JOBS = int(os.environ.get("DASHBOARD_JOBS", "3000"))
#: As the machine's own check starts it: headless, as root, with no calls home.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture
def chromium() -> str:
    assert Path(CHROMIUM).exists(), f"the browser test needs {CHROMIUM}: apt-get install chromium"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        yield launched
        await launched.close()


@contextlib.asynccontextmanager
async def process(*args: str, **settings: str) -> AsyncIterator[asyncio.subprocess.Process]:
    started = await asyncio.create_subprocess_exec(*CLI, *args, env=clean_env(**settings),
                                                   cwd=ROOT, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        yield started
    finally:
        if started.returncode is None:
            started.terminate()
        _, stderr = await asyncio.wait_for(started.communicate(), 30)
        assert started.returncode == 0, stderr.decode(errors="replace")[-3000:]


async def backlog(page: Page) -> int:
    return int(await page.locator("#backlog").get_attribute("data-value") or -1)


async def test_a_live_dashboard_in_chromium(
    browser: Browser, engine: AsyncEngine, database_url: str, redis: Redis, prefix: str
) -> None:
    del engine  # seeded before the worker reflects the tables
    settings = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_DATABASE_URL": database_url,
                "WORKER_PREFIX": prefix}  # fmt: skip
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        await client.submit_many([inc_job(f"load-{n}", 1 + n % 5) for n in range(JOBS)])
    await redis.xadd(f"{prefix}:jobs", {"job": "<script>alert(1)</script>"})
    await orphan(redis, prefix, inc_job("poison-1", 2), deliveries=6)  # over max_deliveries
    port = free_port()
    web = {**settings, "WORKER_WEB_PORT": str(port), "WORKER_WEB_TOKEN": TOKEN}
    dialogs: list[str] = []
    async with process("web", **web):
        context = await browser.new_context(viewport={"width": 1280, "height": 620})
        page = await context.new_page()

        async def on_dialog(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)
        base = f"http://127.0.0.1:{port}"
        await eventually(lambda: serving(port), timeout=30)
        await goto(page, f"{base}/")
        # The backlog: every job, before any worker runs.
        await page.wait_for_function(
            f"Number(document.querySelector('#backlog').dataset.value) === {JOBS + 1}",
            timeout=20_000,
        )
        await page.evaluate("window.sameDocument = true")
        seen = [await backlog(page)]
        picture = os.environ.get("DASHBOARD_SCREENSHOT") or str(
            ROOT / ".pytest_cache" / "dashboard.png"
        )
        taken = False
        async with process("run", **settings, WORKER_CLAIM_IDLE_MS="200"):
            for _ in range(240):
                await asyncio.sleep(0.5)
                seen.append(await backlog(page))
                if not taken and 0 < seen[-1] < seen[0] / 2 and len(seen) > 8:
                    await page.screenshot(path=picture)  # midway, with a chart to show
                    taken = True
                if seen[-1] == 0:
                    break
            assert seen[-1] == 0, seen
            assert seen[0] == JOBS + 1
            assert await page.evaluate("window.sameDocument") is True  # refreshed in place
            await expect(page.locator("#live-workers")).to_have_text("1", timeout=10_000)
            await expect(page.locator("#replies")).to_contain_text("ok", timeout=10_000)
            if not taken:
                await page.wait_for_timeout(4_000)  # one more point on the chart
                await page.screenshot(path=picture)

            # The dead letters the worker made, listed without a reload.
            await goto(page, f"{base}/dead")
            await expect(page.locator("#matching")).to_contain_text("2 of 2", timeout=20_000)
            poison = await letter_of(page, "poison-1")
            hostile = await letter_of(page, "")  # the unparsable one has no job id of its own

            # Logged out: the action is refused, even with the page's own CSRF token ...
            csrf = await page.locator("#letters input[name=csrf]").get_attribute("value")
            refused = await page.request.post(f"{base}/dead/act", form={
                "csrf": csrf or "", "action": "replay", "ids": poison, "confirmed": "yes"})  # fmt: skip
            assert refused.status == 403
            await goto(page, f"{base}/dead/{hostile}")
            assert await page.locator("#raw-job").text_content() == "<script>alert(1)</script>"
            # ... and there is no button for it.
            await goto(page, f"{base}/dead/{poison}")
            assert await page.locator("#replay").count() == 0

            # Logged in with the token: replay, confirm, the letter leaves the list.
            await page.click("#log-in")
            await page.fill("#token", TOKEN)
            await page.click("#sign-in")
            await page.wait_for_url(f"{base}/dead/{poison}")
            no_csrf = await page.request.post(f"{base}/dead/act", form={
                "action": "replay", "ids": poison, "confirmed": "yes"})  # fmt: skip
            assert no_csrf.status == 403  # logged in, but no CSRF token: refused
            await page.click("#replay")
            await expect(page.locator("#question")).to_contain_text("Put the job of 1 dead letter")
            await page.click("#confirm")
            await expect(page.locator("#done")).to_have_text("replayed 1 dead letter.")
            await expect(page.locator(f"tr[data-letter='{poison}']")).to_have_count(0)
            await expect(page.locator("#matching")).to_contain_text("1 of 1")

            # Its reply, in the lookup (refreshing in place until the worker has answered).
            await page.fill("#job-id", "poison-1") if await page.locator(
                "#job-id"
            ).count() else None
            await goto(page, f"{base}/job?id=poison-1")
            await expect(page.locator("#stored-reply")).to_contain_text('"status": "ok"',
                                                                        timeout=20_000)  # fmt: skip
            await expect(page.locator("#ledger-row")).to_contain_text("poison-1")
        await context.close()
    assert dialogs == []  # no script from a job ever ran
    stored = json.loads(await redis.get(f"{prefix}:result:poison-1") or "{}")
    assert (stored["status"], stored["rowcount"]) == ("ok", 1)


async def serving(port: int) -> bool:
    try:
        status, _ = await http_get(port, "/healthz")
    except OSError:
        return False
    return status == 200


async def goto(page: Page, url: str) -> None:
    response = await page.goto(url)
    assert response is not None
    assert response.ok, (url, response.status)


async def letter_of(page: Page, job_id: str) -> str:
    """The id of the listed letter whose job id cell reads ``job_id`` (or is an entry id)."""
    for row in await page.locator("tr[data-letter]").all():
        cells = await row.locator("td").all_text_contents()
        if cells[3] == job_id or (not job_id and re.fullmatch(r"\d+-\d+", cells[3])):
            return await row.get_attribute("data-letter") or ""
    raise AssertionError(f"no letter for job {job_id!r}")
