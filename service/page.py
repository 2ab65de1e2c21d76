"""The page at `/`, to talk to the model and watch it learn, and the training curve it draws.

The page is three plain files in service/static/ and an icon, read once at start and served from
memory, so no path from a request ever reaches the file system. They carry a Content-Security-Policy
that allows only themselves and requests to this service: no inline script or style, nothing from
elsewhere, no framing. `GET /v1/training` answers the training run's loss curve from the trainer's
metrics.jsonl in the checkpoint folder (read-only), under the same API-key rule as the other /v1 routes:
read off the event loop, a bounded amount at a time, so that no file there (a FIFO, a 200 MB log, a line of
200,000 brackets) can stall the requests the HTTP process serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request, Response

from model.files import open_regular_file
from service.bridge import RouteSpec
from service.errors import Refusal
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# The route of each file of the page: (file in service/static, media type).
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/static/icon.svg": ("icon.svg", "image/svg+xml"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load, so a new version of the service never runs an old script.
    "Cache-Control": "no-cache",
}

# The trainer writes it (trainer/report.py's METRICS_FILE; the page's tests check that they agree).
METRICS_FILE = "metrics.jsonl"
# Points per curve in an answer: a chart's width in pixels, whatever the length of the run.
MAX_POINTS = 1000
# The work of one step of reading metrics.jsonl: at most this many lines, read in at most this many bytes.
# About 10 ms of parsing; a long run's file is caught up with over many steps, never in one.
STEP_LINES = 2000
STEP_BYTES = 256 * 1024
# A trainer's record is a few hundred bytes of flat JSON: longer lines, and lines with more opening brackets
# than a record could need (200,000 nested ones exhaust the parser's recursion), are passed over unparsed.
MAX_LINE = 16 * 1024
# Bytes at the start of the file and before the read position compared at each step, to tell the file read
# so far from one written anew in its place with the same inode number.
CHECKED_BYTES = 64
MAX_BRACKETS = 8
# After a step that took t seconds the log rests REST x t before the next, so that catching up on a long file
# takes at most a tenth of the HTTP process's time (and of its GIL) from the requests it serves.
REST = 9
# Seconds a step may take (a hung network mount, a huge read) before the route answers 503 instead.
STEP_TIMEOUT = 5.0
# What a record may tell the page about the trainer's latest step; each must be a finite number if present.
LATEST_FIELDS = ("step", "loss", "val_loss", "lr", "tokens_per_sec", "elapsed", "tokens")


class Page:
    def __init__(self, settings: ServiceSettings, authorize: Callable[[Request], None], spec: RouteSpec):
        self.authorize = authorize
        self.feed = TrainingFeed(TrainingLog(settings.checkpoint_path.parent / METRICS_FILE))
        for path, (name, media_type) in ASSETS.items():
            spec.add_endpoint(path, _asset((STATIC / name).read_bytes(), media_type), ["GET", "HEAD"])
        spec.add_endpoint("/v1/training", self.training, ["GET"])

    async def training(self, request: Request) -> Response:
        self.authorize(request)
        body = await self.feed.answer()
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


def _asset(content: bytes, media_type: str):
    async def asset(request: Request) -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return asset


class Curve:
    """At most `limit` points of a series that only grows: when full, every other point goes and only every
    `stride`-th point is kept from then on, so a run of any length keeps its whole shape in bounded memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.stride = 1
        self.count = 0
        self.points: list[tuple[int, float]] = []
        self.last: tuple[int, float] | None = None

    def add(self, step: int, value: float) -> None:
        self.last = (step, value)
        if self.count % self.stride == 0:
            self.points.append(self.last)
            if len(self.points) > self.limit:
                self.points = self.points[::2]
                self.stride *= 2
        self.count += 1

    def view(self) -> list[list]:
        """The kept points as [step, value] pairs, ending with the newest one whether it was kept or not."""
        points = self.points
        if self.last is not None and (not points or points[-1] is not self.last):
            points = [*points, self.last]
        return [list(point) for point in points]


class TrainingLog:
    """The trainer's metrics.jsonl, parsed incrementally into bounded curves.

    Each `step` parses at most STEP_LINES of what was appended since the last one, from where that one
    stopped; nothing is read twice. A line that is no record (too long, too deep, not JSON, without an integer
    step, with a field the page reads that is not a finite number) is skipped and counted, and the position
    moves past it. A file replaced (a resumed run rewrites it) or shortened is read again from its start.
    Steps run one at a time, in a thread; `body`, the answer, is rebuilt after each step that changed it.
    """

    def __init__(self, path: Path, limit: int = MAX_POINTS, lines: int = STEP_LINES, chunk: int = STEP_BYTES):
        self.path = path
        self.limit = limit
        self.lines = lines
        self.chunk = chunk
        self._restart(None)

    def _restart(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity
        self._offset = 0
        self._size = 0
        # The first and the last bytes parsed, which the file must still hold at its start and before _offset.
        self._head = self._before = b""
        # Inside a line too long to be a record: what comes before its end is passed over.
        self._passing = False
        self.records = 0
        self.skipped = 0
        self.train = Curve(self.limit)
        self.val = Curve(self.limit)
        self.latest: dict | None = None
        self.body = self._render()

    def step(self) -> bool:
        """Parse the next lines of the file; return whether that was all there is to parse for now (the end of
        the file, or a last line still being written). Raises the OSError of a file that cannot be read
        (NotRegularFile for a FIFO, folder, device or socket); a missing file is an empty log."""
        try:
            with open_regular_file(self.path) as file:
                stat = os.fstat(file.fileno())
                identity = (stat.st_dev, stat.st_ino)
                moved = identity != self._identity or stat.st_size < self._offset
                if moved or not self._still_holds_what_was_parsed(file):
                    self._restart(identity)
                file.seek(self._offset)
                data = file.read(self.chunk)
        except (FileNotFoundError, NotADirectoryError):
            if self._identity is not None:
                self._restart(None)
            return True
        complete = self._offset >= self._size
        self._size = stat.st_size
        consumed = self._parse(data)
        self._offset += consumed
        self._head += data[: min(consumed, CHECKED_BYTES - len(self._head))]
        self._before = (self._before + data[:consumed])[-CHECKED_BYTES:]
        if consumed or complete != (self._offset >= self._size):
            self.body = self._render()
        return not consumed or self._offset >= self._size

    def _still_holds_what_was_parsed(self, file) -> bool:
        """Whether the file still holds the first bytes parsed at its start and the last ones just before where
        parsing stopped. A file deleted and written again may get the old one's inode number (and so its
        identity), as a test's log did; a check for a mere line end there, as there was, then took the new
        file for the old wherever one of its lines ended at the same place, and passed over its first
        records. A new run's log differs from the old within its first record."""
        if not self._before:
            return True
        file.seek(0)
        if file.read(len(self._head)) != self._head:
            return False
        file.seek(self._offset - len(self._before))
        return file.read(len(self._before)) == self._before

    def _parse(self, data: bytes) -> int:
        """Add the whole lines at the start of `data`, at most `lines` of them; return the bytes consumed."""
        position = 0
        for _ in range(self.lines):
            end = data.find(b"\n", position)
            if end < 0:
                # The trainer may be halfway through appending the last line; one already too long is no
                # record, however it ends (nor is one that fills a whole chunk).
                if self._passing or len(data) - position > MAX_LINE or (position == 0 and len(data) == self.chunk):
                    if not self._passing:
                        self.skipped += 1
                    self._passing = True
                    position = len(data)
                break
            line = data[position:end]
            position = end + 1
            if self._passing:
                self._passing = False
            elif not self._add(line):
                self.skipped += 1
        return position

    def _add(self, line: bytes) -> bool:
        if len(line) > MAX_LINE or line.count(b"[") + line.count(b"{") > MAX_BRACKETS:
            return False
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if not isinstance(record, dict) or not _integer(record.get("step")):
            return False
        latest = {key: record[key] for key in LATEST_FIELDS if key in record}
        if not all(_finite(value) for value in latest.values()):
            return False
        self.records += 1
        if "loss" in latest:
            self.train.add(latest["step"], latest["loss"])
        if "val_loss" in latest:
            self.val.add(latest["step"], latest["val_loss"])
        self.latest = latest
        return True

    def view(self) -> dict:
        """The curves so far: `train` and `val` as [step, loss] pairs, the number of `records` read and of lines
        `skipped`, the `latest` record, and whether the end of the file was reached (`complete`)."""
        return {
            "object": "training",
            "records": self.records,
            "skipped": self.skipped,
            "train": self.train.view(),
            "val": self.val.view(),
            "latest": self.latest,
            "complete": self._offset >= self._size,
        }

    def _render(self) -> bytes:
        return json.dumps(self.view()).encode()


class TrainingFeed:
    """The training log as one HTTP process serves it: steps run in a thread of the process's own, one at a
    time, paced (REST) and bounded in time (STEP_TIMEOUT); answers come from memory.

    A request that finds no step running (nor resting after one) starts one and waits for it, so that its
    answer follows the file; while the file has more, further steps follow by themselves, and requests
    meanwhile are answered at once with what was read so far (`complete` false). Made before the HTTP
    processes fork; each starts its own thread when it first needs it.
    """

    def __init__(self, training: TrainingLog):
        self.training = training
        self._pid: int | None = None

    def _here(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="training-log")
            self._running: asyncio.Future | None = None
            self._started = self._rest_until = 0.0
            # Why the last step failed (a Refusal's detail), or None.
            self._failure: dict | None = None

    async def answer(self) -> bytes:
        """The log's answer as JSON; a Refusal if the file cannot be read, or reading it hangs."""
        self._here()
        if self._running is None and time.monotonic() >= self._rest_until:
            done, _ = await asyncio.wait({self._start()}, timeout=STEP_TIMEOUT)
            if not done:
                raise Refusal("training_log_slow", path=self.training.path, seconds=STEP_TIMEOUT)
        elif self._running is not None and time.monotonic() - self._started > STEP_TIMEOUT:
            raise Refusal("training_log_slow", path=self.training.path, seconds=STEP_TIMEOUT)
        if self._failure is not None:
            raise Refusal("training_log_unreadable", **self._failure)
        return self.training.body

    def _start(self) -> asyncio.Future:
        self._started = time.monotonic()
        self._running = asyncio.get_running_loop().run_in_executor(self._thread, self._timed_step)
        # First of the future's callbacks: the request waiting for it sees what it recorded.
        self._running.add_done_callback(self._stepped)
        return self._running

    def _timed_step(self) -> tuple[bool, float]:
        started = time.perf_counter()
        return self.training.step(), time.perf_counter() - started

    def _stepped(self, running: asyncio.Future) -> None:
        self._running = None
        failure = running.exception()
        if failure is None:
            at_end, seconds = running.result()
            self._failure = None
            self._rest_until = time.monotonic() + REST * seconds
            if not at_end:
                asyncio.get_running_loop().call_later(REST * seconds, self._resume)
            return
        path = self.training.path
        if isinstance(failure, OSError):
            reason = str(failure) if failure.strerror is None else f"{path}: {failure.strerror}"
        else:
            log.error("reading %s failed", path, exc_info=failure)
            reason = f"{path}: {type(failure).__name__}"
        if self._failure != {"problem": reason}:
            log.warning("cannot read the training log %s", reason)
        self._failure = {"problem": reason}
        self._rest_until = time.monotonic() + REST * (time.monotonic() - self._started)

    def _resume(self) -> None:
        if self._running is None:
            self._start()


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    # JSON answers cannot carry NaN or infinities (nor can a chart).
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
