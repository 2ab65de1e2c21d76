"""CPU, memory, threads and open files of every service process, read from /proc.

prometheus_client's own process collector describes only the process that serves the scrape and
does not work in multiprocess mode; this one reports the whole tree under the main process, one
series per process labelled by pid and role, under the standard `process_*` names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessStat:
    pid: int
    ppid: int
    state: str
    cpu_seconds: float
    threads: int
    start_ticks: int
    virtual_bytes: int
    resident_bytes: int


def read_stat(pid: int) -> ProcessStat | None:
    """The process's /proc/PID/stat, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may itself contain spaces or parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return ProcessStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        cpu_seconds=(int(fields[11]) + int(fields[12])) / TICKS,
        threads=int(fields[17]),
        start_ticks=int(fields[19]),
        virtual_bytes=int(fields[20]),
        resident_bytes=int(fields[21]) * PAGE,
    )


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    stat = read_stat(pid) if pid > 0 else None
    return stat is not None and stat.state not in ("Z", "X")


def descendants(root: int) -> list[ProcessStat]:
    """`root` and every live process below it."""
    stats = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None and stat.state not in ("Z", "X"):
                stats[stat.pid] = stat
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, frontier = [], [root] if root in stats else []
    while frontier:
        pid = frontier.pop()
        found.append(stats[pid])
        frontier.extend(children.get(pid, []))
    return found


def _boot_time() -> float:
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("/proc/stat has no btime")


def _open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return None


def _max_fds(pid: int) -> int | None:
    try:
        for line in (PROC / str(pid) / "limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except OSError:
        pass
    return None


class ProcessTreeCollector(Collector):
    """Collects the process tree under `root_pid`; `roles` names known pids (others are helpers)."""

    def __init__(self, root_pid: int, roles: dict[int, str]):
        self.root_pid = root_pid
        self.roles = roles

    def collect(self) -> Iterator:
        labels = ["pid", "role"]

        def gauge(name, documentation):
            return GaugeMetricFamily(name, documentation, labels=labels)

        families = {
            "cpu": CounterMetricFamily(
                "process_cpu_seconds", "User and system CPU time spent in seconds.", labels=labels
            ),
            "rss": gauge("process_resident_memory_bytes", "Resident memory size in bytes."),
            "vms": gauge("process_virtual_memory_bytes", "Virtual memory size in bytes."),
            "start": gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
            "threads": gauge("process_threads", "Number of OS threads in the process."),
            "fds": gauge("process_open_fds", "Number of open file descriptors."),
            "max_fds": gauge("process_max_fds", "Maximum number of open file descriptors."),
        }
        boot = _boot_time()
        for stat in descendants(self.root_pid):
            role = "main" if stat.pid == self.root_pid else self.roles.get(stat.pid, "helper")
            values = [str(stat.pid), role]
            families["cpu"].add_metric(values, stat.cpu_seconds)
            families["rss"].add_metric(values, stat.resident_bytes)
            families["vms"].add_metric(values, stat.virtual_bytes)
            families["start"].add_metric(values, boot + stat.start_ticks / TICKS)
            families["threads"].add_metric(values, stat.threads)
            fds, max_fds = _open_fds(stat.pid), _max_fds(stat.pid)
            if fds is not None:
                families["fds"].add_metric(values, fds)
            if max_fds is not None:
                families["max_fds"].add_metric(values, max_fds)
        yield from families.values()
