"""The page at `/`, to talk to the model and watch it learn, and the training curve it draws.

The page is three plain files in service/static/ and an icon, read once at start and served from
memory, so no path from a request ever reaches the file system. They carry a Content-Security-Policy
that allows only themselves and requests to this service: no inline script or style, nothing from
elsewhere, no framing. `GET /v1/training` answers the training run's loss curve from the trainer's
metrics.jsonl in the checkpoint folder (read-only), under the same API-key rule as the other /v1 routes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from service.bridge import RouteSpec
from service.settings import ServiceSettings

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
# Bytes of metrics.jsonl read per request (about 5,000 records): a long run's file is caught up with
# over a few requests, each of bounded cost, rather than in one.
READ_BUDGET = 1 << 20
# What a record may tell the page about the trainer's latest step.
LATEST_FIELDS = ("step", "loss", "val_loss", "lr", "tokens_per_sec", "elapsed", "tokens")


class Page:
    def __init__(self, settings: ServiceSettings, authorize: Callable[[Request], None], spec: RouteSpec):
        self.authorize = authorize
        self.log = TrainingLog(settings.checkpoint_path.parent / METRICS_FILE)
        for path, (name, media_type) in ASSETS.items():
            spec.add_endpoint(path, _asset((STATIC / name).read_bytes(), media_type), ["GET", "HEAD"])
        spec.add_endpoint("/v1/training", self.training, ["GET"])

    async def training(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse(self.log.read(), headers={"Cache-Control": "no-store"})


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
    """The trainer's metrics.jsonl, read incrementally: each request reads what was appended since the last
    one (at most READ_BUDGET bytes of it), and a file replaced (a resumed run rewrites it) or shortened is
    read again from its start. One per HTTP process; its handlers run on one event loop, one at a time."""

    def __init__(self, path: Path, limit: int = MAX_POINTS, budget: int = READ_BUDGET):
        self.path = path
        self.limit = limit
        self.budget = budget
        self._restart(None)

    def _restart(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity
        self._offset = 0
        self.records = 0
        self.train = Curve(self.limit)
        self.val = Curve(self.limit)
        self.latest: dict | None = None

    def read(self) -> dict:
        """The curves so far: `train` and `val` as [step, loss] pairs, the number of `records` read, the
        `latest` record, and whether the read reached the end of the file (`complete`)."""
        try:
            with open(self.path, "rb") as file:
                stat = os.fstat(file.fileno())
                identity = (stat.st_dev, stat.st_ino)
                if identity != self._identity or stat.st_size < self._offset:
                    self._restart(identity)
                file.seek(self._offset)
                data = file.read(self.budget)
                size = stat.st_size
        except (FileNotFoundError, NotADirectoryError):
            self._restart(None)
            size = 0
        else:
            # Only whole lines: the trainer may be halfway through appending the last one. A line longer
            # than the budget is no record; it is passed over in budget-sized pieces.
            end = data.rfind(b"\n") + 1 or (len(data) if len(data) == self.budget else 0)
            for line in data[:end].splitlines():
                self._add(line)
            self._offset += end
        return {
            "object": "training",
            "records": self.records,
            "train": self.train.view(),
            "val": self.val.view(),
            "latest": self.latest,
            "complete": self._offset >= size,
        }

    def _add(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            return
        if not isinstance(step, int) or isinstance(step, bool):
            return
        self.records += 1
        if _finite(record.get("loss")):
            self.train.add(step, record["loss"])
        if _finite(record.get("val_loss")):
            self.val.add(step, record["val_loss"])
        self.latest = {key: record[key] for key in LATEST_FIELDS if key == "step" or _finite(record.get(key))}


def _finite(value) -> bool:
    # JSON answers cannot carry NaN or infinities (nor can a chart).
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
