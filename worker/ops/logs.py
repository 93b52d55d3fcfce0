"""Log lines: ``text`` for people, ``json`` (one object per line) for machines; never a secret.

A finished job is one line at DEBUG with its fields (job id, table, status, rowcount, duration,
attempt), and a summary of the jobs answered is one line at INFO every few seconds
(worker/service/answers.py); fields are plain ``key=value`` pairs in text, top-level keys in
JSON.
Every line, exceptions included, passes through :func:`mask_secrets`, so a password in a URL
never reaches the output, whoever wrote the message.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any, Final

#: The ``extra`` key carrying a line's structured fields.
FIELDS: Final = "fields"

# scheme://user:password@  ->  scheme://user:***@   (redis://, rediss://, postgresql+asyncpg://)
_PASSWORD_IN_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@\s]+)@")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\g<head>:***@", text)


def configure(*, log_format: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS, None)
    return dict(fields) if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if fields := fields_of(record):
            pairs = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
            line = f"{line} {pairs}"
        return mask_secrets(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            if value is not None:
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return mask_secrets(json.dumps(line, default=str, ensure_ascii=False))
