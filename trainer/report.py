"""What a run tells the outside world: console lines, a progress bar on terminals, metrics.jsonl and
the Prometheus gauges. Only the main process reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from model.checkpoint import atomic_write
from trainer.checkpoints import Progress
from trainer.prometheus import TrainingMetrics

METRICS_FILE = "metrics.jsonl"


class Reporter:
    def __init__(self, out: Path, start: Progress, total_steps: int, tokens_per_step: int,
                 metrics_port: int | None, enabled: bool):
        """`start` is where the run begins: a fresh Progress, or the one a resume restored."""
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.metrics = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = _open_jsonl(out / METRICS_FILE, start.step)
        if metrics_port is not None:
            self.metrics = TrainingMetrics(metrics_port, start)
            self.say(f"Prometheus metrics on port {self.metrics.port}")
        if sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start.step, unit="step", dynamic_ncols=True, leave=False)

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def step(self, progress: Progress, grad_norm: float, tokens_per_sec: float, ms_per_step: float,
             mfu: float | None, evaluated: bool, log: bool) -> None:
        """Record one optimizer step; console and metrics.jsonl only on logged or evaluated steps."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if self.metrics:
            m = self.metrics
            m.tokens.inc(self.tokens_per_step)
            m.loss.set(progress.loss)
            m.lr.set(progress.learning_rate)
            m.grad_norm.set(grad_norm)
            m.tokens_per_second.set(tokens_per_sec)
            if evaluated:
                m.val_loss.set(progress.val_loss)
                m.best_val_loss.set(progress.best_loss)
            m.step.set(progress.step)
        if not (log or evaluated):
            return
        self.say(_line(progress, grad_norm, tokens_per_sec, ms_per_step, mfu, evaluated))
        record = {
            "step": progress.step,
            "loss": progress.loss,
            "lr": progress.learning_rate,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "elapsed": progress.elapsed,
            "tokens": progress.tokens,
        }
        if evaluated:
            record["val_loss"] = progress.val_loss
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def checkpoint(self, kind: str) -> None:
        if self.metrics:
            self.metrics.checkpoints.labels(kind=kind).inc()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.metrics:
            self.metrics.close()


def _open_jsonl(path: Path, keep_until: int):
    """metrics.jsonl for appending, without records past `keep_until`: a run killed after its last
    checkpoint logged steps that the resumed run is about to log again.

    A record cut short (the disk filled while it was appended) is dropped too, and the kept records
    replace the file atomically, so a run killed right here loses none of them.
    """
    kept = []
    if keep_until and path.exists():
        steps = ((line, _step(line)) for line in path.read_text().splitlines())
        kept = [line for line, step in steps if step is not None and step <= keep_until]
    atomic_write(path, "".join(line + "\n" for line in kept).encode())
    return path.open("a", encoding="utf-8")


def _step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _line(p: Progress, grad_norm, tokens_per_sec, ms_per_step, mfu, evaluated) -> str:
    best = f"{p.best_loss:.4f} (step {p.best_step})" if p.best_loss is not None else "-"
    parts = [
        f"step {p.step}",
        f"lr {p.learning_rate:.2e}",
        f"loss {p.loss:.4f}",
    ]
    if evaluated:
        parts.append(f"val {p.val_loss:.4f}")
    parts += [f"best {best}", f"{tokens_per_sec:,.0f} tok/s", f"{ms_per_step:.0f} ms/step", f"grad {grad_norm:.2f}"]
    if mfu is not None:
        parts.append(f"mfu {mfu:.1%}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
