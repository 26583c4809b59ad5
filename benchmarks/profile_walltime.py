"""Wall time of `gradscope profile` with no options (the default study), against its three-minute budget.

Runs the command in a fresh process, as a newcomer would, and prints the wall time, the ratio to the 180 s
budget, and the load average before and after (the machine may be shared: note it beside the number).

    python benchmarks/profile_walltime.py            # the default study
    python benchmarks/profile_walltime.py -- --steps 10   # extra options are passed to `gradscope profile`
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

BUDGET_S = 180.0


def main() -> None:
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    import os

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "gradscope", "profile", "--quiet", "--out", out] + extra,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"gradscope profile exited {proc.returncode}")
    import resource

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime  # the command and its worker processes (waited for), all cores
    cores = os.cpu_count() or 1
    print(f"gradscope profile {' '.join(extra) or '(defaults)'}: {wall:.1f} s wall, "
          f"x{wall / BUDGET_S:.2f} of the {BUDGET_S:.0f} s budget (load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {cores} CPUs); {cpu_s:.0f} CPU-s in all, so about "
          f"{cpu_s / cores:.0f} s on an idle {cores}-core machine")
    print(f"machine: {describe()}")


if __name__ == "__main__":
    main()
