"""The generators a model file may draw from while it builds its model or data set: Python's
`random`, NumPy's global generator (when NumPy is imported, as torch imports it) and torch's.
Every rank builds the model and the data set itself; seeded alike, they come out the same on
every rank and in every mode."""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager

import torch


def seed_generators(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators with `seed`, left where what runs next
    leaves them: as after `torch.manual_seed(seed)`, training's draws go on from the build's."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int):
    """Python's, NumPy's and torch's CPU generator seeded with `seed` inside, restored after."""
    numpy = sys.modules.get("numpy")
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        seed_generators(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy_state is not None:
                numpy.random.set_state(numpy_state)
