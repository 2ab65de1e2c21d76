"""The trainer across nodes as torchrun runs it there: one elastic agent per node, each its own process tree,
meeting through a c10d rendezvous at node 0 (`--nnodes 2 --rdzv-backend c10d`), here both on this machine.
The Kubernetes Job starts the same command in two pods. What is not proved: a node's worker SIGKILLed
and the job resumed by torchrun's elastic restart (a test of it passed in two runs and hung in the third,
both agents waiting past 600 s after the restart), and a whole node (agent and worker) SIGKILLed and replaced. Tried here, node 0's agent and the replacement both joined the next rendezvous round
and then each waited for the other's keys until torch's 60 s store timeout (torch 2.13, c10d backend)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import processes
import pytest
import torch
from servicekit import free_port, wait_for

from model import read_checkpoint

STEPS = ("--steps", "20", "--eval-interval", "10", "--checkpoint-interval", "5", "--lr", "3e-3", "--warmup-steps", "2")


def launch(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "-m", "trainer", "fit"]


def node(port: int, flags: list[str], log: Path) -> subprocess.Popen:
    """One node: torchrun's agent and its one worker."""
    argv = launch("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode")  # fmt: skip
    with open(log, "w") as out:
        return processes.spawn([*argv, *flags], stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def two_nodes(logs: Path, flags: list[str]) -> tuple[int, subprocess.Popen, subprocess.Popen]:
    """The rendezvous port and the two nodes, node 0 first: it hosts the rendezvous store, as the pod or
    container at the endpoint does."""
    port = free_port()
    first = node(port, flags, logs / "node0.log")
    wait_for(lambda: listening(port) or first.poll() is not None, 120, interval=0.1, message="node 0's rendezvous")
    return port, first, node(port, flags, logs / "node1.log")


def finish(*nodes: subprocess.Popen, logs: list[Path]) -> str:
    """Wait for the nodes to exit 0; their output."""
    for process in nodes:
        process.wait(timeout=600)
    text = "".join(log.read_text() for log in logs)
    assert all(p.returncode == 0 for p in nodes), [p.returncode for p in nodes] + [text[-4000:]]
    return text


def weights(out) -> dict:
    return read_checkpoint(out / "final_model.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# Two torchrun jobs of four processes each: beside other work, longer than the suite's default 300 s.
@pytest.mark.timeout(900)
def test_two_nodes_train_as_one_node_of_two_processes(tiny, records, tmp_path):
    one = tmp_path / "one-node"
    result = processes.run(
        [*launch("--standalone", "--nproc-per-node", "2"), *tiny(one, *STEPS)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    two = tmp_path / "two-nodes"
    _, *nodes = two_nodes(tmp_path, tiny(two, *STEPS))
    finish(*nodes, logs=[tmp_path / "node0.log", tmp_path / "node1.log"])
    curve = [(r["step"], r["loss"], r.get("val_loss")) for r in records(two)]
    reference = [(r["step"], r["loss"], r.get("val_loss")) for r in records(one)]
    assert [step for step, *_ in curve] == list(range(1, 21)), "rank 0 alone logs, once a step"
    for (_, loss, val), (_, ref_loss, ref_val) in zip(curve, reference, strict=True):
        assert abs(loss - ref_loss) < 1e-5 and abs((val or 0) - (ref_val or 0)) < 1e-5
    assert same_weights(weights(two), weights(one))
