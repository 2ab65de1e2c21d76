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


SPECIAL_FILES = {"FIFO": make_fifo, "folder": make_folder, "device": make_device, "socket": make_socket}


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_only_regular_files_are_opened(launch, tmp_path, figures):
    checkpoint = tmp_path / "best_model.pt"
    kept = [make_fifo(checkpoint)]
    # Not even the first start blocks on a FIFO (whose open waits for a writer): the service comes up,
    # waiting for a real checkpoint.
    service = launch(tmp_path)
    wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == 1, 30,
             message="the FIFO to be refused and counted")  # fmt: skip
    health = service.health()
    assert health.status_code == 503 and health.json()["status"] == "waiting"
    assert "not a regular file but a FIFO" in service.log()
    # A real checkpoint published over it is served: the watcher is not stuck.
    staged = publish(tmp_path / "staging", step=4)
    remove(checkpoint)
    os.replace(staged, checkpoint)
    service.wait_serving(step=4)
    # Each special file in turn, as a later "version": refused, and the previous model keeps serving.
    for failures, (kind, make) in enumerate(SPECIAL_FILES.items(), start=2):
        remove(checkpoint)
        kept.append(make(checkpoint))
        wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == failures, 30,
                 message=f"the {kind} to be refused and counted")  # fmt: skip
        assert f"not a regular file but a {kind}" in service.log()
        assert service.predict(prompt="Still here", max_new_tokens=2)["model"]["step"] == 4
        figures[kind] = "refused, previous model served"
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 0
    figures["stop"] = "clean, at the first SIGTERM"


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


def test_non_finite_models_are_refused(launch, tmp_path, figures):
    publish(tmp_path, step=10)
    service = launch(tmp_path)
    service.wait_serving(step=10)
    expected = {"nan weight": "holds NaN or Inf values", "inf weight": "holds NaN or Inf values",
                "overflowing logits": "are not finite"}  # fmt: skip
    for failures, (kind, message) in enumerate(expected.items(), start=1):
        seen = len(service.log())
        staged = save_checkpoint(tmp_path / "staging" / "best_model.pt", poisoned(kind), step=10 + failures,
                                 val_loss=1.0)  # fmt: skip
        os.replace(staged, tmp_path / "best_model.pt")
        wait_for(lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == failures, 30,
                 message=f"the checkpoint with a {kind} to be refused")  # fmt: skip
        wait_for(lambda: message in service.log()[seen:], 10, message=f"the refusal of the {kind} in the log")
        assert service.predict(prompt="Sane", max_new_tokens=3)["model"]["step"] == 10
        assert service.health().status_code == 200
        figures[kind] = "refused"
