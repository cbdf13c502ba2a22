"""kill -9 during saves: is the old file intact and no temporary file left, trial after trial?

Each trial starts a writer that replaces ``PATH`` (a few MB, so a write takes a
while) in a loop with new contents, kills it with ``kill -9`` after a random
delay, then checks that ``PATH`` holds one complete version (the first and
last 8 bytes name the same version, the middle is that version's pattern) and
that no other file is in the folder. ``--trials N`` runs N trials and prints
one JSON line: trials, kills that landed inside a write, intact, debris-free,
writes completed, any file left (whether it is a complete version) and what is
left once the next save to the path has run. A kill can only leave a file in the
microseconds between naming the finished temporary file and renaming it (see
``deepshrink/atomic.py``); the next save removes it.
The writer is forked from this process, so each trial starts in milliseconds.

Usage:
    python benchmarks/bench_atomic_kill.py [--trials 50] [--out-dir results]

Writes ``results/bench_atomic_kill.json``; the figures are quoted in ``docs/fileformat.md``.
``tests/test_atomic.py`` runs 10 trials of the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

from deepshrink.atomic import write_atomic

from common import add_output, write_results

SIZE = 4 << 20  # big enough that a write takes milliseconds: kills land inside it


def contents(version: int) -> bytes:
    tag = version.to_bytes(8, "little")
    return tag + bytes([version % 251]) * (SIZE - 16) + tag


def check(path: Path) -> int | None:
    """The version ``path`` holds, or None if it is not one whole version."""
    data = path.read_bytes()
    version = int.from_bytes(data[:8], "little")
    return version if data == contents(version) else None


def writer(path: Path, report: int) -> None:
    """Replace ``path`` with the next version forever, writing ``s`` to ``report`` before each write, ``e`` after."""
    version = check(path) or 0
    while True:
        version += 1
        os.write(report, b"s")
        write_atomic(path, contents(version))
        os.write(report, b"e")


def run_writer(path: Path) -> tuple[int, int]:
    """Fork a writer (fast: this process has imported deepshrink already); return its pid and report pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns
        os.close(read_end)
        try:
            writer(path, write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    return pid, read_end


def trials(folder: Path, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    path = folder / "model.dsz"
    path.write_bytes(contents(0))
    intact = clean = writes = mid_write = 0
    debris = []
    for trial in range(n):
        pid, report = run_writer(path)
        log = os.read(report, 2)
        while not log.endswith(b"e"):  # wait until one write is complete: the writer is well under way
            log += os.read(report, 1)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(report, 4096):
            log += chunk
        os.close(report)
        writes += log.count(b"e")
        mid_write += log.endswith(b"s")
        intact += check(path) is not None
        left = leftovers(folder)
        clean += not left
        debris += [{"trial": trial, "name": name, "complete": check(folder / name) is not None} for name in left]
    write_atomic(path, contents(0))  # the next save to the path: it removes what a killed writer left
    return {"trials": n, "killed_mid_write": mid_write, "intact": intact, "no_debris": clean,
            "writes_completed": writes, "debris": debris, "left_after_next_save": leftovers(folder)}  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    """Every file in ``folder`` but the target."""
    return sorted(set(os.listdir(folder)) - {"model.dsz"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    add_output(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = trials(Path(folder), args.trials, args.seed)
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result))
    write_results(args, "bench_atomic_kill", result)


if __name__ == "__main__":
    main()
