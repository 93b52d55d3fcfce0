"""Who may act on the dashboard, and proof that a POST came from its own page.

- No ``WORKER_WEB_TOKEN``: the dashboard is read-only; every action is refused (403).
- With it: the login form takes the token and sets a session cookie (HttpOnly,
  SameSite=Strict) holding an expiry and an HMAC keyed by the token, never the token itself.
- Every visitor gets a random ``uw_visit`` cookie; every form carries a CSRF token, the HMAC of
  that visit, which a POST must send back. A page of another site can neither read the cookie
  nor compute the token, and SameSite=Strict keeps the cookies off its requests anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

VISIT, SESSION = "uw_visit", "uw_session"
#: How long a login lasts.
SESSION_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class Guard:
    #: None: read-only.
    token: str | None
    #: Signs the cookies and CSRF tokens: from the token (every dashboard of a deployment
    #: honours a login), or random per process when read-only.
    key: bytes

    @classmethod
    def of(cls, token: str | None) -> Guard:
        if token is None:
            return cls(None, secrets.token_bytes(32))
        return cls(token, hashlib.sha256(b"update-worker dashboard\0" + token.encode()).digest())

    @property
    def read_only(self) -> bool:
        return self.token is None

    def visit(self, request: Request) -> str:
        """This visitor's id: the cookie's, or a fresh one that ``remember`` then sets."""
        found = request.cookies.get(VISIT, "")
        if len(found) == 43 and found.replace("-", "").replace("_", "").isalnum():
            return found
        visit: str = request.scope.setdefault("uw_visit", secrets.token_urlsafe(32))
        return visit

    def csrf(self, request: Request) -> str:
        return self._sign("csrf", self.visit(request))

    def csrf_ok(self, request: Request, sent: object) -> bool:
        return isinstance(sent, str) and hmac.compare_digest(sent, self.csrf(request))

    def token_ok(self, sent: object) -> bool:
        if self.token is None or not isinstance(sent, str):
            return False
        return hmac.compare_digest(sent.encode(), self.token.encode())

    def signed_in(self, request: Request) -> bool:
        if self.read_only:
            return False
        expires, _, mac = request.cookies.get(SESSION, "").partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(mac, self._sign("session", self.visit(request), expires))

    def sign_in(self, request: Request, response: Response) -> None:
        expires = str(int(time.time()) + SESSION_S)
        value = f"{expires}.{self._sign('session', self.visit(request), expires)}"
        self._cookie(request, response, SESSION, value, SESSION_S)

    def sign_out(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            SESSION,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def remember(self, request: Request, response: Response) -> None:
        """Set the visit cookie when this request made one up."""
        if "uw_visit" in request.scope:
            self._cookie(request, response, VISIT, request.scope["uw_visit"], 400 * 86400)

    def _sign(self, *parts: str) -> str:
        return hmac.new(self.key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _cookie(request: Request, response: Response, name: str, value: str, age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=age,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
