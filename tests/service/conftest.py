"""Service fixtures: the real `service serve` as a subprocess on a free port, over tiny checkpoints.

Starting a service costs a few seconds (a spawned worker imports torch), so tests share one
session-wide service (`served`) wherever they do not disturb each other; files that change what is
served (reloads, shutdown) start their own with `launch` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
from servicekit import API_KEY, Service, publish


@pytest.fixture(scope="session")
def served(launch_for_session, tmp_path_factory) -> Service:
    """The shared service: step 100 of a tiny model (its weights packed, the CPU default), an API key,
    small limits that tests can reach, and an event per streamed token."""
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=100, val_loss=3.25)
    limits = [
        "--max-batch-size", "8", "--max-queued-requests", "8", "--max-new-tokens", "1000",
        "--max-prompt-tokens", "300", "--max-body-bytes", "65536",
    ]  # fmt: skip
    return launch_for_session(checkpoint_dir, *limits, "--stream-interval", "0", api_key=API_KEY)
