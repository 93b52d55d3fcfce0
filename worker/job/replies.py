"""The reply JSON of DESIGN.md §4, as the worker makes it and the client reads it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from worker.errors import WorkerError


class ErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool


class UpdateResult(BaseModel):
    # Frozen: results are shared (see plans.Statement.outcome), and frozen models build faster.
    model_config = ConfigDict(frozen=True)

    rowcount: int
    returning: list[dict[str, Any]] | None = None


class Reply(BaseModel):
    """The reply JSON of DESIGN.md §4. Unknown fields are ignored, for forward compatibility.
    Frozen: a reply is made once and never changed (a replay is a copy)."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: Literal["ok", "error"]
    rowcount: int = 0
    returning: list[dict[str, Any]] | None = None
    results: list[UpdateResult] | None = None
    error: ErrorInfo | None = None
    dry_run: bool = False
    replayed: bool = False
    attempts: int = 1
    duration_ms: float = 0.0
    worker: str = ""

    @property
    def final(self) -> bool:
        """False only for an ``unavailable`` reply, which a later delivery supersedes."""
        return self.error is None or not self.error.retryable

    @functools.cached_property
    def rendered(self) -> str:
        """The reply JSON, without unset (None) fields: rendered once, for the ledger row
        and the reply sent alike."""
        return self.model_dump_json(exclude_none=True)

    def encode(self) -> bytes:
        return self.rendered.encode()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("rendered", None)  # a copy with changes renders anew
        return copied

    @classmethod
    def failure(cls, job_id: str, error: WorkerError, **fields: Any) -> Reply:
        info = ErrorInfo(code=error.code, message=error.message, retryable=error.retryable)
        return cls(id=job_id, status="error", rowcount=0, error=info, **fields)
