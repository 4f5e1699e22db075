"""Machine facts that every benchmark records next to its timings (one home for them).

Benchmarks import this module by putting ``experiments/`` on ``sys.path`` (they run as scripts):
``from machine import cpu_model, loadavg``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_model", "loadavg"]


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``, else ``lscpu``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or None


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, rounded to 0.01 (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None
