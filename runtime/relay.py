"""Mode dist: what the ranks write reaches the launcher's terminal.

Each rank writes its stderr to its own file in the launcher's run folder, and every rank but 0
its stdout too (rank 0's stdout, with the progress line and the log, goes to the terminal as
it is); torchrun's log keeps only torchrun's own output. The launcher reads the files as they
grow and prints:

- every warning once, however many ranks give it, marked with the ranks that gave it unless
  every rank did, or it is ftc's own line from rank 0, which speaks for the whole run. A warning
  is a line `ftc train: warning: ...` (or `note:`), or `FILE:LINE: SomeWarning: ...` (a
  `warnings.warn` of user code or torch), with the indented lines after it;
- every other line (a `print`, a `logging` record, a traceback), each marked `rank R: `, to the
  stream the rank wrote it to: a model's or hand-edited stage's output reaches the user with the
  rank that wrote it, line by line, never interleaved within a line.

Left in the files (which the launcher keeps when the run fails) are torch's C++ log lines
(`[W1205 18:00:00.000 socket.cpp:755] ...`, noise about connections) and a failing rank's own
`ftc train: rank R ...: error:` line, which the launcher's failure report repeats. On a terminal,
a line printed clears the line under the cursor first: rank 0's progress line, which its next
step draws again.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

WARNING = re.compile(r"ftc train: (?:warning|note): |\S.*:\d+: \w*Warning: ")
FTC_LINE = "ftc train: "
# A failing rank's own line (worker.main), which the launcher's failure report repeats.
FAILURE = re.compile(r"ftc train: rank \d+(?: at step \d+)?: error: ")
# glog's prefix, which torch's C++ log lines carry: severity, date, time.
TORCH_LOG = re.compile(r"\[?[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")
RANK_FILE = re.compile(r"rank-(\d+)\.(stderr|stdout)")
CLEAR_LINE = "\r\x1b[K"


def stderr_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}.stderr"


def stdout_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}.stdout"


def send_output(folder: Path, rank: int) -> None:
    """In a rank: write this process's stderr (Python's and the C++ libraries'), and its stdout
    unless it is rank 0's, to its files in `folder`, with warnings and ftc's log records in the
    form the launcher reads."""
    sys.stdout.flush()
    sys.stderr.flush()
    redirected = [(stderr_path(folder, rank), 2)] + ([(stdout_path(folder, rank), 1)] if rank != 0 else [])
    for path, descriptor in redirected:
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(file, descriptor)
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


@dataclass
class _RankFile:
    """A rank's stderr or stdout file, read as it grows."""

    path: Path
    rank: int
    stream: str  # "stderr" or "stdout"
    offset: int = 0
    unread: bytes = b""  # read but not yet taken as whole entries


@dataclass
class OutputRelay:
    """While open, print what the ranks write into their files in `folder` as it comes (see the
    module's docstring). A warning waits one poll for the other ranks that give it too, so that
    it is printed once with all of them. `processes`: the ranks this machine runs, all of which
    give a warning that needs no mark (their files may appear one by one). `out`, `err`: where
    the ranks' stdout and stderr lines go (the launcher's own). Closing reads the files to their
    end."""

    folder: Path
    processes: int
    out: TextIO | None = None
    err: TextIO | None = None
    poll_s: float = 0.5
    files: dict[str, _RankFile] = field(default_factory=dict)
    waiting: dict[str, tuple[float, set[int]]] = field(default_factory=dict)  # warning -> (first seen, its ranks)
    printed: set[str] = field(default_factory=set)
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> OutputRelay:
        self.thread = threading.Thread(target=self._run, name="ftc-output-relay", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        self.poll(final=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self.poll(final=False)

    def poll(self, final: bool) -> None:
        now = time.monotonic()
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name):
            match = RANK_FILE.fullmatch(path.name)
            if match and path.name not in self.files:
                self.files[path.name] = _RankFile(path, int(match[1]), match[2])
        ranks = {file.rank for file in self.files.values() if file.stream == "stderr"}
        for file in sorted(self.files.values(), key=lambda f: (f.rank, f.stream)):
            for text in self._read(file, final):
                if file.stream == "stderr" and WARNING.match(text):
                    if text not in self.printed:
                        self.waiting.setdefault(text, (now, set()))[1].add(file.rank)
                elif not (file.stream == "stderr" and (FAILURE.match(text) or TORCH_LOG.match(text))):
                    marked = "\n".join(f"rank {file.rank}: {line}" for line in text.split("\n"))
                    self._print(marked, self._stdout if file.stream == "stdout" else self._stderr)
        for text, (seen, by) in list(self.waiting.items()):
            if final or now - seen >= self.poll_s:
                everyone = len(by) >= max(self.processes, len(ranks))
                self._print(text if everyone else _marked(text, by), self._stderr)
                self.printed.add(text)
                del self.waiting[text]

    @property
    def _stdout(self) -> TextIO:
        return self.out or sys.stdout

    @property
    def _stderr(self) -> TextIO:
        return self.err or sys.stderr

    @staticmethod
    def _print(text: str, stream: TextIO) -> None:
        clear = CLEAR_LINE if stream.isatty() else ""
        print(clear + text, file=stream, flush=True)

    def _read(self, file: _RankFile, final: bool) -> list[str]:
        """The whole entries (a line and the indented lines after it) `file` got since the last
        read. The last one may still be getting its indented lines: it stays unread until a line
        follows it, the file stops growing, or the run is over."""
        with open(file.path, "rb") as handle:
            handle.seek(file.offset)
            new = handle.read()
        file.offset += len(new)
        lines = (file.unread + new).split(b"\n")
        partial, lines = lines[-1], [line.decode("utf-8", errors="replace") + "\n" for line in lines[:-1]]
        if final and partial:  # a last line without its newline: the rank will write no more
            lines, partial = [*lines, partial.decode("utf-8", errors="replace") + "\n"], b""
        spans = []  # [first, end) lines of each entry
        k = 0
        while k < len(lines):
            end = k + 1
            while end < len(lines) and lines[end][:1] in (" ", "\t"):
                end += 1
            spans.append((k, end))
            k = end
        kept = len(lines)
        if spans and new and not final:
            kept = spans.pop()[0]
        file.unread = "".join(lines[kept:]).encode("utf-8") + partial
        return ["".join(lines[first:end]).rstrip("\n") for first, end in spans]


def _marked(text: str, by: set[int]) -> str:
    if 0 in by and text.startswith(FTC_LINE):
        return text
    mark = f"rank {min(by)}" if len(by) == 1 else f"ranks {', '.join(map(str, sorted(by)))}"
    if text.startswith(FTC_LINE):
        return f"{FTC_LINE}{mark}: {text.removeprefix(FTC_LINE)}"
    return f"{FTC_LINE}{mark}: {text}"
