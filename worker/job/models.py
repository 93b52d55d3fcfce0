"""Job and reply models (DESIGN.md §2, §4), and the one place where stream bytes become a Job.

Pure: no I/O. :func:`parse_entry` never raises for bad input; it returns a :class:`Rejection`
that says how to answer it (an error reply, and a dead letter when the entry is unparsable).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from worker.errors import InvalidJob
from worker.job.filters import Filter, parse_where
from worker.job.order import derive_order_key

MAX_UPDATES_PER_BATCH: Final = 100
#: Columns one update may name in `set` and `inc` together, and in `returning`.
MAX_COLUMNS_PER_UPDATE: Final = 256
ID_PATTERN: Final = r"^[A-Za-z0-9._:@/-]{1,200}$"
# Channels may also carry {hash tags} so Redis Cluster keeps a prefix in one slot.
CHANNEL_PATTERN: Final = r"^[A-Za-z0-9._:@/{}-]{1,200}$"

_PATTERNS: Final = {pattern: re.compile(pattern) for pattern in (ID_PATTERN, CHANNEL_PATTERN)}

JobId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Channel = Annotated[str, StringConstraints(pattern=CHANNEL_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
FILTER_MARK: Final = "x-update-worker-filter"
Where = Annotated[
    Filter | None,
    PlainValidator(parse_where),
    WithJsonSchema({FILTER_MARK: True}),
]


class _Strict(BaseModel):
    # Unknown fields anywhere are rejected: nothing is silently ignored (DESIGN.md §3).
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Expect(_Strict):
    """Row-count guards checked inside the transaction."""

    rows: Annotated[StrictInt, Field(ge=0)] | None = None
    min_rows: Annotated[StrictInt, Field(ge=0)] | None = None
    max_rows: Annotated[StrictInt, Field(ge=0)] | None = None


class UpdateSpec(_Strict):
    """One UPDATE: the fields ``table`` … ``returning`` of a job."""

    table: Name
    values: dict[Name, Any] = Field(default_factory=dict, alias="set")
    inc: dict[Name, StrictInt | StrictFloat] = Field(default_factory=dict)
    where: Where = None
    all_rows: StrictBool = Field(default=False, alias="all")
    key: dict[Name, Any] | None = None
    expect: Expect | None = None
    returning: list[Name] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_shape(self) -> Self:
        if not self.values and not self.inc:
            raise ValueError("at least one of `set` and `inc` is required")
        for field, count in (("`set` and `inc`", len(self.values) + len(self.inc)),
                             ("`returning`", len(self.returning))):  # fmt: skip
            if count > MAX_COLUMNS_PER_UPDATE:
                raise ValueError(f"{field} name {count} columns, over the limit of "
                                 f"{MAX_COLUMNS_PER_UPDATE} per update")  # fmt: skip
        if both := sorted(self.values.keys() & self.inc.keys()):
            raise ValueError(f"column(s) {', '.join(both)} appear in both `set` and `inc`")
        if self.all_rows and (self.where is not None or self.key is not None):
            raise ValueError("`all` cannot be combined with `where` or `key`")
        if self.key is not None and self.where is not None:
            raise ValueError("`key` and `where` are mutually exclusive")
        if self.key == {}:
            raise ValueError("`key` must name the primary key's columns")
        return self


class SingleJob(UpdateSpec):
    id: JobId | None = None
    order_key: JobId | None = None
    reply_to: Channel | None = None
    dry_run: StrictBool = False


class BatchJob(_Strict):
    id: JobId | None = None
    order_key: JobId | None = None
    updates: Annotated[list[UpdateSpec], Field(min_length=1, max_length=MAX_UPDATES_PER_BATCH)]
    reply_to: Channel | None = None
    dry_run: StrictBool = False


_SINGLE: Final = TypeAdapter(SingleJob)
_BATCH: Final = TypeAdapter(BatchJob)


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job, single or batch, ready for the compiler."""

    id: str
    updates: tuple[UpdateSpec, ...]
    batch: bool
    #: Jobs that share it take effect in the order they were added (DESIGN.md §11).
    order_key: str
    reply_to: str | None
    dry_run: bool
    payload_hash: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """Bad input, and how to answer it."""

    id: str
    reply_to: str | None
    error: InvalidJob
    #: Set when the entry is unparsable: it goes to the dead-letter stream with this reason.
    dead_letter_reason: str | None = None


def parse_entry(
    fields: Mapping[bytes, bytes], *, entry_id: str, max_job_bytes: int
) -> Job | Rejection:
    """Turn one stream entry into a Job, or a Rejection saying why not."""
    raw = fields.get(b"job")
    if raw is None:
        return _dead(entry_id, None, "the entry has no `job` field")
    if len(raw) > max_job_bytes:
        return _dead(
            entry_id, None, f"job is {len(raw)} bytes, over WORKER_MAX_JOB_BYTES={max_job_bytes}"
        )
    try:
        document = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return _dead(entry_id, None, "job is not UTF-8")
    except RecursionError:
        return _dead(entry_id, None, "job nests too deeply to parse")
    except ValueError as error:
        return _dead(entry_id, None, f"job is not JSON: {error}")
    if not isinstance(document, dict):
        return _dead(entry_id, None, "job is not a JSON object")
    return _parse_document(document, entry_id=entry_id)


def validate(document: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidJob` unless a worker would accept ``document`` as a job (up to the
    schema, which only a worker knows): producers check before they send."""
    parsed = _parse_document(dict(document), entry_id="0-0")
    if isinstance(parsed, Rejection):
        raise parsed.error


def _parse_document(document: dict[str, Any], *, entry_id: str) -> Job | Rejection:
    reply_to = document.get("reply_to")
    channel = reply_to if _matches(CHANNEL_PATTERN, reply_to) else None
    job_id = document.get("id", entry_id)
    if not _matches(ID_PATTERN, job_id):
        return _dead(entry_id, channel, "`id` must be 1-200 characters of [A-Za-z0-9._:@/-]")
    try:
        if "updates" in document:
            batch = _BATCH.validate_python(document)
            updates, dry_run = tuple(batch.updates), batch.dry_run
        else:
            single = _SINGLE.validate_python(document)
            updates, dry_run = (single,), single.dry_run
    except ValidationError as error:
        return Rejection(id=job_id, reply_to=channel, error=InvalidJob(_summarize(error)))
    order_key = derive_order_key(document)
    assert order_key is not None, "a valid job always has one"  # noqa: S101 - an invariant
    return Job(
        id=job_id,
        updates=updates,
        batch="updates" in document,
        order_key=order_key,
        reply_to=channel,
        dry_run=dry_run,
        payload_hash=payload_hash(document),
    )


def payload_hash(document: Mapping[str, Any]) -> str:
    """Hash of what the job asks for; the id and where to reply are not part of it."""
    content = {key: value for key, value in document.items() if key not in ("id", "reply_to")}
    return hashlib.sha256(_CANONICAL.encode(content).encode()).hexdigest()


def _dead(entry_id: str, channel: str | None, reason: str) -> Rejection:
    return Rejection(
        id=entry_id, reply_to=channel, error=InvalidJob(reason), dead_letter_reason=reason
    )


def _matches(pattern: str, value: Any) -> bool:
    return isinstance(value, str) and _PATTERNS[pattern].fullmatch(value) is not None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return document


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Built once: ``json.dumps`` with options builds an encoder at every call.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
#: Built once: ``json.loads`` with hooks builds a decoder at every call.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _summarize(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False)[:3]:
        where = ".".join(str(part) for part in item["loc"]) or "job"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
