"""Hot reload is never blocked and never serves garbage.

Whatever stands at the served checkpoint's name (a FIFO, a folder, a device, a socket), however long a
load takes, and whatever numbers the weights hold, the service keeps serving its previous model (or keeps
waiting for a first one), logs why and counts the failed load; and it still stops at the first SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat

import pytest
import torch
from servicekit import publish, tiny_model, wait_for

from model import save_checkpoint


def make_fifo(path):
    os.mkfifo(path)


def make_folder(path):
    path.mkdir()


def make_device(path):
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # like /dev/zero: reads never end


def make_socket(path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    return listener


@pytest.mark.parametrize("make", [make_fifo, make_folder, make_device, make_socket], ids=lambda f: f.__name__[5:])
def test_only_regular_files_are_opened(launch, tmp_path, make, figures):
    checkpoint = tmp_path / "best_model.pt"
    keep = make(checkpoint)
    # Not even the first start blocks: the service comes up, waiting for a real checkpoint.
    service = launch(tmp_path)
    wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == 1, 30,
             message="the refused file to be counted")  # fmt: skip
    health = service.health()
    assert health.status_code == 503 and health.json()["status"] == "waiting"
    assert "not a regular file" in service.log()
    # A real checkpoint published over it is served: the watcher is not stuck.
    staged = publish(tmp_path / "staging", step=4)
    if checkpoint.is_dir():
        shutil.rmtree(checkpoint)
    os.replace(staged, checkpoint)
    service.wait_serving(step=4)
    # The special file again, as a later "version": refused, and the previous model keeps serving.
    checkpoint.unlink()
    keep = make(checkpoint) or keep
    wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == 2, 30,
             message="the second refusal to be counted")  # fmt: skip
    assert service.predict(prompt="Still here", max_new_tokens=2)["model"]["step"] == 4
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 0
    figures[make.__name__[5:]] = "refused, previous model served, clean stop"


def test_a_load_that_takes_too_long_is_given_up(launch, tmp_path, figures):
    publish(tmp_path, step=3)
    # Loading even a tiny checkpoint takes longer than a microsecond: the bound is what is tested here.
    service = launch(tmp_path, "--load-timeout", "0.000001")
    wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="timeout") >= 1, 30,
             message="the overlong load to be counted as a timeout")  # fmt: skip
    assert "took longer than 1e-06 s; gave up" in service.log()
    assert service.health().status_code == 503
    figures.update(timeouts=int(service.metrics().get("gpt_model_reloads_total", result="timeout")))


def poisoned(kind: str):
    model = tiny_model(seed=5)
    with torch.no_grad():
        if kind == "nan weight":
            model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        elif kind == "inf weight":
            model.transformer.wpe.weight[3, 1] = float("inf")
        else:  # finite weights whose logits overflow
            model.transformer.ln_f.weight.fill_(3e38)
    return model


@pytest.mark.parametrize("kind", ["nan weight", "inf weight", "overflowing logits"])
def test_non_finite_models_are_refused(launch, tmp_path, kind, figures):
    publish(tmp_path, step=10)
    service = launch(tmp_path)
    service.wait_serving(step=10)
    staged = save_checkpoint(tmp_path / "staging" / "best_model.pt", poisoned(kind), step=11, val_loss=1.0)
    os.replace(staged, tmp_path / "best_model.pt")
    wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == 1, 30,
             message="the poisoned checkpoint to be refused")  # fmt: skip
    assert service.predict(prompt="Sane", max_new_tokens=3)["model"]["step"] == 10
    assert service.health().status_code == 200
    expected = "are not finite" if kind == "overflowing logits" else "holds NaN or Inf values"
    assert expected in service.log()
    figures[kind] = "refused"
