"""Peak memory of a whole process tree, sampled in a background thread.

Why a tree: in simulation the clients run in Ray worker processes (children of the raylet, itself a child of
this process), which ``getrusage`` and ``/usr/bin/time -v`` of the driver never see. Summed RSS counts the
shared pages (torch's libraries, the model loaded read-only) once per process, so it overstates; summed PSS
splits each shared page among the processes that map it, so it adds up to what the tree really holds.
"""

from __future__ import annotations

import threading

import psutil


def tree_memory(root: psutil.Process, pss: bool = True) -> tuple[int, int, int]:
    """(processes, summed RSS, summed PSS) in bytes of ``root`` and all its descendants right now
    (``pss=False``: RSS only, cheap enough to sample often; PSS is then reported as RSS)."""
    count, rss, total_pss = 0, 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info() if pss else proc.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        count += 1
        rss += info.rss
        total_pss += getattr(info, "pss", info.rss)
    return count, rss, total_pss


class PeakMemory:
    """``with PeakMemory(pid) as peak: ...`` then ``peak.rss``, ``peak.pss`` (bytes) and ``peak.processes``."""

    def __init__(self, pid: int | None = None, interval: float = 0.5, pss: bool = True):
        self.root = psutil.Process(pid)
        self.interval, self.full = interval, pss
        self.rss = self.pss = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        count, rss, pss = tree_memory(self.root, self.full)
        self.processes = max(self.processes, count)
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict[str, float]:
        gib = 1024 ** 3
        return {"peak_rss_sum_gib": self.rss / gib, "peak_pss_sum_gib": self.pss / gib,
                "max_processes": self.processes}


def wait_with_peak(popen, interval: float = 1.0) -> tuple[int, PeakMemory]:
    """Wait for a child process while sampling its tree; returns its exit code and the peaks."""
    peak = PeakMemory(popen.pid, interval)
    with peak:
        code = popen.wait()
    return code, peak

