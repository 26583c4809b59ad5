"""Wall time and CPU-seconds of `gradscope profile` with no options (the default study), against its three-minute
budget, and against another version of gradscope in the same session.

Runs the command in a fresh process, as a newcomer would, and prints for each run the wall time, the CPU-seconds
of the command and all its worker processes (user + sys), the load average before and after (the machine may be
shared: note it beside the number), and the claims' answers with the training claims' intervals, so that a
cheaper study can be seen to answer the same. With ``--against REV`` the runs alternate between that git revision
(checked out into a temporary worktree) and this checkout, ``--repeats`` times each, and the medians and their
ratio close the output: one run of the default study varies by up to 18% on a 2-core machine
(docs/performance.md), so single runs compare nothing.

    python benchmarks/profile_walltime.py                          # the default study, once
    python benchmarks/profile_walltime.py --against 00f4332 --repeats 3
    python benchmarks/profile_walltime.py -- --steps 10            # options after -- go to `gradscope profile`
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: CPU model, GPU, load average)

BUDGET_S = 180.0
HERE = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    """CPU-seconds of every child process waited for so far (they accumulate: take differences)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def claims_line(summary: Dict) -> str:
    """``bn_forward yes, ..., degradation yes +1.24 [+0.76, +1.72]`` from a study's summary.json."""
    parts = []
    for c in summary.get("claims", []):
        text = f"{c.get('key')} {c.get('answer')}"
        if c.get("estimate") is not None and c.get("low") is not None:
            text += f" {c['estimate']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"
        parts.append(text)
    return ", ".join(parts) or "(no claims)"


def run_once(tree: Path, extra: Sequence[str]) -> Dict[str, object]:
    """One `gradscope profile --quiet` of the checkout at ``tree`` in a fresh process: wall, CPU-s, load, claims."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=str(tree))
        before, start = _children_cpu(), time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "gradscope", "profile", "--quiet", "--out", out, *extra],
                              cwd=tree, env=env, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - start, _children_cpu() - before
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"gradscope profile ({tree}) exited {proc.returncode}")
        summary_file = Path(out) / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    answers = tuple((c.get("key"), c.get("answer")) for c in summary.get("claims", []))
    return {"wall": wall, "cpu": cpu, "load": (load, os.getloadavg()[0]), "claims": claims_line(summary),
            "answers": answers}


def _worktree(rev: str, where: Path) -> Path:
    """A detached checkout of ``rev`` of this repository at ``where`` (git worktree; removed by the caller)."""
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", str(where), rev], check=True)
    return where


def summarise(label: str, runs: List[Dict[str, object]]) -> str:
    cpu = [float(r["cpu"]) for r in runs]
    wall = [float(r["wall"]) for r in runs]
    return (f"{label}: median {statistics.median(cpu):.0f} CPU-s ({', '.join(f'{c:.0f}' for c in cpu)}), "
            f"median {statistics.median(wall):.0f} s wall")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", metavar="REV", help="a git revision to time, taking turns with this checkout")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each version (default 1)")
    args = parser.parse_args(own)
    cores = os.cpu_count() or 1
    print(f"machine: {describe()}")
    print(f"gradscope profile {' '.join(extra) or '(defaults)'}; CPU-s = user + sys of the command and its workers")
    runs: Dict[str, List[Dict[str, object]]] = {"this": [], args.against or "": []}
    with tempfile.TemporaryDirectory() as tmp:
        other = _worktree(args.against, Path(tmp) / "against") if args.against else None
        try:
            for _ in range(max(1, args.repeats)):
                for label, tree in ((args.against, other), ("this", HERE)):
                    if tree is None:
                        continue
                    r = run_once(tree, extra)
                    runs[label].append(r)
                    print(f"  {label:>10s}: {r['wall']:.1f} s wall (x{r['wall'] / BUDGET_S:.2f} of the "
                          f"{BUDGET_S:.0f} s budget), {r['cpu']:.0f} CPU-s (about {r['cpu'] / cores:.0f} s on an "
                          f"idle {cores}-core machine); load average {r['load'][0]:.1f} before, "
                          f"{r['load'][1]:.1f} after; claims: {r['claims']}", flush=True)
        finally:
            if other is not None:
                subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(other)], check=False)
    print(summarise("this", runs["this"]))
    if args.against:
        print(summarise(args.against, runs[args.against]))
        ratio = statistics.median(float(r["cpu"]) for r in runs["this"]) / \
            statistics.median(float(r["cpu"]) for r in runs[args.against])
        same = len({r["answers"] for r in runs["this"] + runs[args.against]}) == 1
        print(f"CPU-s ratio this / {args.against}: x{ratio:.3f} (medians); "
              f"answers {'the same in every run' if same else 'DIFFER between runs: compare the claims above'}")
    print(f"after: {describe()}")


if __name__ == "__main__":
    main()
