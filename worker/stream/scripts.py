"""Many calls of one Lua script in one pipeline, in one round trip.

redis-py runs ``SCRIPT EXISTS`` before every pipeline that holds a script: a second round
trip, on every read of the partitions, every move and every lease renewal. Here each call is
sent as a plain EVALSHA (on a cluster, each to the node that holds its keys' slot, so a
call's keys must share one). A script Redis does not know (after a restart or ``SCRIPT FLUSH``)
fails with NOSCRIPT before it runs anything, so exactly the calls that failed so are sent
again once the script is loaded; the others ran once, as asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from worker.stream.client import AnyRedis

#: One call: its keys and its arguments.
Call = tuple[Sequence[Any], Sequence[Any]]


async def run_each(redis: AnyRedis, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
    """The result of each call, in order. Raises the first error other than NOSCRIPT."""
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(3):  # a load between two flushes is all it could ever take
        async with redis.pipeline(transaction=False) as pipe:
            for index in todo:
                keys, args = calls[index]
                # execute_command: a cluster pipeline refuses ``evalsha`` by name, not EVALSHA
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            answers: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = []
        for index, answer in zip(todo, answers, strict=True):
            if isinstance(answer, NoScriptError):
                unknown.append(index)
            elif isinstance(answer, Exception):
                raise answer
            else:
                results[index] = answer
        if not unknown:
            return results
        script.sha = await redis.script_load(script.script)
        todo = unknown
    raise NoScriptError("the script vanished again at every load")
