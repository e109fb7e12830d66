"""The benchmarks' check for other processes (bench/load.py): a busy neighbour shows, the
benchmark's own threads do not."""

import subprocess
import sys
import time

import pytest

from sparseflow.bench.load import OtherLoad, machine_busy_seconds

pytestmark = pytest.mark.skipif(machine_busy_seconds() is None, reason="needs /proc/stat")


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_own_work_is_not_counted():
    idle = OtherLoad()  # what the rest of the machine does anyway (a CI neighbour, say)
    time.sleep(0.6)
    background = idle.cores()
    others = OtherLoad()
    burn(0.6)  # a core of our own: counted, it would add ~1
    assert others.cores() < background + 0.5


def test_a_busy_neighbour_is_counted():
    others = OtherLoad()
    child = "import time\nend = time.perf_counter() + 0.8\nwhile time.perf_counter() < end: pass"
    subprocess.run([sys.executable, "-c", child], check=True)
    assert others.cores() > 0.5  # the child kept one core busy for most of the interval
