"""The clock that times a measured profile.

On the CPU torch runs with `threads` intra-op threads (torch.set_num_threads, restored
afterwards; the default 1 models one pipeline stage per core) and, with one thread, the clock is
that thread's CPU time, so that other programs on a busy machine do not show up in the profile;
with more, it is time.perf_counter. On CUDA the clock is CUDA events, read after a synchronize,
so the times are the device's."""

from __future__ import annotations

import time
from typing import Any

import torch

from .measurement import MeasureSettings


class Clock:
    """Stamps, read after `sync`: CUDA events on the device's stream; on the CPU, the calling
    thread's CPU time when torch computes on that thread alone (time.thread_time: what the work
    costs on a core of its own, however busy the machine), else time.perf_counter."""

    def __init__(self, settings: MeasureSettings):
        self.cuda = settings.device == "cuda"
        self.host = time.thread_time if settings.threads == 1 else time.perf_counter

    def stamp(self) -> Any:
        if not self.cuda:
            return self.host()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start
