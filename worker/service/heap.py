"""The garbage collector, tuned for a long-running worker (a measured 10-12% of its CPU).

CPython's cyclic collector runs a young collection every 700 net allocations of container
objects and, every hundred of those, a full one that walks every live object: the reflected
schema, SQLAlchemy's compiled statements, pydantic's validators, the modules. A worker
allocates a few dozen containers per job and keeps almost none, so at thousands of jobs a
second it spent about a tenth of its CPU walking the same start-up objects again and again.

So, once the worker is ready: what start-up built is moved out of the collector's sight
(:func:`gc.freeze`: it is never freed anyway), and the young generation is larger. Cycles
are still collected, a little later; plain reference counting, which frees almost everything
a job allocates, is unchanged.
"""

from __future__ import annotations

import gc
from typing import Final

#: Young-generation size (objects), then how many young and middle collections trigger the
#: next older one. CPython's defaults are 700, 10, 10.
THRESHOLDS: Final = (10_000, 20, 20)


def settle() -> None:
    """Collect what start-up left over, then freeze the rest and widen the young generation."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
