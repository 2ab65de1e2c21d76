"""Shared by every test folder: this file puts tests/ on sys.path, so `servicekit` (the real service as a
subprocess, tiny checkpoints, scrapes), `trainerkit` (the real trainer) and `faultkit` (a full disk) are
importable from every test folder; its fixtures start services, share a token cache across folders and
load deploy/up.py. Every process a test starts goes through `processes`, and the session fails if one
outlives the tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import processes
import pytest
import torch
from processes import pytest_sessionfinish  # noqa: F401 (the hook that fails a session leaving processes behind)
from servicekit import Service, start_service

# pytest-xdist's processes share the cores: one thread each (and for the trainers they start), or every
# OpenMP region of one spins while it waits for a core that the other holds.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def launching(tmp_path_factory):
    """A `launch(checkpoint_dir, *flags)` that starts services, all stopped together when it is done:
    SIGTERM to each at once (a service drains in about a second), SIGKILL to any still running a minute on."""
    started: list[Service] = []

    def launch(checkpoint_dir: Path, *args: str, env: dict | None = None, api_key: str | None = None,
               preexec_fn=None) -> Service:  # fmt: skip
        directory = tmp_path_factory.mktemp("service")
        service = start_service(directory, checkpoint_dir, *args, env=env, api_key=api_key, preexec_fn=preexec_fn)
        started.append(service)
        return service

    yield launch
    processes.stop(*(service.process for service in started))


@pytest.fixture
def launch(tmp_path_factory):
    """Start services that the test alone uses: stopped when it ends, so none idles beside later tests."""
    yield from launching(tmp_path_factory)


@pytest.fixture(scope="module")
def launch_for_module(tmp_path_factory):
    """Start a service that the tests of one file share: stopped after the last of them."""
    yield from launching(tmp_path_factory)


@pytest.fixture(scope="session")
def launch_for_session(tmp_path_factory):
    """Start a service that tests in several files share (`served`, `reliable`)."""
    yield from launching(tmp_path_factory)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the session, so builtin:pydoc is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def up_module():
    """deploy/up.py, the `make up` supervisor (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_up", Path(__file__).resolve().parents[1] / "deploy" / "up.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy_up"] = module
    spec.loader.exec_module(module)
    return module
