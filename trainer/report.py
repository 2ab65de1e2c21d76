"""What a run tells the outside world: console lines, a progress bar on terminals, metrics.jsonl and
the Prometheus endpoint, with the throughput arithmetic behind them (tokens/s and the MFU estimate).
Only the main process reports."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server
from tqdm import tqdm

from model import GPTConfig
from model.checkpoint import atomic_write
from trainer.checkpoints import Progress
from trainer.settings import TrainerSettings

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per weight (position embeddings excluded, as
    nanoGPT counts) plus attention's 12·L·T·C."""
    return 6 * n_params + 12 * config.n_layer * seq_len * config.n_embd


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak for `dtype`, the denominator of the MFU estimate, or None where unknown.

    A GPU's is its data sheet's. A CPU has no figure that means much, so its peak is the best rate
    of several large matrix products in the compute dtype: load from other work only slows a product
    down, and the best of several is the one it touched least.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        return measure_matmul_flops(dtype)
    return None


def utilisation(flops_per_sec: float, peak: float | None) -> str | None:
    """The MFU estimate as the log shows it, or None where the peak is unknown. A run faster than its peak
    proves the peak wrong (a CPU's, measured while other work ran, as when `make up` loads the service
    beside the trainer), so the estimate is then "unknown", never above 100%."""
    if not peak:
        return None
    share = flops_per_sec / peak
    return f"{share:.1%} (est.)" if share <= 1 else "unknown (peak measured under load)"


def measure_matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` size×size matrix products on the CPU."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = a @ b  # the first product pays for the kernel's setup
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class TrainingMetrics:
    """The trainer's Prometheus endpoint, so Grafana shows training beside serving.

    Metric names are a contract with the dashboard: change them only together.
    """

    def __init__(self, port: int, start: Progress):
        self.registry = CollectorRegistry()
        r = self.registry
        self.loss = Gauge("gpt_train_loss", "Training loss of the latest logged step", registry=r)
        self.val_loss = Gauge("gpt_val_loss", "Validation loss of the latest evaluation", registry=r)
        self.best_val_loss = Gauge(
            "gpt_train_best_val_loss", "Lowest validation loss so far (best_model.pt)", registry=r
        )
        self.lr = Gauge("gpt_train_learning_rate", "Learning rate of the latest step", registry=r)
        self.tokens_per_second = Gauge("gpt_train_tokens_per_second", "Training throughput, all processes", registry=r)
        self.grad_norm = Gauge("gpt_train_grad_norm", "Gradient norm before clipping", registry=r)
        self.step = Gauge("gpt_train_step", "Optimizer steps completed", registry=r)
        self.tokens = Counter("gpt_train_tokens", "Tokens trained on, resumed runs included", registry=r)
        self.checkpoints = Counter(
            "gpt_train_checkpoints", "Checkpoints written, by file", ["kind"], registry=r
        )
        for kind in ("best", "last", "final"):
            self.checkpoints.labels(kind=kind)
        # Memory and CPU of the trainer, beside the service's processes on the dashboard.
        ProcessCollector(registry=r)
        # NaN, not 0, until known: a dashboard shows a gap rather than a perfect loss.
        for gauge, value in ((self.loss, start.loss), (self.val_loss, start.val_loss),
                             (self.best_val_loss, start.best_loss)):
            gauge.set(math.nan if value is None else value)
        self.step.set(start.step)
        self.tokens.inc(start.tokens)
        self._server, _ = start_http_server(port, registry=r)
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Reporter:
    def __init__(self, out: Path, start: Progress, settings: TrainerSettings, enabled: bool, *,
                 tokens_per_step: int, flops_per_token: float, peak_flops: float | None):
        """`start` is where the run begins: a fresh Progress, or the one a resume restored."""
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        # Training time and steps since the last logged line: its tokens/s, ms/step and MFU.
        self.window_seconds, self.window_steps = 0.0, 0
        self.metrics = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = _open_jsonl(out / METRICS_FILE, start.step)
        if settings.metrics_port is not None:
            self.metrics = TrainingMetrics(settings.metrics_port, start)
            self.say(f"Prometheus metrics on port {self.metrics.port}")
        if sys.stdout.isatty():
            self.bar = tqdm(total=settings.steps, initial=start.step, unit="step", dynamic_ncols=True, leave=False)

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def step(self, progress: Progress, grad_norm: float, seconds: float, evaluated: bool, log: bool) -> None:
        """Record one optimizer step that took `seconds`; console and metrics.jsonl only on logged or
        evaluated steps."""
        self.window_seconds += seconds
        self.window_steps += 1
        if not self.enabled:
            return
        tokens_per_sec = self.tokens_per_step * self.window_steps / self.window_seconds
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
        ms_per_step = 1000 * self.window_seconds / self.window_steps
        mfu = utilisation(self.flops_per_token * tokens_per_sec, self.peak_flops)
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
        if log:
            self.window_seconds, self.window_steps = 0.0, 0

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
        parts.append(f"mfu {mfu}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
