"""One line that says which machine a benchmark ran on (RESULTS.md wants it with every number).

The benchmarks are run as scripts (``python benchmarks/bench_x.py``), so this folder is first
on ``sys.path`` and they import it as ``from machine import machine_line``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_line() -> str:
    """CPU model (from /proc/cpuinfo where there is one), core count and Python version."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"
