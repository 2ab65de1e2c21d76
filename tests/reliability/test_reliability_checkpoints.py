"""Checkpoints crafted to run code, dropped into the folder the service watches.

Truncated files, random bytes, foreign dictionaries, other tokenizers, mismatched weights and other
shapes are refused by tests/service/test_service_reload.py (and model's own checkpoint tests refuse a
crafted pickle in-process). Here an attacker's files reach the live service: it keeps serving the
previous model, counts the failed reload, and the payload never runs; loading the same file the unsafe
way shows that the payload was live.
"""

from __future__ import annotations

import builtins
import itertools
import os
import pickle
import shutil
import sys

import processes
import pytest
import torch
from servicekit import publish, wait_for

STEPS = itertools.count(1000)


class RunsCode:
    """Unpickling this calls `function(argument)`, which leaves `marker` behind."""

    def __init__(self, function, argument):
        self.function = function
        self.argument = argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def shell(marker) -> RunsCode:
    return RunsCode(os.system, f"touch '{marker}'")


def python(marker) -> RunsCode:
    return RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")


def real_checkpoint(tmp_path) -> dict:
    return torch.load(publish(tmp_path, step=1, name="real.pt"), weights_only=True)


def payload_in_the_metadata(path, marker, tmp_path):
    """A real, loadable checkpoint with one extra metadata entry: the most plausible disguise."""
    torch.save({**real_checkpoint(tmp_path), "notes": shell(marker)}, path)


def payload_instead_of_a_tensor(path, marker, tmp_path):
    data = real_checkpoint(tmp_path)
    data["model"]["lm_head.weight"] = python(marker)
    torch.save(data, path)


def legacy_pickle(path, marker, tmp_path):
    """Not torch's zip format at all: a bare pickle, which torch.load also reads."""
    path.write_bytes(pickle.dumps({"format": "gpt-service/checkpoint-v1", "model": shell(marker)}, protocol=2))


UNSAFE_LOAD = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"


@pytest.mark.parametrize("craft", [payload_in_the_metadata, payload_instead_of_a_tensor, legacy_pickle])
def test_a_checkpoint_crafted_to_run_code_is_refused_and_never_runs(reliable, craft, tmp_path):
    step = next(STEPS)
    served = publish(reliable.checkpoint_dir, step=step)
    reliable.wait_serving(step)
    failures = reliable.metrics().get("gpt_model_reloads_total", result="failure")
    log_start = len(reliable.log())

    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt"
    craft(crafted, marker, tmp_path)
    staged = tmp_path / served.name
    shutil.copy(crafted, staged)
    os.replace(staged, served)  # published atomically, like the trainer
    wait_for(
        lambda: reliable.metrics().get("gpt_model_reloads_total", result="failure") == failures + 1,
        10,
        message="the refused reload to be counted",
    )

    assert reliable.predict(prompt="Still me?", max_new_tokens=3)["model"]["step"] == step
    assert reliable.health().status_code == 200
    assert "refused checkpoint" in reliable.log()[log_start:]
    assert not marker.exists(), "the crafted checkpoint ran its payload"

    # The payload was live: loading the file without weights_only runs it (a bare pickle runs it while
    # torch reads what it takes for a header, before refusing the file).
    processes.run([sys.executable, "-c", UNSAFE_LOAD, str(crafted)], capture_output=True)
    assert marker.exists()
