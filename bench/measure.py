"""Measurements the benches share: the peak resident memory of the whole process tree."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


class PeakRSS:
    """Peak resident memory of this process and all its descendants, sampled every 50 ms from /proc.

    Descendants include the evaluation workers, which are the forkserver's children (grandchildren of the
    pipeline process): /usr/bin/time and getrusage(RUSAGE_CHILDREN) see only waited-for children and miss them.
    `peak` leaves out the temporary Prefect API server (Prefect's, not the pipeline's); `peak_all` counts it.
    `at_peak` is each process's RSS (by role) in the sample where the tree peaked, and `process_peaks` each
    process's own peak (by pid, with its role); with `timeline` set, every sample is kept in `samples`.
    """

    def __init__(self, timeline: bool = False, adopted: Callable[[], list[int]] | None = None) -> None:
        self._adopted = adopted  # pids whose descendants count too, not they themselves (warm runners' runs)
        self.adopted_pids: set[int] = set()
        self.peak = 0
        self.peak_all = 0
        self.at_peak: dict[str, int] = {}
        self.process_peaks: dict[int, tuple[str, int]] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # each process's CPU seconds (user + system), last sampled
        self.samples: list[tuple[float, dict[str, int]]] | None = [] if timeline else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._roles: dict[int, str] = {}

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
    def _command(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return b""

    @classmethod
    def _is_prefect_api(cls, pid: int) -> bool:
        """A Prefect API server may be a child too (the temporary one, or the CLI's local server on the run that
        starts it), but it is Prefect's, not the pipeline's."""
        command = cls._command(pid)
        return b"uvicorn" in command or b"prefect.server" in command or b"prefect server start" in command

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    @staticmethod
    def _parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    def _role(self, pid: int) -> str:
        """'main', 'forkserver', 'worker <pid>', 'prefect-api' or 'other <pid>' (read once per pid)."""
        if pid not in self._roles:
            command = self._command(pid)
            if pid == os.getpid():
                role = "main"
            elif self._is_prefect_api(pid):
                role = "prefect-api"
            elif b"forkserver" in command:  # the server and the workers it forks share one command line
                role = f"worker {pid}" if self._role(self._parent(pid)) == "forkserver" else "forkserver"
            else:
                role = f"other {pid}"
                if command == self._command(os.getpid()):
                    # Forked from this process and not yet exec'd (e.g. the Prefect API server starting): its
                    # command line is still ours. Read again on the next sample instead of remembering this.
                    return role
            self._roles[pid] = role
        return self._roles[pid]

    def _sample(self) -> None:
        began = time.perf_counter()
        while not self._stop.is_set():
            adopted = [p for root in (self._adopted() if self._adopted else []) for p in self._tree(root)[1:]]
            self.adopted_pids.update(adopted)
            pids = self._tree(os.getpid()) + adopted
            rss = {p: self._rss(p) for p in pids}
            self.peak_all = max(self.peak_all, sum(rss.values()))
            ours = {p: v for p, v in rss.items() if self._role(p) != "prefect-api"}
            total = sum(ours.values())
            for p, v in ours.items():
                self.cpu[p] = (self._role(p), self._cpu(p))
                if v > self.process_peaks.get(p, ("", 0))[1]:
                    self.process_peaks[p] = (self._role(p), v)
            if total > self.peak:
                self.peak = total
                self.at_peak = {self._role(p): v for p, v in ours.items()}
            if self.samples is not None:
                self.samples.append((time.perf_counter() - began, {self._role(p): v for p, v in ours.items()}))
            time.sleep(0.05)

    def breakdown(self) -> str:
        """The tree's peak, and each process's share of it and own peak, in MB."""
        at_peak = ", ".join(f"{role} {v / 2**20:,.0f}" for role, v in sorted(self.at_peak.items()))
        own = ", ".join(f"{role} {v / 2**20:,.0f}" for role, v in sorted(self.process_peaks.values()))
        return f"{self.peak / 2**30:.2f} GiB = {at_peak} MB; each process's own peak: {own} MB"

    def cpu_text(self) -> str:
        """CPU seconds of the tree (the Prefect API server left out), and of the main process and the others."""
        main = sum(c for role, c in self.cpu.values() if role == "main")
        rest = sum(c for role, c in self.cpu.values() if role != "main")
        return f"{main + rest:.1f} s = main {main:.1f} s + forkserver and workers {rest:.1f} s"

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
