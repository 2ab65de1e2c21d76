"""What every benchmark shares: a printed table and a JSON result file (with its provenance, from reporting)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from reporting import git_commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
# bench/gpu.sh's results, copied in from a lent GPU's run; the report and plots read them from here.
GPU_RESULTS = RESULTS / "gpu"
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def print_table(title: str, rows: list[dict]) -> None:
    """Rows of equal keys as an aligned text table."""
    print(f"\n{title}")
    if not rows:
        return
    columns = list(rows[0])
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_result(name: str, results: dict, results_dir: Path = RESULTS) -> Path:
    """Write `results` with the machine, commit and date to `<results_dir>/<name>.json`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    record = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        **results,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def read_results(results_dir: Path = RESULTS) -> dict[str, dict]:
    """The records of the last `make bench` run by benchmark name, and that run's own record as "suite".

    suite.json lists the files the run wrote, so results of other, older runs in the folder stay out."""
    suite = json.loads((results_dir / "suite.json").read_text())
    records = {"suite": suite}
    for step in suite["steps"]:
        for name in step["results"]:
            record = json.loads((results_dir / name).read_text())
            records[record["benchmark"]] = record
    return records


def read_gpu_results(results_dir: Path = RESULTS) -> dict[str, dict]:
    """bench/gpu.sh's records in `<results_dir>/gpu`, by benchmark name (none until a GPU run is copied in)."""
    paths = sorted((results_dir / GPU_RESULTS.name).glob("gpu_*.json"))
    return {path.stem: json.loads(path.read_text()) for path in paths}


def serve_record(records: dict[str, dict]) -> dict:
    """The serving benchmark's record, whose name carries its presets and OpenMP wait policy."""
    return next(record for name, record in records.items() if name.startswith("serve_"))
