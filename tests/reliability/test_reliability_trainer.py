"""The trainer killed with SIGKILL at random moments, a disk that fills while it saves, a model gone
non-finite and a second trainer on the same folder: nothing lost, nothing garbage published.

Checkpoints are written atomically (model.save_checkpoint; its own tests kill a bare writer). Here the
whole trainer runs as a real process with a checkpoint every step, is killed while it starts, between
steps and inside checkpoint writes, and each time the next `--resume` must pick up exactly where
last.pt left off.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import torch
from faultkit import limit_file_size
from reliabilitykit import SCALE, SOAK
from servicekit import wait_for
from trainerkit import invoke_fit, spawn, tiny_flags

from model import load_checkpoint
from trainer.checkpoints import BEST, FINAL, LAST, read_resume

KILL_MOMENTS = ("inside a checkpoint write", "right after a step", "at a random time")
STARTUP = 90.0  # seconds a trainer may take to import torch and reach its first step on a busy machine


class Trainer:
    """`trainer fit` as a process whose output lines are collected as they come."""

    def __init__(self, args: list[str], **popen):
        self.process = spawn(args, **popen)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def steps(self) -> list[int]:
        return [int(line.split()[1]) for line in list(self.lines) if line.startswith("step ")]

    def output(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 300.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def checkpoint_step(out: Path, name: str) -> int | None:
    """The step of checkpoint `name`, or None if it does not exist; fails unless it loads cleanly."""
    path = out / name
    if not path.exists():
        return None
    _, meta = read_resume(path, "cpu") if name == LAST else load_checkpoint(path)
    return meta["step"]


def strays(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*.tmp"))


def test_sigkill_at_random_moments_never_loses_a_checkpoint_and_resume_continues(cache_dir, tmp_path, figures):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "run"
    fit = ["fit", *tiny_flags(cache_dir, out, "--checkpoint-interval", "1", "--eval-interval", "3", "--resume")]
    kills = []
    for round_ in range(SCALE.trainer_kills):
        moment = KILL_MOMENTS[round_ % len(KILL_MOMENTS)]
        resume_from = checkpoint_step(out, LAST)
        earlier = set(strays(out))
        trainer = Trainer([*fit, "--steps", "100000"])
        if moment == "inside a checkpoint write":
            # A temporary file that was not there before is a checkpoint being written right now.
            wait_for(lambda: set(strays(out)) - earlier, STARTUP, interval=0.001, message="a checkpoint write")
        elif moment == "right after a step":
            wanted = rng.randint(1, 3)  # drawn once: a draw per poll would nearly always stop at the first step
            wait_for(lambda: len(trainer.steps()) >= wanted, STARTUP, interval=0.01, message=f"step {wanted}")
        else:
            # The moment itself is what is random here, not a wait for something: anywhere in start-up
            # (about 5 s on two quiet cores: torch, the data, the optimizer) or the seconds of steps after it.
            time.sleep(rng.uniform(0.0, 12.0))
        trainer.process.send_signal(signal.SIGKILL)
        assert trainer.finish() == -signal.SIGKILL, trainer.output()

        steps = trainer.steps()
        if steps:
            # --resume continued from last.pt exactly: the first step it ran is the one after it.
            assert steps[0] == (resume_from or 0) + 1, (resume_from, steps, trainer.output())
            start = f"resuming at step {resume_from}" if resume_from else "from scratch"
            assert start in trainer.output(), trainer.output()
        last, best = checkpoint_step(out, LAST), checkpoint_step(out, BEST)
        # Only the write the kill interrupted may have left a temporary file: the run removed earlier ones.
        assert len(strays(out)) <= 1, strays(out)
        kills.append({"moment": moment, "steps_run": len(steps), "last": last, "best": best})

    final = (checkpoint_step(out, LAST) or 0) + 2
    trainer = Trainer([*fit, "--steps", str(final)])
    assert trainer.finish() == 0, trainer.output()
    assert checkpoint_step(out, FINAL) == checkpoint_step(out, LAST) == final
    assert strays(out) == []
    # Every step is logged exactly once, whatever the kills interrupted.
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, final + 1))
    figures.update(
        seed=seed,
        kills_survived=len(kills),
        kills_by_moment={m: sum(k["moment"] == m for k in kills) for m in KILL_MOMENTS},
        kills_inside_writes=sum(k["moment"] == KILL_MOMENTS[0] for k in kills),
        final_step=final,
        kills=kills,
    )


def test_a_full_disk_while_saving_reports_the_error_and_keeps_the_previous_checkpoints(cache_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--steps", "4", "--eval-interval", "1000", "--checkpoint-interval", "1"]
    invoke_fit(cache_dir, out, *flags, "--steps", "2")
    saved = {name: (out / name).read_bytes() for name in (BEST, LAST, FINAL)}
    jsonl = out / "metrics.jsonl"
    # Evaluated only at the end: resumed, step 3 appends its record to metrics.jsonl, then writes last.pt.
    fit = ["fit", *tiny_flags(cache_dir, out, *flags, "--resume")]

    # The disk fills while last.pt is written, then in the middle of a record appended to metrics.jsonl.
    for limit, name in [(len(saved[BEST]) // 2, LAST), (jsonl.stat().st_size + 40, None)]:
        trainer = Trainer(fit, preexec_fn=limit_file_size(limit))
        assert trainer.finish() == 1, trainer.output()
        assert "Error:" in trainer.output() and "File too large" in trainer.output(), trainer.output()
        assert name is None or name in trainer.output(), trainer.output()
        assert {name: (out / name).read_bytes() for name in saved} == saved
        assert strays(out) == []

    trainer = Trainer(fit)
    assert trainer.finish() == 0, trainer.output()
    assert "resuming at step 2" in trainer.output()
    assert trainer.steps() == [3, 4]
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [1, 2, 3, 4]
    assert checkpoint_step(out, FINAL) == 4


def spoiled_hf_folder(folder: Path, value: float) -> Path:
    """A save_pretrained folder whose position embedding holds `value` in a row a 32-token run never
    reads: the loss stays finite while the weights are not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=48))
    with torch.no_grad():
        model.transformer.wpe.weight[40] = value
    model.save_pretrained(folder)
    return folder


def test_a_model_gone_non_finite_is_never_published(cache_dir, tmp_path, figures):
    # The first evaluation after one step at an absurd learning rate: a NaN validation loss.
    blow_up = ("--lr", "1e38", "--min-lr", "1e38", "--warmup-steps", "0", "--eval-interval", "1")
    values = (math.nan, math.inf, -math.inf) if SOAK else (math.nan,)
    cases = [("validation loss", tmp_path / "blown", blow_up, "the validation loss became nan at step 1")]
    cases += [
        (f"weights holding {value}", tmp_path / f"spoiled-{value}",
         ("--init", str(spoiled_hf_folder(tmp_path / f"hf-{value}", value)), "--eval-interval", "2"),
         "weight transformer.wpe.weight holds NaN or Inf values")
        for value in values
    ]  # fmt: skip
    if SOAK:
        # A run that has published a good model and then blows up: the good one stays, byte for byte.
        invoke_fit(cache_dir, tmp_path / "good", "--steps", "2", "--eval-interval", "1")
        cases.append(("validation loss after a good best_model.pt", tmp_path / "good", ("--resume", *blow_up),
                      "the validation loss became nan at step 3"))
    for what, out, flags, message in cases:
        kept = {p.name: p.read_bytes() for p in out.glob("*.pt")}
        result = invoke_fit(cache_dir, out, "--steps", "4", *flags, expect=1)
        assert message in result.output and "training diverged" in result.output, (what, result.output)
        assert "Traceback" not in result.output
        assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == kept, what
    figures.update(runs_refused=len(cases), cases=[case[0] for case in cases])


def test_one_trainer_per_folder_and_a_killed_holder_never_blocks_the_next_resume(cache_dir, tmp_path, figures):
    out = tmp_path / "run"
    fit = ["fit", *tiny_flags(cache_dir, out, "--checkpoint-interval", "1", "--resume")]
    for _ in range(SCALE.trainer_kills):
        resume_from = checkpoint_step(out, LAST)
        holder = Trainer([*fit, "--steps", "100000"])
        # Its second step: it holds the lock and has written a last.pt for the next round to resume.
        wait_for(lambda: len(holder.steps()) >= 2, STARTUP, interval=0.01, message="the holder's second step")
        # Refused before it reads, writes or removes anything in the folder (no "Training ..." line).
        contender = invoke_fit(cache_dir, out, "--steps", "100000", "--resume", expect=1)
        assert f"another trainer (PID {holder.process.pid}) is writing to {out}" in contender.output
        assert "Training" not in contender.output and "Traceback" not in contender.output
        holder.process.send_signal(signal.SIGKILL)
        assert holder.finish() == -signal.SIGKILL, holder.output()
        # The kernel dropped the killed holder's lock: this round's holder resumed where the last left off.
        assert holder.steps()[0] == (resume_from or 0) + 1, holder.output()

    final = checkpoint_step(out, LAST) + 2
    assert Trainer([*fit, "--steps", str(final)]).finish() == 0
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, final + 1))
    figures.update(contenders_refused=SCALE.trainer_kills, holders_killed=SCALE.trainer_kills, final_step=final)
