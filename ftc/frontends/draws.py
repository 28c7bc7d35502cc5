"""Draws from Python's and NumPy's random generators in forward.

A tracer runs forward's Python once, so `if random.random() < 0.5:` is decided while tracing and
its outcome is fixed in the stage code; torch's random ops, by contrast, become ops of the graph.
Tracing runs with the generators seeded, so that every compile fixes the same outcome, and the
compile names the generators forward drew from.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Iterator

from ftc.runtime.seeding import seeded

TRACE_SEED = 0


def trace_seeded() -> contextlib.AbstractContextManager:
    """Python's, NumPy's and torch's generators seeded while tracing, restored after."""
    return seeded(TRACE_SEED)


@contextlib.contextmanager
def drawn_from(generators: list[str]) -> Iterator[None]:
    """Adds to `generators` the name of each generator that the code inside draws from."""
    before = _states()
    yield
    after = _states()
    for name, state in before.items():
        if state is not None and after.get(name) not in (None, state) and name not in generators:
            generators.append(name)


def draws_note(generators: list[str]) -> str:
    return (
        f"forward draws from {' and '.join(generators)} while tracing: the outcome of the draw is fixed in the stage "
        "code (the same in every compile, as ftc traces with the generators seeded); use torch's random ops "
        "(torch.rand, torch.randint, torch.bernoulli), which become ops of the stage code, instead"
    )


def _states() -> dict[str, Any]:
    numpy = sys.modules.get("numpy")
    return {"Python's random module": random.getstate(), "NumPy's random module": _numpy_state(numpy)}


def _numpy_state(numpy: Any) -> tuple | None:
    if numpy is None:
        return None
    kind, keys, *position = numpy.random.get_state()
    return (kind, keys.tobytes(), *position)  # bytes: ndarrays compare element by element, not to a bool
