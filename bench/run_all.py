"""`make bench`: every benchmark against its reference in one run, then the plots and the README's section.

    python -m bench.run_all [--full] [--only train decode serve]

Each benchmark runs in its own process, one after the other, and measures its reference in the same
run. The default lengths fit the 2-core machine in under 20 minutes: a 1-minute quality race per
side instead of 10, 4 interleaved throughput rounds instead of 8, the serving benchmark on the gpt2
shape only (the shape its goals are set for) with 4 requests per sweep level (at least the
concurrency) instead of mini and gpt2 with 32. --full runs the full-length versions (about 45
minutes). suite.json records what each step ran, how long it took, the files it wrote and the load
average around it, since a shared machine slows benchmarks down (a run with --only replaces its
steps there and keeps the others); bench.plot and bench.report then read those files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import plot, report
from bench.common import RESULTS, print_table, write_result

# `make bench-env`'s interpreter, which has the decode benchmark's peers; without it they are reported missing.
BENCH_PYTHON = Path(__file__).resolve().parents[1] / ".bench-venv" / "bin" / "python"

# name: (module and flags for the quick run, extra flags of the full-length run)
STEPS = {
    "train": (["bench.bench_train", "--minutes", "1", "--rounds", "4"], ["--minutes", "10", "--rounds", "8"]),
    "kernels": (["bench.bench_kernels", "--rounds", "3"], ["--rounds", "7"]),
    "decode": (["bench.bench_decode"], []),
    "serve": (["bench.bench_serve", "--presets", "gpt2", "--sweep-requests", "4"],
              ["--presets", "mini", "gpt2", "--sweep-requests", "32"]),
    "balancer": (["bench.bench_balancer"], ["--rounds", "8"]),
    "speculative": (["bench.bench_speculative", "--rounds", "5"], ["--rounds", "9", "--prompts", "8"]),
}


def run_step(name: str, full: bool) -> dict:
    quick, full_flags = STEPS[name]
    python = str(BENCH_PYTHON) if name == "decode" and BENCH_PYTHON.exists() else sys.executable
    command = [python, "-m", *quick, *(full_flags if full else [])]  # later flags win in argparse
    print(f"\n=== {name}: {' '.join(command[2:])}  (load average {os.getloadavg()[0]:.2f})", flush=True)
    before = {path.name: path.stat().st_mtime for path in RESULTS.glob("*.json")}
    load_before, start = os.getloadavg(), time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    written = sorted(path.name for path in RESULTS.glob("*.json") if before.get(path.name) != path.stat().st_mtime)
    return {
        "name": name,
        "full": full,
        "command": command[2:],
        "exit_code": code,
        "seconds": time.perf_counter() - start,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": written,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full-length benchmarks (about 45 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args()
    start = time.perf_counter()
    steps = [run_step(name, args.full) for name in args.only]
    print_table("Benchmark suite", [{k: s[k] for k in ("name", "exit_code", "seconds", "results")} for s in steps])
    failed = [s["name"] for s in steps if s["exit_code"] != 0]
    if failed:
        # The plots and the README keep showing the last complete run rather than a partial one.
        sys.exit(f"failed: {', '.join(failed)}; suite.json, the plots and the README are left as they were")
    # A partial run (--only) replaces its steps in the last suite and keeps the others.
    previous = json.loads((RESULTS / "suite.json").read_text())["steps"] if (RESULTS / "suite.json").exists() else []
    merged = {s["name"]: s for s in previous} | {s["name"]: s for s in steps}
    steps = [merged[name] for name in STEPS if name in merged]
    write_result("suite", {"wall_seconds": time.perf_counter() - start, "steps": steps})
    plot.main([])
    report.main([])


if __name__ == "__main__":
    main()
