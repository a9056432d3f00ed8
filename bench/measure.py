"""Measurements the benches share: the peak resident memory of the whole process tree."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class PeakRSS:
    """Peak resident memory of this process and all its descendants, sampled every 50 ms from /proc.

    Descendants include the evaluation workers, which are the forkserver's children (grandchildren of the
    pipeline process): /usr/bin/time and getrusage(RUSAGE_CHILDREN) see only waited-for children and miss them.
    `peak` leaves out the temporary Prefect API server (Prefect's, not the pipeline's); `peak_all` counts it.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.peak_all = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids, queue = [], [pid]
        while queue:
            current = queue.pop()
            pids.append(current)
            for task in Path(f"/proc/{current}/task").glob("*"):
                try:
                    queue.extend(int(c) for c in (task / "children").read_text().split())
                except OSError:
                    continue
        return pids

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _is_prefect_api(pid: int) -> bool:
        """A Prefect API server may be a child too (the temporary one, or the CLI's local server on the run that
        starts it), but it is Prefect's, not the pipeline's."""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return b"uvicorn" in command or b"prefect.server" in command or b"prefect server start" in command

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = {p: self._rss(p) for p in self._tree(os.getpid())}
            self.peak_all = max(self.peak_all, sum(rss.values()))
            self.peak = max(self.peak, sum(v for p, v in rss.items() if not self._is_prefect_api(p)))
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
