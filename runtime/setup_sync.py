"""Mode dist: the waits in which the ranks set up together (building stages and data sets) and
write checkpoints. They may be long, so a process group of their own bounds them by
setup_timeout_s, while timeout_s bounds one message of training; a rank that died or ran out of
time is reported as such, not as a broken message."""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from ftc.ir import FtcError

from .comm import PeerFailure, peer_reason, timed_out
from .config import Config
from .data import Sampler, fingerprint


def new_setup_group(config: Config) -> Any:
    """Mode dist: the process group of the set-up waits (None in the other modes). Made while
    the ranks are in step: new_group is collective."""
    if config.mode != "dist":
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=config.setup_timeout_s))


def gather_setup(group: Any, mine: Any, world_size: int) -> list[Any]:
    """Every rank's `mine`, once every rank has got this far in setting up (`group`'s timeout is
    setup_timeout_s: building stages or a corpus may take long, while timeout_s bounds one message)."""
    gathered: list[Any] = [None] * world_size
    try:
        dist.all_gather_object(gathered, mine, group=group)
    except RuntimeError as exc:
        raise PeerFailure(f"not every rank finished setting up (building its stages and data set) "
                          f"{within_setup_timeout(exc)} ({peer_reason(exc)})",
                       "raise setup_timeout_s if building takes this long; a rank that failed says why in its own "
                       "line") from exc  # fmt: skip
    return gathered


def within_setup_timeout(exc: Exception) -> str:
    """How a wait of setup_timeout_s ended: it ran out, or a rank's connection closed (it died)."""
    return "within setup_timeout_s" if timed_out(exc) else "(a rank died)"


def agree_on_data(group: Any, dataset: Any, sampler: Sampler | None, world_size: int) -> None:
    """Wait until every rank has built its data, and check that the ranks reading inputs and the
    one reading targets built the same data set: each builds its own."""
    mine = fingerprint(dataset, sampler.indices(0)) if dataset is not None else None
    prints: list[str | None] = gather_setup(group, mine, world_size)
    readers = {rank: value for rank, value in enumerate(prints) if value is not None}
    if len(set(readers.values())) > 1:
        listed = ", ".join(f"rank {rank}: {value}" for rank, value in readers.items())
        raise FtcError(f"the ranks built different data sets (digest of the first batch: {listed})",
                       "make the data set deterministic: every rank builds it, with Python's, NumPy's and torch's "
                       "generators seeded from the config's seed; seed any other randomness it uses")  # fmt: skip
