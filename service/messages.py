"""What the HTTP processes and the inference workers say to each other through LitServe's queues.

A request travels to a worker as a `GenerationRequest`. The worker answers first with `Accepted` or
`Refused`, so the HTTP process can choose the status code before it sends any header, then with
`Chunk`s until one carries a finish reason, or with `Failed` if generation breaks after acceptance.
Workers say why (a reason and its figures); the HTTP edge (service/errors.py) decides the status
code, the words and the headers. Cancellations travel on a per-worker control queue as a request id,
or as `ServerGone` for every request of an HTTP process that died.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from model import SamplingParams

# A finish reason of our own for requests whose client went away (vLLM's name for it).
FINISH_ABORT = "abort"


@dataclass(frozen=True)
class ModelInfo:
    """Which weights produced a response."""

    step: int | None
    val_loss: float | None
    checkpoint: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    # time.monotonic() when the HTTP process received the request: CLOCK_MONOTONIC is one clock for
    # every process on the machine, so the worker can measure queueing and time to first token.
    received_at: float
    # Which HTTP process holds the client, so that its requests can be cancelled if it dies.
    api_server: int = 0


@dataclass(frozen=True)
class Accepted:
    worker_id: int
    pid: int
    model: ModelInfo


@dataclass(frozen=True)
class Refused:
    """Why a worker did not take a request (a key of service.errors.REASONS) and the figures behind it."""

    reason: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """New text, how many tokens it came from and how many of those were kept drafts (speculative
    decoding); the last chunk of a request has a finish reason."""

    text: str
    tokens: int
    finish_reason: str | None = None
    drafted: int = 0


@dataclass(frozen=True)
class Failed:
    """Generation broke after the request was accepted."""

    reason: str


@dataclass(frozen=True)
class ServerGone:
    """HTTP process `api_server` died: nobody is left to read its requests' answers."""

    api_server: int


def merge_chunks(messages: list) -> list:
    """Consecutive chunks joined into one (texts concatenated, counts added); other messages kept."""
    merged: list = []
    for message in messages:
        previous = merged[-1] if merged else None
        if isinstance(message, Chunk) and isinstance(previous, Chunk) and previous.finish_reason is None:
            merged[-1] = join(previous, message)
        else:
            merged.append(message)
    return merged


def join(first: Chunk, second: Chunk) -> Chunk:
    """One chunk for two consecutive ones of a request."""
    return Chunk(
        first.text + second.text, first.tokens + second.tokens, second.finish_reason, first.drafted + second.drafted
    )
