"""One line that names the machine a benchmark ran on: CPU model (as ``lscpu`` reports it), cores, torch threads,
the GPU if one is used, and the load average, so that every printed ratio carries its conditions."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

import torch


def cpu_model() -> str:
    """The CPU model name from ``lscpu`` (``/proc/cpuinfo`` or ``platform.processor()`` where it is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def describe(device: Optional[str] = None) -> str:
    """``CPU model, N cores, torch X (T threads)[, GPU name]; load average a, b, c``."""
    gpu = ""
    if device and device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name()}"
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}; {load()}")


if __name__ == "__main__":
    print(describe())
