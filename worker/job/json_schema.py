"""The JSON Schema of a job (``update-worker schema``), for producers in other languages."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from worker.job.filters import FILTER_JSON_SCHEMA
from worker.job.models import FILTER_MARK, BatchJob, SingleJob


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job, single or batch, for producers in other languages."""
    schema = TypeAdapter(SingleJob | BatchJob).json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "update-worker job"
    schema.setdefault("$defs", {})["Filter"] = FILTER_JSON_SCHEMA
    return _replace_filter_mark(schema)  # type: ignore[no-any-return]


def _replace_filter_mark(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get(FILTER_MARK):
            return {"$ref": "#/$defs/Filter"}
        return {key: _replace_filter_mark(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_filter_mark(item) for item in node]
    return node
