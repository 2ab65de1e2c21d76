"""What the HTTP processes and the inference workers say to each other through LitServe's queues.

A request travels to a worker as a `GenerationRequest`. The worker answers first with `Accepted` or
`Rejected`, so the HTTP process can choose the status code before it sends any header, then with
`Chunk`s until one carries a finish reason, or with `Failed` if generation breaks after acceptance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class Accepted:
    worker_id: int
    pid: int
    model: ModelInfo


@dataclass(frozen=True)
class Rejected:
    status: int
    message: str
    code: str
    param: str | None = None
    retry_after: int | None = None


@dataclass(frozen=True)
class Chunk:
    """New text and how many tokens it came from; the last chunk of a request has a finish reason."""

    text: str
    tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class Failed:
    message: str


def merge_chunks(messages: list) -> list:
    """Consecutive chunks joined into one (texts concatenated, tokens added); other messages kept."""
    merged: list = []
    for message in messages:
        previous = merged[-1] if merged else None
        if isinstance(message, Chunk) and isinstance(previous, Chunk) and previous.finish_reason is None:
            merged[-1] = Chunk(previous.text + message.text, previous.tokens + message.tokens, message.finish_reason)
        else:
            merged.append(message)
    return merged
