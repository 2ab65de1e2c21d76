"""Assembling the service (routes, inference API, LitServe server) and running it until it has drained."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource

import torch

from model import resolve_device
from service import bridge, errors, metrics, signals
from service.access import AccessLog
from service.api import GenerationAPI
from service.routes import Routes, document_request_bodies
from service.settings import ServiceSettings
from service.status import StatusBoard


def build(settings: ServiceSettings) -> bridge.Server:
    """The server for `settings`; ValueError if they do not fit this machine."""
    device = resolve_device(settings.device)
    if settings.quantize != "none" and device.type != "cpu":
        raise ValueError(f"--quantize {settings.quantize} uses CPU kernels; the workers would run on {device}")
    if device.type == "cuda":
        devices = [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
    else:
        devices = [0]
    board = StatusBoard(workers=len(devices) * settings.workers, api_servers=settings.api_servers)
    metrics.count_storage_failures(board)
    # One cancel channel per worker: LitServe has no way to tell a worker that a client left.
    controls = [mp.get_context("spawn").Queue() for _ in range(board.num_workers)]
    spec = bridge.RouteSpec()
    Routes(settings, board, controls, spec)
    api = GenerationAPI(settings, board, controls, spec)
    server = bridge.Server(
        api,
        accelerator=device.type,
        devices=devices if device.type == "cuda" else 1,
        workers_per_device=settings.workers,
        timeout=settings.queue_timeout,
        # /health is the service's readiness (a model is served); LitServe's own (workers are up) is liveness.
        healthcheck_path="/live",
        middlewares=[(AccessLog, {}), (bridge.RegisterApiServer, {"board": board})],
        # A worker that dies is replaced; requests it held fail with 503 (see bridge.WorkerCall).
        restart_workers=True,
        request_timeout=settings.request_timeout,
        accept_grace=settings.accept_grace,
        drain_timeout=settings.drain_timeout,
        on_http_death=api.http_server_died,
    )
    errors.install_handlers(server.app)
    # A redirect to the slash-less path would be built from the client's Host header.
    server.app.router.redirect_slashes = False
    document_request_bodies(server.app)
    return server


def serve(server: bridge.Server, settings: ServiceSettings) -> int:
    """Run until SIGTERM or Ctrl-C has drained the service; return its exit status (0: a clean drain)."""
    main_pid = os.getpid()
    # HTTP servers and LitServe's manager are forked from here: they must not outlive this process, nor
    # inherit the SIGTERM handler meant for it.
    os.register_at_fork(after_in_child=lambda: signals.forked_child(main_pid))
    signals.interrupt_on_sigint_and_sigterm()
    # A connection is a file descriptor: take as many as the system allows, not the shell's default.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=settings.api_servers,
        log_level=settings.log_level,
        generate_client_file=False,
        access_log=False,  # service.access logs every request, with its id and token counts
    )
    return server.exit_status
