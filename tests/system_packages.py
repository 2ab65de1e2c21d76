"""Makes sure the system programs a make target needs are there before it starts, installing them where it can.

The tests run real programs: Prometheus (promtool and the server, for the dashboard's queries), a Compose
implementation (the compose file is validated by one) and Chromium (the page, in a real browser); `make
test-compose` also needs a Docker engine and debootstrap. They come from the system's package manager, not
pip. Run as root on Debian or Ubuntu, this script installs what is missing with apt-get, once. Anywhere
else it exits 1 at once with one line naming the missing programs and the command that installs them,
rather than letting the tests fail one by one for fourteen minutes.

Usage: python3 tests/system_packages.py PROGRAM=PACKAGE ... (stdlib only: it runs before the virtualenv exists).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Ubuntu's apt names a few programs' packages differently from Debian's.
UBUNTU_PACKAGES = {"chromium": "chromium-browser"}


def distribution() -> set[str]:
    """The ids of /etc/os-release (ID and ID_LIKE): {"debian"}, {"ubuntu", "debian"}, or empty."""
    try:
        with open("/etc/os-release") as release:
            fields = dict(line.rstrip("\n").split("=", 1) for line in release if "=" in line)
    except OSError:
        return set()
    return {word.strip('"') for key in ("ID", "ID_LIKE") for word in fields.get(key, "").strip('"').split()}


def missing(wanted: dict[str, str]) -> dict[str, str]:
    return {program: package for program, package in wanted.items() if shutil.which(program) is None}


def packages_for(absent: dict[str, str], ids: set[str]) -> list[str]:
    names = absent.values()
    if "ubuntu" in ids:
        names = [UBUNTU_PACKAGES.get(name, name) for name in names]
    return sorted(set(names))


def main(argv: list[str]) -> int:
    wanted = dict(argument.split("=", 1) for argument in argv)
    absent = missing(wanted)
    if not absent:
        return 0
    ids = distribution()
    packages = packages_for(absent, ids)
    apt = shutil.which("apt-get")
    if apt and ids & {"debian", "ubuntu"} and os.geteuid() == 0:
        print(f"installing {', '.join(packages)} with apt-get (for {', '.join(absent)})", flush=True)
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run([apt, "update", "-qq"], check=True, env=environment)
            subprocess.run([apt, "install", "-y", "-qq", *packages], check=True, env=environment, stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            print(f"apt-get could not install {', '.join(packages)} (its reason above); install them, then run again",
                  file=sys.stderr)
            return 1
        still = missing(wanted)
        if still:
            print(f"apt-get installed {', '.join(packages)} but {', '.join(still)} is still not on PATH", file=sys.stderr)
            return 1
        return 0
    how = f"sudo apt-get install {' '.join(packages)}" if ids & {"debian", "ubuntu"} else (
        f"install {', '.join(packages)} with your system's package manager")
    print(f"missing programs: {', '.join(absent)}; install them first: {how}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
