"""One rank of a mode-dist run for tests/test_precision.py: ftc's own rank entry
(`ftc.runtime.worker`), with two changes for the test. It records the dtypes of every receive
buffer the rank posts for a value (by message kind and value) in OUT_DIR/rank-<r>.json, and it runs one
intra-op thread, as the test's mode single does: kernels that split a sum across threads round
differently with another count, and bfloat16 turns such a difference into a visible one.

    python -m torch.distributed.run --standalone --nproc-per-node 2 precision_worker.py OUT_DIR CONFIG.json [--set ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ftc.runtime import comm, worker

received: dict[str, list[str]] = {}
post_receive = comm.DistTransport.post_receive


def recording_post_receive(self, message, buffers):
    # A gradient message ends with a flag per leaf saying whether it has a gradient: no value's.
    values = buffers[:-1] if message.kind == comm.GRADIENT else buffers
    received.setdefault(f"{message.kind} {message.value}", sorted({str(b.dtype).removeprefix("torch.") for b in values}))
    return post_receive(self, message, buffers)


def main() -> int:
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    comm.DistTransport.post_receive = recording_post_receive
    set_num_threads = torch.set_num_threads
    torch.set_num_threads = lambda _: set_num_threads(1)
    code = worker.main(argv)
    (out_dir / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(received))
    return code


if __name__ == "__main__":
    sys.exit(main())
