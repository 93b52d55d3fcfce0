"""The dead-letter pages: the list (filtered by reason and age), one letter in full, and
replay or purge of one, of a selection, or of all that match a filter, each after a
confirmation. Actions need a signed-in operator and the form's CSRF token."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from worker.durations import parse_duration
from worker.ops.web.pages import Pages
from worker.stream import deadletters
from worker.stream.deadletters import Letter

if TYPE_CHECKING:
    from worker.ops.web.app import Web

#: Letters listed on one page; the count above the list says how many match.
SHOWN = 200
#: Letters named on a confirmation page.
NAMED = 20
_ENTRY_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
#: "All matching" when none matched: still never the letters that arrive after.
_NOTHING = "0-0"
#: The list reads at most this many letters, newest first, to count those a filter matches:
#: a page stays quick with a million letters. An action reads them all.
SCANNED = 10_000


@dataclass(frozen=True, slots=True)
class Choice:
    """Which letters: a reason and an age, and, when ``ids`` is set, only those."""

    reason: str | None
    older_than: str
    ids: frozenset[str] | None = None
    #: For "all matching": the newest letter when the operator confirmed; later ones are
    #: not theirs to act on.
    until: str | None = None

    @classmethod
    def of(cls, values: Mapping[str, str], ids: list[str] | None = None) -> Choice:
        return cls(
            values.get("reason") or None,
            values.get("older_than", "").strip()[:20],
            None if ids is None else frozenset(ids),
            values.get("until") or None,
        )

    @property
    def unfiltered(self) -> bool:
        return self.ids is None and not self.reason and not self.older_than

    @property
    def error(self) -> str | None:
        """A filter that is no filter: it matches nothing, and the page says why."""
        try:
            parse_duration(self.older_than or "0")
        except ValueError as error:
            return f"older than: {error}"
        if self.until is not None and _ENTRY_ID.fullmatch(self.until) is None:
            return f"until: {self.until!r} is not a stream entry id"
        return None

    def matches(self, letter: Letter) -> bool:
        if self.error is not None:
            return False
        if self.ids is not None and letter.id not in self.ids:
            return False
        if self.until is not None and _order(letter.id) > _order(self.until):
            return False
        older = parse_duration(self.older_than).total_seconds() if self.older_than else None
        return deadletters.matches(letter, reason=self.reason, older_than_s=older or None)


class Letters:
    def __init__(self, web: Web, pages: Pages) -> None:
        self._web, self._pages = web, pages

    async def listing(self, request: Request) -> Response:
        """The newest letters that match, and how many match among the newest SCANNED."""
        choice = Choice.of(request.query_params)
        redis, names = self._web.redis, self._web.names
        total = int(await redis.xlen(names.dead))
        shown: list[Letter] = []
        matching = scanned = 0
        reasons: set[str] = set()
        async for letter in deadletters.newest(redis, names):
            scanned += 1
            reasons.add(letter.reason)
            if choice.matches(letter):
                matching += 1
                if len(shown) < SHOWN:
                    shown.append(letter)
            if scanned >= SCANNED or (choice.unfiltered and len(shown) == SHOWN):
                break
        if choice.unfiltered:
            matching = total
        return self._web.page(
            request,
            "dead",
            title="Dead letters",
            letters=shown,
            matching=matching,
            total=total,
            counted_all=choice.unfiltered or scanned >= total,
            scanned=scanned,
            choice=choice,
            reasons=sorted(reasons | ({choice.reason} if choice.reason else set())),
            now=time.time(),
            done=_done(request.query_params),
        )

    async def show(self, request: Request) -> Response:
        letter_id = request.path_params["letter_id"]
        letter = await deadletters.find(self._web.redis, self._web.names, letter_id)
        if letter is None:
            reason = f"No dead letter {letter_id} (replayed or purged?)."
            return self._pages.refuse(request, reason, status=404, title="Not found")
        return self._web.page(request, "letter", title=f"Dead letter {letter.id}", letter=letter)

    async def act(self, request: Request) -> Response:
        guard = self._web.guard
        form = await request.form()
        if not guard.csrf_ok(request, form.get("csrf")):
            return self._pages.refuse(request, "The form carries no valid CSRF token.")
        if not guard.signed_in(request):
            reason = (
                "This dashboard is read-only: it has no WORKER_WEB_TOKEN."
                if guard.read_only
                else "Log in with the token to replay or purge."
            )
            return self._pages.refuse(request, reason)
        action = str(form.get("action", ""))
        if action not in ("replay", "purge"):
            return self._pages.refuse(request, "Unknown action.")
        choice = _choice(form)
        if choice is None:
            return self._pages.refuse(request, "Choose letters, or all that match a filter.")
        if choice.error:
            return self._pages.refuse(request, choice.error)
        chosen = await self._chosen(choice)
        if form.get("confirmed") != "yes":
            newest = chosen[-1].id if chosen else _NOTHING
            return self._web.page(
                request,
                "confirm",
                title=f"Confirm {action}",
                action=action,
                chosen=chosen[:NAMED],
                count=len(chosen),
                choice=choice,
                until=choice.until or newest,
                replayable=sum(letter.replayable() for letter in chosen),
            )
        if action == "purge":
            purged = await deadletters.purge(self._web.redis, self._web.names, chosen)
            return _back("purged", purged)
        replayable = [letter for letter in chosen if letter.replayable()]
        done = await deadletters.replay(self._web.redis, self._web.names, replayable)
        return _back("replayed", len(done), kept=len(chosen) - len(replayable))

    async def _chosen(self, choice: Choice) -> list[Letter]:
        """The letters an action is about, oldest first: each one ticked that is still
        there, or every one that matches (all are read)."""
        redis, names = self._web.redis, self._web.names
        if choice.ids is not None:
            found = [await deadletters.find(redis, names, letter_id)
                     for letter_id in sorted(choice.ids, key=_order)]  # fmt: skip
            return [letter for letter in found if letter is not None]
        return [letter async for letter in deadletters.letters(redis, names)
                if choice.matches(letter)]  # fmt: skip


def _order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as what orders it: milliseconds, then the sequence."""
    found = _ENTRY_ID.fullmatch(entry_id)
    return (int(found[1]), int(found[2] or 0)) if found else (-1, -1)


def _choice(form: FormData) -> Choice | None:
    values = {key: str(form.get(key, "")) for key in ("reason", "older_than", "until")}
    if form.get("scope") == "matching":
        return Choice.of(values)
    # A selection is exactly the letters ticked, whatever filter the list had.
    ids = [str(value) for value in form.getlist("ids")]
    return Choice(None, "", frozenset(ids)) if ids else None


def _back(done: str, count: int, *, kept: int = 0) -> Response:
    return RedirectResponse(f"/dead?done={done}&count={count}&kept={kept}", status_code=303)


def _done(params: Mapping[str, str]) -> tuple[str, int, int] | None:
    """What the last action did, from the redirect's query: a verb of ours and two numbers,
    never text a link could make the page say."""
    done = params.get("done")
    if done not in ("replayed", "purged"):
        return None
    try:
        return done, int(params.get("count", "0")), int(params.get("kept", "0"))
    except ValueError:
        return None
