"""A reproducible background load for the contended rows: N busy-loop processes that compete
with the benchmark for the cores (the situation of issue 20: a training job sharing its machine
with data loaders, other jobs or a CI neighbour).

Each busy process is a pure-Python loop (no I/O, no memory traffic: it only takes CPU time, like
`yes > /dev/null`), not pinned to any core. It exits by itself when its parent is gone (it polls
its parent pid), so even a SIGKILL of the benchmark leaves no busy loop behind; normal exits,
exceptions and Ctrl-C stop the processes through `stop()` (a `with` block, plus atexit).
"""
import atexit
import os
import subprocess
import sys
import time
from typing import List

# Polls its parent every ~10 ms of spinning; spinning is all it does otherwise.
_BUSY_LOOP = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(200000):
        pass
"""


class Contention:
    """`with Contention(n):` runs the block with n busy processes on the machine."""

    def __init__(self, processes: int) -> None:
        if processes < 0:
            raise ValueError(f"Invalid number of busy processes: {processes}")
        self.processes = processes
        self.procs: List[subprocess.Popen] = []
        self.stopped_pids: List[int] = []  # the processes stop() ended (and reaped)

    def start(self) -> "Contention":
        atexit.register(self.stop)
        for _ in range(self.processes):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", _BUSY_LOOP, str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.2 if self.procs else 0)  # let the scheduler see them busy
        return self

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        """Terminates every busy process and waits until each has exited (idempotent)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.stopped_pids += [p.pid for p in self.procs]
        self.procs = []
        atexit.unregister(self.stop)

    def __enter__(self) -> "Contention":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
