"""Mode dist: the ranks' warnings reach the launcher's terminal, once each.

Each rank writes its stderr to its own file in the launcher's run folder (torchrun's log keeps
only torchrun's own output); the launcher reads the files as they grow and prints every warning
once, however many ranks give it. A warning is marked with the ranks that gave it, unless every
rank did, or it is ftc's own line from rank 0, which speaks for the whole run.

A warning is a line `ftc train: warning: ...` (or `note:`), or `FILE:LINE: SomeWarning: ...` (a
`warnings.warn` of user code or torch), with the indented lines after it. The rest of a rank's
stderr (torch's C++ log lines, the traceback of a failure) stays in its file, which the launcher
keeps when the run fails.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TextIO

WARNING = re.compile(r"ftc train: (?:warning|note): |\S.*:\d+: \w*Warning: ")
FTC_LINE = "ftc train: "


def stderr_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}.stderr"


def send_stderr(folder: Path, rank: int) -> None:
    """In a rank: write this process's stderr, Python's and the C++ libraries', to its file in
    `folder`, with warnings and ftc's log records in the form the launcher reads."""
    sys.stderr.flush()
    file = os.open(stderr_path(folder, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(file, 2)
    os.close(file)
    warnings.formatwarning = _format_warning
    handler = logging.StreamHandler()
    handler.setFormatter(_FtcFormat())
    logging.getLogger("ftc").addHandler(handler)


def _format_warning(message, category, filename, lineno, line=None) -> str:  # warnings.formatwarning's signature
    # Indented, a message's later lines stay part of its warning.
    text = str(message).rstrip("\n").replace("\n", "\n  ")
    return f"{filename}:{lineno}: {category.__name__}: {text}\n"


class _FtcFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{FTC_LINE}{record.levelname.lower()}: " + super().format(record).replace("\n", "\n  ")


class WarningRelay:
    """While open, print the warnings of the ranks' stderr files in `folder` to `out` as they
    come; a warning waits one poll for the other ranks that give it too, so that it is printed
    once with all of them. `processes`: the ranks this machine runs, all of which give a warning
    that needs no mark (their files may appear one by one). Closing reads the files to their end."""

    def __init__(self, folder: Path, processes: int, out: TextIO | None = None, poll_s: float = 0.5):
        self.folder = folder
        self.processes = processes
        self.out = out
        self.poll_s = poll_s
        self.unread: dict[int, bytes] = {}  # per rank: what was read but not yet taken as whole warnings
        self.offsets: dict[int, int] = {}
        self.waiting: dict[str, tuple[float, set[int]]] = {}  # warning -> (first seen, ranks that gave it)
        self.printed: set[str] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ftc-warning-relay", daemon=True)

    def __enter__(self) -> WarningRelay:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.poll(final=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self.poll(final=False)

    def poll(self, final: bool) -> None:
        now = time.monotonic()
        files = self.folder.glob("rank-*.stderr")
        ranks = {int(path.name.removeprefix("rank-").removesuffix(".stderr")) for path in files}
        for rank in sorted(ranks):
            for text in self._read(rank, final):
                if text not in self.printed:
                    self.waiting.setdefault(text, (now, set()))[1].add(rank)
        for text, (seen, by) in list(self.waiting.items()):
            if final or now - seen >= self.poll_s:
                everyone = len(by) >= max(self.processes, len(ranks))
                print(text if everyone else _marked(text, by), file=self.out or sys.stderr, flush=True)
                self.printed.add(text)
                del self.waiting[text]

    def _read(self, rank: int, final: bool) -> list[str]:
        """The whole warnings rank `rank` wrote since the last read. The last one may still be
        getting its indented lines: it stays unread until a line follows it, the file stops
        growing, or the run is over."""
        with open(stderr_path(self.folder, rank), "rb") as file:
            file.seek(self.offsets.get(rank, 0))
            new = file.read()
        self.offsets[rank] = self.offsets.get(rank, 0) + len(new)
        data = self.unread.get(rank, b"") + new
        lines = data.split(b"\n")
        partial, lines = lines[-1], [line.decode("utf-8", errors="replace") + "\n" for line in lines[:-1]]
        spans = []  # [first, end) lines of each warning
        k = 0
        while k < len(lines):
            end = k + 1
            if WARNING.match(lines[k]):
                while end < len(lines) and lines[end][:1] in (" ", "\t"):
                    end += 1
                spans.append((k, end))
            k = end
        kept = len(lines)
        if spans and spans[-1][1] == len(lines) and new and not final:
            kept = spans.pop()[0]
        self.unread[rank] = "".join(lines[kept:]).encode("utf-8") + partial
        return ["".join(lines[first:end]).rstrip("\n") for first, end in spans]


def _marked(text: str, by: set[int]) -> str:
    if 0 in by and text.startswith(FTC_LINE):
        return text
    mark = f"rank {min(by)}" if len(by) == 1 else f"ranks {', '.join(map(str, sorted(by)))}"
    if text.startswith(FTC_LINE):
        return f"{FTC_LINE}{mark}: {text.removeprefix(FTC_LINE)}"
    return f"{FTC_LINE}{mark}: {text}"
