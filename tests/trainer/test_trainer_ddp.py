"""Two CPU processes under torchrun (gloo) train the same model as one process with the same global batch,
bit for bit: each rank's gradient of its micro-batch is the single process's gradient of the same
micro-batch (the same kernels on one thread each), halving is exact, and the all-reduce of two ranks is one
addition, which the single process makes too when it accumulates."""

import os
import sys

import processes
import torch

from model import read_checkpoint


def test_two_processes_match_one_with_the_same_global_batch(tiny, fit, records, tmp_path):
    common = ("--steps", "6", "--eval-interval", "3", "--lr", "3e-3", "--warmup-steps", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): a kernel's blocking follows its threads
    try:
        fit(tmp_path / "single", "--grad-accum", "2", *common)
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = processes.run(
        [*torchrun, "-m", "trainer", "fit", *tiny(tmp_path / "ddp", "--grad-accum", "1", *common)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "× 2 processes" in result.stdout

    single, ddp = records(tmp_path / "single"), records(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7)), "rank 0 alone logs"
    for a, b in zip(single, ddp):
        assert (a["loss"], a.get("val_loss")) == (b["loss"], b.get("val_loss"))
    assert ddp[-1]["tokens"] == single[-1]["tokens"] == 6 * 2 * 4 * 32
    a = read_checkpoint(tmp_path / "single" / "final_model.pt")["model"]
    b = read_checkpoint(tmp_path / "ddp" / "final_model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
