"""The data of a run over several batches (schedule async), streamed into the engine's
micro-batches as the stages reach them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ftc.ir import FtcError

if TYPE_CHECKING:
    from .engine import Engine


class BatchStream:
    """The data of a run over several batches (schedule async): `load(b)` gives batch b's
    (inputs, targets), each None where this process reads none. Batches are loaded as the stages
    reach their micro-batches, so a run holds a few of them at a time, however many it covers."""

    def __init__(self, load: Callable[[int], tuple[Any, Any]], first_batch: int):
        self.load = load
        self.first_batch = first_batch


class StreamedMicroBatches:
    """A BatchStream split into micro-batches: run micro-batch m is piece m % M of the stream's
    batch m // M (M: the engine's batch_micro_batches)."""

    KEEP = 8  # batches kept split; stages of one process are at most a few batches apart

    def __init__(self, engine: Engine, stream: BatchStream):
        self.engine = engine
        self.stream = stream
        self.batches: OrderedDict[int, tuple[list | None, list | None]] = OrderedDict()

    def get(self, part: int, m: int) -> Any:
        per_batch = self.engine.batch_micro_batches
        batch = m // per_batch
        if batch in self.batches:
            self.batches.move_to_end(batch)
        else:
            inputs, targets = self.stream.load(self.stream.first_batch + batch)
            self.batches[batch] = (
                None if inputs is None else self.engine.split_inputs(inputs, per_batch),
                None if targets is None else self.engine.split_targets(targets, per_batch),
            )
            if len(self.batches) > self.KEEP:
                self.batches.popitem(last=False)
        pieces = self.batches[batch][part]
        if pieces is None:
            raise FtcError(f"the data of batch {self.stream.first_batch + batch + 1} lacks the "
                           f"{('inputs', 'targets')[part]} this process reads")  # fmt: skip
        return pieces[m % per_batch]


class Part:
    """The inputs (part 0) or the targets (part 1) of streamed micro-batches, by index."""

    def __init__(self, streamed: StreamedMicroBatches, part: int):
        self.streamed = streamed
        self.part = part

    def __getitem__(self, m: int) -> Any:
        return self.streamed.get(self.part, m)
