"""The dashboard's read pages (overview, partitions, workers, job lookup) and the login."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from worker.db import ledger
from worker.ops.web.readings import problem_line
from worker.stream.names import text

if TYPE_CHECKING:
    from worker.ops.web.app import Web

#: A failed login waits this long, one at a time: guessing the token stays slow however many
#: requests a guesser sends at once.
_LOGIN_PAUSE_S = 1.0
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*")


class Pages:
    def __init__(self, web: Web) -> None:
        self._web = web
        self._guessing = asyncio.Lock()

    async def overview(self, request: Request) -> Response:
        return self._web.page(request, "overview", title="Overview")

    async def partitions(self, request: Request) -> Response:
        return self._web.page(request, "partitions", title="Partitions")

    async def workers(self, request: Request) -> Response:
        return self._web.page(request, "workers", title="Workers")

    async def job(self, request: Request) -> Response:
        """A job's stored reply (its result key) and its ledger row."""
        job_id = request.query_params.get("id", "").strip()[:200]
        stored = row = None
        problems = []
        if job_id:
            try:
                found = await self._web.redis.get(self._web.names.result(job_id))
                stored = None if found is None else text(found)
            except (RedisError, OSError) as error:
                problems.append(problem_line("redis", error))
            try:
                row = await ledger.find(self._web.engine, job_id)
            except (SQLAlchemyError, OSError) as error:
                problems.append(problem_line("database", error))
        return self._web.page(
            request,
            "job",
            title="Job lookup",
            job_id=job_id,
            stored=stored,
            row=row,
            problems=problems,
        )

    async def login(self, request: Request) -> Response:
        guard, refused = self._web.guard, None
        target = _local(request.query_params.get("next", "/"))
        if request.method == "POST":
            form = await request.form()
            target = _local(str(form.get("next", "/")))
            if not guard.csrf_ok(request, form.get("csrf")):
                return self._web.page(
                    request,
                    "login",
                    status=403,
                    title="Log in",
                    refused="The form expired: log in again.",
                    target=target,
                )
            async with self._guessing:
                if guard.token_ok(form.get("token")):
                    response = RedirectResponse(target, status_code=303)
                    guard.sign_in(request, response)
                    return response
                await asyncio.sleep(_LOGIN_PAUSE_S)
            refused = "That is not the token."
        status = 403 if refused else 200
        return self._web.page(
            request, "login", status=status, title="Log in", refused=refused, target=target
        )

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not self._web.guard.csrf_ok(request, form.get("csrf")):
            return self.refuse(request, "The form carries no valid CSRF token.")
        response = RedirectResponse("/", status_code=303)
        self._web.guard.sign_out(request, response)
        return response

    def refuse(
        self, request: Request, reason: str, *, status: int = 403, title: str = "Refused"
    ) -> Response:
        return self._web.page(request, "refused", status=status, title=title, reason=reason)

    async def not_found(self, request: Request, _error: Exception) -> Response:
        return self.refuse(request, f"Nothing at {request.url.path}.", status=404,
                           title="Not found")  # fmt: skip


def _local(target: str) -> str:
    """Only a path on this dashboard: a login never sends the browser elsewhere (no scheme,
    no ``//host``, and none of the characters browsers drop or turn into a slash)."""
    if _PATH.fullmatch(target) is None or target.startswith("//"):
        return "/"
    return target
