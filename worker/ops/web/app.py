"""The dashboard's app: routes, templates, the headers every response carries, and
``update-worker web``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.db.engine import create_engine
from worker.errors import SettingsError
from worker.ops.serving import serve_app
from worker.ops.web import present
from worker.ops.web.guard import Guard
from worker.ops.web.letters import Letters
from worker.ops.web.pages import Pages
from worker.ops.web.readings import Sampler
from worker.settings import Settings
from worker.stream.client import AnyRedis
from worker.stream.names import Names

log = logging.getLogger(__name__)

#: Scripts and styles from this origin only: even a value that escaped escaping could not run.
_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; "
        b"img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        b"base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True, slots=True)
class Web:
    """What every page needs."""

    redis: AnyRedis
    engine: AsyncEngine
    names: Names
    group: str
    sampler: Sampler
    guard: Guard
    templates: jinja2.Environment
    refresh_ms: int = 3000

    def page(self, request: Request, name: str, *, status: int = 200, **context: Any) -> Response:
        """``name``.html, or only its live part (``_name``.html) when the page's script asks
        for it with ``?partial=1``."""
        partial = request.query_params.get("partial") == "1"
        template = self.templates.get_template(f"_{name}.html" if partial else f"{name}.html")
        body = template.render(
            readings=self.sampler.latest,
            read_only=self.guard.read_only,
            signed_in=self.guard.signed_in(request),
            csrf=self.guard.csrf(request),
            prefix=self.names.prefix,
            group=self.group,
            refresh_ms=self.refresh_ms,
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(body, status)
        self.guard.remember(request, response)
        return response


def templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.ops.web", "templates"),
        autoescape=True,  # everything from a job is text, whatever it holds
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        age=present.age,
        clock=present.clock,
        count=present.count,
        rate=present.rate,
        pretty=present.pretty,
    )
    environment.globals["chart"] = present.chart
    return environment


def build_app(web: Web) -> Starlette:
    pages = Pages(web)
    letters = Letters(web, pages)

    async def healthz(_request: Request) -> Response:
        problems = web.sampler.latest.problems
        if problems:
            return PlainTextResponse("".join(f"{line}\n" for line in problems), 503)
        return PlainTextResponse("ok\n")

    routes = [
        Route("/", pages.overview),
        Route("/partitions", pages.partitions),
        Route("/workers", pages.workers),
        Route("/job", pages.job),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/dead", letters.listing),
        Route("/dead/act", letters.act, methods=["POST"]),
        Route("/dead/{letter_id}", letters.show),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(packages=[("worker.ops.web", "static")]), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={404: pages.not_found})


class _Headers:
    """Adds the security headers to every response (pure ASGI: no copy of the body)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self._app(scope, receive, sending)


#: The names a browser uses for a dashboard on a loopback address.
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def dashboard(web: Web, *, hosts: Sequence[str] = ("*",)) -> ASGIApp:
    """The app with its headers; ``hosts``: the Host headers it answers (others get 400)."""
    return _Headers(TrustedHostMiddleware(build_app(web), allowed_hosts=hosts))


def allowed_hosts(listening_on: str) -> Sequence[str]:
    """On a loopback address, only the loopback names: a page of another site whose name
    is made to resolve to 127.0.0.1 (DNS rebinding) cannot read the dashboard. Elsewhere the
    names it is reached by are not known here (a proxy usually checks them)."""
    return LOOPBACK if listening_on in ("127.0.0.1", "localhost", "::1") else ("*",)


async def serve_web(settings: Settings) -> None:
    """``update-worker web``: serve the dashboard until SIGTERM or SIGINT."""
    token = settings.web_token.get_secret_value() if settings.web_token else None
    redis = await settings.redis()
    engine = create_engine(settings.database_url, pool_size=2)
    names = Names(settings.prefix)
    sampler = Sampler(redis, names, settings.group)
    web = Web(redis, engine, names, settings.group, sampler, Guard.of(token), templates())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sampling = asyncio.create_task(sampler.run(), name="dashboard sampler")
    try:
        try:
            served = await serve_app(
                dashboard(web, hosts=allowed_hosts(settings.web_host)),
                host=settings.web_host,
                port=settings.web_port,
                access_log=True,
            )
        except OSError as error:
            where = f"{settings.web_host}:{settings.web_port}"
            raise SettingsError(
                f"web: cannot listen on {where}: {error.strerror or error}"
            ) from None
        log.info(
            "dashboard on http://%s:%d/ (%s)",
            settings.web_host,
            served.port,
            "read-only: no WORKER_WEB_TOKEN" if token is None else "actions need the token",
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait(
            [stopping, asyncio.ensure_future(served.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        stopping.cancel()
        await served.close()
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await redis.aclose()
        await engine.dispose()
