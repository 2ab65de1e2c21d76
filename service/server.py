"""Assembling the LitServe server and running it until SIGTERM or Ctrl-C has drained it."""

from __future__ import annotations

import multiprocessing as mp
import os

import litserve as ls
import torch

from model import resolve_device
from service import signals
from service.access import AccessLog
from service.api import GenerationAPI
from service.board import Board, RegisterApiServer
from service.probes import probes
from service.settings import ServiceSettings
from service.spec import document_request_bodies


class Server(ls.LitServer):
    """LitServer whose shutdown drains every HTTP server at once and leaves no worker behind."""

    _stopping = False

    def launch_single_inference_worker(self, lit_api, worker_id):
        # LitServe's worker monitor respawns dead workers, the ones a shutdown is stopping included.
        if self._stopping:
            return self.inference_workers[worker_id]
        return super().launch_single_inference_worker(lit_api, worker_id)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        self._stopping = True
        # LitServe stops the HTTP servers one after another, each draining up to the timeout while
        # the others still take new requests: signal them all first so they stop accepting together.
        for worker in uvicorn_workers.values():
            if isinstance(worker, mp.Process) and worker.is_alive():
                worker.terminate()
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)


def build(settings: ServiceSettings) -> Server:
    """The server for `settings`; ValueError if they do not fit this machine."""
    device = resolve_device(settings.device)
    if settings.quantize != "none" and device.type != "cpu":
        raise ValueError(f"--quantize {settings.quantize} uses CPU kernels; the workers would run on {device}")
    if device.type == "cuda":
        devices = [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
    else:
        devices = [0]
    board = Board(workers=len(devices) * settings.workers, api_servers=settings.api_servers)
    server = Server(
        GenerationAPI(settings, board),
        accelerator=device.type,
        devices=devices if device.type == "cuda" else 1,
        workers_per_device=settings.workers,
        timeout=settings.queue_timeout,
        # /health is the service's readiness (a model is served); LitServe's own (workers are up) is liveness.
        healthcheck_path="/live",
        middlewares=[(AccessLog, {}), (RegisterApiServer, {"board": board})],
        # A worker that dies is replaced; requests it held fail with 503 (see calls.py).
        restart_workers=True,
    )
    server.uvicorn_graceful_timeout = settings.drain_timeout
    server.app.include_router(probes(settings, board))
    document_request_bodies(server.app)
    return server


def serve(server: Server, settings: ServiceSettings) -> None:
    main_pid = os.getpid()
    # HTTP servers and LitServe's manager are forked from here: they must not outlive this process,
    # nor inherit the SIGTERM handler meant for it.
    os.register_at_fork(after_in_child=lambda: signals.forked_child(main_pid))
    signals.interrupt_on_sigterm()
    server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=settings.api_servers,
        log_level=settings.log_level,
        generate_client_file=False,
        access_log=False,  # service.access logs every request, with its id and token counts
    )
