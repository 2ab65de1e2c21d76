"""Every knob of the inference service, from flags, `SERVICE_*` environment variables or defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVICE_", frozen=True)

    # Network
    host: Literal["0.0.0.0", "127.0.0.1", "::"] = Field(
        "0.0.0.0", description="Interface to listen on (LitServe accepts these three)."
    )
    port: int = Field(8000, ge=1024, le=65535, description="TCP port of the HTTP API.")
    api_servers: int = Field(1, ge=1, le=64, description="HTTP server processes in front of the inference workers.")

    # Model
    checkpoint_dir: Path = Field(Path("checkpoints"), description="Folder the trainer publishes checkpoints into.")
    checkpoint_name: str = Field(
        "best_model.pt", min_length=1, description="File in the checkpoint folder that is served and hot-reloaded."
    )
    poll_interval: float = Field(
        0.5, gt=0, le=60, description="Seconds between checks of the checkpoint file for a new version."
    )
    init: str | None = Field(
        None,
        description="Weights to serve until a checkpoint appears: a Hugging Face GPT-2 name (gpt2 ... gpt2-xl) "
        "or a save_pretrained directory.",
    )
    model_name: str = Field(
        "gpt", min_length=1, description="Model id that /v1/models lists and /v1/completions expects."
    )

    # Inference workers
    workers: int = Field(1, ge=1, le=64, description="Inference worker processes (per device); each holds the model.")
    device: str = Field(
        "auto", description="Torch device of the workers: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Weight precision. auto: at the first load, time one decode step of a full batch in each "
        "precision (in the served layout, well under a second) and serve the faster; /health and gpt_model_dtype "
        "say which.",
    )
    quantize: Literal["none", "int8", "int4"] = Field(
        "none",
        description="Quantized linear layers, CPU only: int8 (8-bit weights and activations, multiplied exactly in "
        "integers) is close to lossless and the fastest here; int4 (4-bit weights only) at a measurable cost in "
        "quality.",
    )
    pack_weights: bool = Field(
        True,
        description="CPU workers: pack the linear weights once at load for our decode kernels (plain or int8 "
        "layers; built by make install where a C++ compiler is found), else in oneDNN's blocked layout (plain "
        "layers), rather than reorder them on every matrix product. GPT_KERNEL_ISA=scalar|avx2|avx512|avx512_dot "
        "forces the kernels' instruction set (none: leaves them off).",
    )
    batch_invariant: bool = Field(
        True,
        description="A seeded request's tokens do not depend on which requests share its steps (the README's "
        "Batch invariance). --no-batch-invariant drops that promise for the engine's plain batched path: "
        "prompts prefilled padded together, one masked attention call per layer, no padded row counts; "
        "make bench measures what it buys.",
    )
    speculation: bool = Field(
        True,
        description="Whether requests that do not say (their 'speculate' field) check drafts: prompt lookup, and "
        "the draft model where --draft-checkpoint is given. Drafts change no token, only how soon tokens come. "
        "Needs batch invariance: with --no-batch-invariant speculation is off, whatever a request asks.",
    )
    draft_checkpoint: Path | None = Field(
        None,
        description="Draft model for speculative decoding: a checkpoint file, or a folder (one when the service "
        "starts) whose --checkpoint-name file, its best checkpoint, is used; any size, same tokenizer. Loaded in "
        "the served precision and layout with the first model, and hot-reloaded like it: a new version is "
        "swapped in between decode steps (running requests keep their text), a bad one is logged and the "
        "previous draft kept.",
    )
    draft_length: Literal["auto", "1", "2", "3", "4", "5", "6", "7", "8"] = Field(
        "auto",
        description="Draft tokens checked per request and step. auto: each request's from its measured acceptance "
        "and the passes' measured cost (none where drafting does not pay); a number: that many wherever there "
        "are drafts, whatever it pays (for benchmarks).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads per worker (none: the machine's cores but one, shared out between the workers: "
        "the HTTP side needs a core of its own, and on 2 cores one decode thread streamed faster than two).",
    )
    omp_wait_policy: Literal["passive", "default"] = Field(
        "passive",
        description="How the workers' OpenMP threads wait for work. passive: they sleep (with the trainer on the "
        "same two cores, spinning threads decoded 25x slower). default: OpenMP's brief spinning, up to 2x faster "
        "single-stream decoding on cores the service has to itself.",
    )
    max_batch_size: int = Field(
        16, ge=1, le=1024, description="Requests decoded together in one forward pass per worker."
    )
    stream_interval: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Seconds a stream's tokens may wait to travel together in one event (0: an event per token; "
        "the first and last tokens never wait). Each event costs CPU on its way out, as much as a small "
        "model's decode step.",
    )

    # Limits
    max_new_tokens: int = Field(1024, ge=1, description="Largest max_new_tokens (max_tokens) a request may ask for.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Largest prompt, in tokens, a request may send.")
    max_queued_requests: int = Field(
        64, ge=0, description="Requests a worker holds beyond its running batch; more are refused with 429."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body in bytes; larger ones get 413.")
    queue_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for an inference worker to pick it up before it fails."
    )
    accept_grace: float = Field(
        5.0,
        ge=0,
        description="Seconds after SIGTERM or Ctrl-C during which /health answers 503 (draining) while new requests "
        "are still accepted and served, so that a load balancer takes the replica out before it stops listening "
        "(the compose file's HAProxy needs 3 failed checks a second apart); then the drain begins. A second "
        "Ctrl-C skips it.",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds running requests get to finish after SIGTERM or Ctrl-C; requests still running then "
        "end with an error event and the service exits with status 1.",
    )
    request_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request's headers and body may take to arrive; slower ones get 408 and their "
        "connection is closed.",
    )
    stall_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a worker holding requests may go without progress (stopped, hung) before its requests "
        "fail with 503 and /health reports it stalled.",
    )
    load_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds a checkpoint load may take; a slower one is given up (counted as a timeout) and the "
        "previous model keeps serving.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, the /predict and /v1 routes require 'Authorization: Bearer <key>' (prefer the "
        "environment variable: flags show up in process listings). Empty means unset.",
    )

    # Operations
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    metrics_dir: Path | None = Field(
        None,
        description="Folder for prometheus_client's multiprocess files; wiped at start (none: a fresh temporary "
        "folder removed at exit). One service per folder: a second one given a folder in use exits, naming the "
        "running service's PID.",
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value):
        # Compose files pass `SERVICE_API_KEY: ${SERVICE_API_KEY:-}`: an empty key would otherwise admit
        # exactly the requests that send an empty bearer token, and refuse everyone else.
        return None if value == "" else value

    @property
    def checkpoint_path(self) -> Path:
        """The served checkpoint file."""
        return self.checkpoint_dir.resolve() / self.checkpoint_name

    @property
    def draft_path(self) -> Path | None:
        """The draft checkpoint file (in a folder, the file named like the served one), None without one."""
        if self.draft_checkpoint is None:
            return None
        path = self.draft_checkpoint.resolve()
        return path / self.checkpoint_name if path.is_dir() else path

    @property
    def fixed_draft_length(self) -> int | None:
        """--draft-length as the engine takes it: None for auto."""
        return None if self.draft_length == "auto" else int(self.draft_length)

    def worker_threads(self, workers: int) -> int:
        """Torch threads for each of `workers` inference workers."""
        # The cores this process may run on (a container's cpuset), not the host's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.threads or max(1, (cores - 1) // workers)
