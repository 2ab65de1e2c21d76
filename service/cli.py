"""`service serve`: the inference service's command line (also `python -m service`)."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from model.cli_options import build_settings, settings_options
from model.files import FolderInUse, lock_folder
from service.logs import configure_logging
from service.settings import ServiceSettings


@click.group()
def main() -> None:
    """GPT-2-class text generation over HTTP: /predict, OpenAI's /v1/completions, /health, /metrics."""


@main.command()
@settings_options(ServiceSettings)
def serve(**flags) -> None:
    """Serve the newest checkpoint of a folder, reloading it whenever the trainer publishes a new one."""
    settings = build_settings(ServiceSettings, flags)
    try:
        metrics_dir = prepare_metrics_dir(settings.metrics_dir)
    except (FolderInUse, OSError) as e:
        raise click.ClickException(str(e)) from None
    # Read by OpenMP when a spawned inference worker first imports torch.
    if settings.omp_wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        # Imported only now: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when first imported.
        from service.server import build, serve

        try:
            server = build(settings)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        configure_logging(settings.log_level)
        # Everything imported so far (torch's whole object graph) lives as long as the process: kept out of
        # the collector's sight, it no longer costs the last collection at exit a second or more, so that
        # a stop (`docker compose stop`, Ctrl-C) takes as long as its drain.
        gc.freeze()
        status = serve(server, settings)
    finally:
        if settings.metrics_dir is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(status)


# In --metrics-dir, held by the running service (model.files.lock_folder); not a metrics file (*.db).
METRICS_LOCK = ".service.lock"


def prepare_metrics_dir(path: Path | None) -> Path:
    """Point prometheus_client's multiprocess mode at an empty folder, for this process and its children.

    The folder is this service's alone while it runs: a second service would delete the first's live files
    and mix its figures into them, so it is refused (FolderInUse, naming the holder's PID). The lock is held
    for the life of this process, by it alone: the processes it forks (HTTP servers, LitServe's Manager)
    close their copy of the descriptor, so that the folder is free the moment this process ends.
    """
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="gpt-service-metrics-"))
    held = [
        lock_folder(
            path,
            METRICS_LOCK,
            "--metrics-dir {folder} is in use by another service (PID {holder}): stop it, or give this one "
            "another --metrics-dir",
        )
    ]
    # Once: a child's own children must not close whatever has taken the descriptor's number since.
    os.register_at_fork(after_in_child=lambda: held and os.close(held.pop()))
    # Files of a previous run's processes would be merged into this run's figures.
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path
