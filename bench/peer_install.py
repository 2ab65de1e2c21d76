"""Install the decode benchmark's peers into the running (benchmark) environment, each on its own.

    .bench-venv/bin/python -m bench.peer_install bench/peers-requirements.txt

A peer that fails to install or build does not stop the others: its pip output is kept under
.cache/bench/ and the reason lands in .cache/bench/peers-install.json, which bench.peers reads to
report the peer as missing, with that reason, instead of leaving it out of the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"
STATUS = CACHE / "peers-install.json"


def requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def install(requirement: str) -> dict:
    name = requirement.split("==", 1)[0]
    log = CACHE / f"install-{name}.log"
    # llama.cpp compiles for this CPU (GGML_NATIVE), on every core: the one-time cost `make bench` excludes.
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "pip", "install", requirement], stdout=out,
                              stderr=subprocess.STDOUT, env=env).returncode  # fmt: skip
    if code == 0:
        return {"requirement": requirement, "installed": True, "reason": None}
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"requirement": requirement, "installed": False, "reason": f"pip install failed ({log}): {' / '.join(tail)}"}


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    status = {}
    for requirement in requirements(Path(sys.argv[1])):
        print(f"installing {requirement}", flush=True)
        status[requirement.split("==", 1)[0]] = result = install(requirement)
        if not result["installed"]:
            print(f"  {result['reason']}", flush=True)
    STATUS.write_text(json.dumps(status, indent=2) + "\n")


if __name__ == "__main__":
    main()
