"""Many calls of one Lua script in one pipeline, in one round trip.

redis-py runs ``SCRIPT EXISTS`` before every pipeline that holds a script: a second round
trip, on every read of the partitions, every move and every lease renewal. Here each call is
sent as a plain EVALSHA. A script Redis does not know (after a restart or ``SCRIPT FLUSH``)
fails with NOSCRIPT before it runs anything, so exactly the calls that failed so are sent
again once the script is loaded; the others ran once, as asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

#: One call: its keys and its arguments.
Call = tuple[Sequence[Any], Sequence[Any]]


async def run_each(redis: Redis, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
    """The result of each call, in order. Raises the first error other than NOSCRIPT."""
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(3):  # a load between two flushes is all it could ever take
        async with redis.pipeline(transaction=False) as pipe:
            for index in todo:
                keys, args = calls[index]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
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
