"""How much CPU other processes took while a benchmark ran. The load average cannot tell: a
benchmark on every core raises it to the core count by itself. /proc/stat gives the machine's busy
time, this process's CPU time is subtracted, and what is left over wall time is the cores others
used on average."""

from __future__ import annotations

import os
import time


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat), or None where it is unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    # idle + iowait; guest time is already inside user and nice; steal (time the hypervisor gave to
    # other guests) stays in: it disturbs timings the same way
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Started at construction; `cores()` is the average number of cores other processes kept busy
    since then (None without /proc/stat)."""

    def __init__(self):
        self._busy, self._own, self._wall = machine_busy_seconds(), time.process_time(), time.perf_counter()

    def cores(self) -> float | None:
        busy = machine_busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._wall
        others = (busy - self._busy) - (time.process_time() - self._own)
        return max(0.0, others / wall) if wall > 0 else 0.0
