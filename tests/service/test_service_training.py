"""`GET /v1/training`: the training run's loss curve, read from the trainer's metrics.jsonl.

Against the shared service (its checkpoint folder gets a metrics.jsonl of the tests' making, removed
after), and the reader itself over long files, where each step must cost a bounded amount of work.
(Hostile files, a FIFO, a 200,000-deep line, a log that grows under load: tests/reliability/test_reliability_training_log.py.)
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

from model.checkpoint import atomic_write
from service.page import MAX_LINE, MAX_POINTS, METRICS_FILE, TrainingLog
from trainer.report import METRICS_FILE as TRAINER_METRICS_FILE


def record(step: int, loss: float, val_loss: float | None = None) -> str:
    fields = {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 1000.0, "elapsed": step,
              "tokens": step * 512}  # fmt: skip
    if val_loss is not None:
        fields["val_loss"] = val_loss
    return json.dumps(fields) + "\n"


@pytest.fixture
def metrics_file(served):
    path = served.checkpoint_dir / METRICS_FILE
    yield path
    path.unlink(missing_ok=True)


def training(service) -> dict:
    response = httpx.get(service.url + "/v1/training", headers=service.headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_service_reads_the_file_the_trainer_writes():
    assert METRICS_FILE == TRAINER_METRICS_FILE


def test_no_file_is_an_empty_curve_not_an_error(served, metrics_file):
    assert training(served) == {"object": "training", "records": 0, "skipped": 0, "train": [], "val": [],
                                "latest": None, "complete": True}  # fmt: skip


def test_the_route_follows_the_key_rule(served):
    response = httpx.get(served.url + "/v1/training")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_curves_follow_the_file_as_the_trainer_appends_rewrites_and_truncates_it(served, metrics_file):
    metrics_file.write_text(record(10, 5.0) + record(20, 4.0, val_loss=4.5) + '{"step": 30, "loss": 3.')
    body = training(served)
    # The last record is still being written: not counted until its line is complete.
    assert body["records"] == 2 and body["complete"] is False
    assert body["train"] == [[10, 5.0], [20, 4.0]] and body["val"] == [[20, 4.5]]
    assert body["latest"] == {"step": 20, "loss": 4.0, "val_loss": 4.5, "lr": 1e-3, "tokens_per_sec": 1000.0,
                              "elapsed": 20, "tokens": 10240}  # fmt: skip

    with metrics_file.open("a") as file:
        file.write('5}\nnot json\n{"step": "40"}\n{"step": 50, "loss": NaN, "val_loss": Infinity}\n' + record(60, 2.0))
    body = training(served)
    # Lines that are no records are passed over and counted, and so are records with values that JSON cannot carry.
    assert body["records"] == 4 and body["skipped"] == 3 and body["complete"] is True
    assert body["train"] == [[10, 5.0], [20, 4.0], [30, 3.5], [60, 2.0]] and body["val"] == [[20, 4.5]]

    # A resumed run rewrites the file (a new one, atomically) without the records past its checkpoint.
    atomic_write(metrics_file, (record(10, 5.0) + record(20, 4.0, val_loss=4.5) + record(22, 3.9)).encode())
    assert training(served)["train"] == [[10, 5.0], [20, 4.0], [22, 3.9]]
    # Shortened in place, it is read again from the start.
    with metrics_file.open("r+") as file:
        file.truncate(len(record(10, 5.0)))
    assert training(served)["train"] == [[10, 5.0]]


def test_a_long_run_is_read_in_bounded_steps_and_answered_in_bounded_curves(tmp_path):
    path = tmp_path / METRICS_FILE
    steps = 30_000
    with path.open("w") as file:
        for step in range(1, steps + 1):
            file.write(record(step, 10 - step / steps, val_loss=10 - step / steps if step % 100 == 0 else None))
    lines = 1000
    log = TrainingLog(path, lines=lines)
    answers = []
    while not answers or not answers[-1]["complete"]:
        records = log.records
        log.step()
        # Each step parsed at most its share of lines, from where the last one stopped.
        assert 0 < log.records - records <= lines
        answers.append(json.loads(log.body))
    assert len(answers) == steps // lines and answers[-1] == log.view()
    last = answers[-1]
    assert last["records"] == steps and last["skipped"] == 0 and last["latest"]["step"] == steps
    for answer in answers:
        assert len(answer["train"]) <= MAX_POINTS + 1 and len(answer["val"]) <= MAX_POINTS + 1
    train = [step for step, _ in last["train"]]
    # Evenly thinned from the first step, and ending at the newest.
    assert train[0] == 1 and train[-1] == steps and len(train) > MAX_POINTS / 2
    gaps = {b - a for a, b in itertools.pairwise(train[:-1])}
    assert len(gaps) == 1
    assert [step for step, _ in last["val"]] == list(range(100, steps + 1, 100))


def test_a_line_too_long_to_be_a_record_is_passed_over_and_counted(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(record(1, 5.0) + "x" * (3 * MAX_LINE) + "\n" + record(2, 4.0) + "y" * (MAX_LINE + 1))
    log = TrainingLog(path, chunk=MAX_LINE // 2)
    while not log.step():
        pass
    # The last line has no end yet, but is already too long to be a record.
    assert log.view()["train"] == [[1, 5.0], [2, 4.0]] and log.skipped == 2
    with path.open("a") as file:
        file.write("y\n" + record(3, 3.0))
    while not log.step():
        pass
    assert log.view()["train"] == [[1, 5.0], [2, 4.0], [3, 3.0]] and log.skipped == 2


def test_a_log_written_anew_in_place_is_read_again_from_its_start(tmp_path):
    """The same inode (a file deleted and written again may get the old one's number) and a line end where
    the last step stopped: only the bytes before that place tell the new file from the old."""
    path = tmp_path / METRICS_FILE
    path.write_text(record(1, 5.0) + record(2, 4.0))
    log = TrainingLog(path)
    while not log.step():
        pass
    assert log.view()["train"] == [[1, 5.0], [2, 4.0]]
    with path.open("r+") as file:  # lines of the same lengths, other values, and one more
        file.write(record(1, 6.0) + record(2, 3.0) + record(3, 2.0))
    while not log.step():
        pass
    assert log.view()["train"] == [[1, 6.0], [2, 3.0], [3, 2.0]] and log.records == 3 and log.skipped == 0
