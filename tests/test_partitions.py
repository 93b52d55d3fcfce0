"""Order keys and partitions (DESIGN.md §11): the derivation, the formula, and validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.job.models import Job, Rejection, parse_entry
from worker.job.order import derive_order_key, partition_of, partition_of_raw


def parsed(document: dict[str, Any]) -> Job | Rejection:
    return parse_entry({b"job": json.dumps(document).encode()}, entry_id="1-0", max_job_bytes=65536)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"table": "users", "key": {"id": 1}, "set": {"age": 3}}, "users:1"),
        ({"table": "orders", "key": {"tenant": "acme", "id": 7}, "set": {"x": 1}}, "orders:7:acme"),
        ({"table": "t", "key": {"b": "x y", "a": 1.5}, "set": {"x": 1}}, "t:1.5:x y"),
        ({"table": "t", "key": {"id": True}, "set": {"x": 1}}, "t:true"),
        ({"table": "books", "where": {"genre": "fiction"}, "set": {"genre": "x"}}, "books"),
        ({"table": "books", "all": True, "set": {"genre": "x"}}, "books"),
        ({"updates": [{"table": "users", "key": {"id": 1}, "set": {"age": 1}},
                      {"table": "books", "all": True, "set": {"genre": "x"}}]}, "users"),
        ({"table": "users", "key": {"id": 1}, "set": {"age": 3}, "order_key": "customer-9"},
         "customer-9"),
    ],
)  # fmt: skip
def test_the_order_key_is_given_or_derived(document: dict[str, Any], expected: str) -> None:
    job = parsed(document)
    assert isinstance(job, Job)
    assert job.order_key == expected
    assert derive_order_key(document) == expected  # the mover's view, from the raw JSON


def test_the_partition_is_zlib_crc32_mod_p() -> None:
    # The standard CRC-32 check value: crc32("123456789") = 0xCBF43926, in every language.
    assert partition_of("123456789", 16) == 0xCBF43926 % 16 == 6
    assert partition_of("123456789", 7) == 0xCBF43926 % 7
    assert partition_of("users:1", 1) == 0


def test_an_entry_that_is_no_job_is_placed_by_its_entry_id() -> None:
    assert partition_of_raw(b"{not json", fallback="5-0", partitions=16) == partition_of("5-0", 16)
    assert partition_of_raw(b"[1]", fallback="5-0", partitions=16) == partition_of("5-0", 16)
    good = json.dumps({"table": "users", "key": {"id": 1}, "set": {"age": 3}}).encode()
    assert partition_of_raw(good, fallback="5-0", partitions=16) == partition_of("users:1", 16)
    # Not UTF-8 (the worker refuses it): by its entry id, like any entry that is no job.
    utf16 = json.dumps({"table": "users", "key": {"id": 1}, "set": {"age": 3}}).encode("utf-16")
    assert partition_of_raw(utf16, fallback="5-0", partitions=16) == partition_of("5-0", 16)
    accented = json.dumps({"table": "users", "key": {"id": "é"}, "set": {"age": 3}},
                          ensure_ascii=False).encode()  # fmt: skip
    assert partition_of_raw(accented, fallback="5-0", partitions=16) == partition_of("users:é", 16)


@pytest.mark.parametrize("order_key", ["", "has space", "x" * 201, 5, None])
def test_a_bad_order_key_is_invalid_job(order_key: Any) -> None:
    rejection = parsed({"table": "users", "key": {"id": 1}, "set": {"age": 3},
                        "order_key": order_key})  # fmt: skip
    if order_key is None:  # an explicit null is "not given"
        assert isinstance(rejection, Job)
        return
    assert isinstance(rejection, Rejection)
    assert rejection.error.code == "invalid_job"
    assert "order_key" in rejection.error.message
