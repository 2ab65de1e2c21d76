"""The trainer across nodes as torchrun runs it there: one elastic agent per node, each its own process tree,
meeting through a c10d rendezvous at node 0 (`--nnodes 2 --rdzv-backend c10d`), here both on this machine.
The Kubernetes Job starts the same command in two pods, the compose profile in two containers.

A node's worker killed ends on the uninterrupted run's weights: torchrun restarts every node's workers
(`--max-restarts`) and they resume from last.pt. That needs a rendezvous store per round
(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the image sets it): with the store shared, it hung in one run of
three. A whole node killed and started again is make test-compose's (tests/compose), a container SIGKILLed."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import processes
import psutil
import pytest
import torch
from servicekit import free_port, wait_for
from trainerkit import resumed_step, tiny_flags

from model import read_checkpoint
from trainer.distributed import SHARED_STORE_WARNING

STEPS = ("--steps", "20", "--eval-interval", "10", "--checkpoint-interval", "5", "--lr", "3e-3", "--warmup-steps", "2")
STORE_PER_ROUND = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launch(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "-m", "trainer", "fit"]


def node(port: int, flags: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """One node: torchrun's agent and its one worker."""
    argv = launch("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode", "--max-restarts", "3")  # fmt: skip
    with open(log, "w") as out:
        return processes.spawn([*argv, *flags], stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **env})  # fmt: skip


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class TwoNodes:
    """Node 0 starts first: it hosts the rendezvous store, as the pod or container at the endpoint does."""

    def __init__(self, logs: Path, flags: list[str], env: dict[str, str]):
        self.logs = [logs / "node0.log", logs / "node1.log"]
        port = free_port()
        self.nodes = [node(port, flags, self.logs[0], env)]
        wait_for(lambda: listening(port) or self.nodes[0].poll() is not None, 120, interval=0.1,
                 message="node 0's rendezvous")  # fmt: skip
        self.nodes.append(node(port, flags, self.logs[1], env))

    def finish(self) -> str:
        """Wait for the nodes to exit 0; their output."""
        for process in self.nodes:
            process.wait(timeout=600)
        text = "".join(log.read_text() for log in self.logs)
        assert all(p.returncode == 0 for p in self.nodes), [p.returncode for p in self.nodes] + [text[-4000:]]
        return text


def weights(out) -> dict:
    return read_checkpoint(out / "final_model.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    """Bit for bit: both runs do the same arithmetic, their all-reduce of two ranks one addition, which
    gives the same bits in either order."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted reference: one node of two processes, the same global batch."""
    out = tmp_path_factory.mktemp("one-node")
    result = processes.run(
        [*launch("--standalone", "--nproc-per-node", "2"), *tiny_flags(cache_dir, out, *STEPS)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def paused_mid_run(nodes: TwoNodes, out: Path) -> psutil.Process:
    """Node 1's worker, stopped once last.pt exists (atomically published, so whole) and checked to be
    mid-run: node 0 then waits in its next collective, so the kill that follows lands mid-run however busy
    the machine is."""
    wait_for(lambda: (out / "last.pt").exists() or nodes.nodes[0].poll() is not None, 600, interval=0.05,
             message="last.pt")  # fmt: skip
    [worker] = psutil.Process(nodes.nodes[1].pid).children()
    worker.send_signal(signal.SIGSTOP)
    assert not (out / "final_model.pt").exists(), "the run ended before the kill"
    return worker


# Beside other work, these torchrun jobs run longer than the suite's default 300 s.
@pytest.mark.timeout(900)
def test_two_nodes_train_as_one_node_of_two_processes(one_node, tiny, records, tmp_path):
    two = tmp_path / "two-nodes"
    # The store shared, as torchrun's default: nothing restarts here, and rank 0 warns that a restart would hang.
    output = TwoNodes(tmp_path, tiny(two, *STEPS), env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}).finish()
    assert SHARED_STORE_WARNING in output
    curve = [(r["step"], r["loss"], r.get("val_loss")) for r in records(two)]
    reference = [(r["step"], r["loss"], r.get("val_loss")) for r in records(one_node)]
    assert [step for step, *_ in curve] == list(range(1, 21)), "rank 0 alone logs, once a step"
    assert curve == reference
    assert same_weights(weights(two), weights(one_node))


@pytest.mark.timeout(900)
def test_a_worker_killed_on_one_node_restarts_both_and_the_job_resumes_from_last_pt(one_node, tiny, tmp_path):
    out = tmp_path / "killed"
    nodes = TwoNodes(tmp_path, tiny(out, *STEPS, "--resume"), env=STORE_PER_ROUND)
    worker = paused_mid_run(nodes, out)
    worker.send_signal(signal.SIGKILL)
    output = nodes.finish()
    assert 5 <= resumed_step(output) < 20 and SHARED_STORE_WARNING not in output
    assert same_weights(weights(out), weights(one_node))
