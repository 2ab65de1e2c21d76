"""The training loop: one `Trainer` per process, built from `TrainerSettings`, with what nanoGPT keeps
beside its loop: the optimizer's parameter groups, the learning-rate schedule and a graceful stop.

Each optimizer step draws the whole global batch's offsets from one seeded generator and every
process takes its own slice, so N processes with gradient accumulation A see exactly the batches
one process with accumulation N·A would: the DDP run and the single run are the same computation.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from model import GPT, CheckpointError, GPTConfig, load_checkpoint
from model.checkpoint import check_finite, remove_temporaries
from trainer import checkpoints, distributed, precision
from trainer.checkpoints import BEST, FINAL, LAST, Progress
from trainer.data import Dataset, prepare
from trainer.report import METRICS_FILE, Reporter, duration, flops_per_token, peak_flops
from trainer.settings import TrainerSettings

# The first evaluation comes this many steps in at the latest, then every --eval-interval steps: a
# fresh run publishes a best_model.pt for the service within a minute, not after the whole interval.
FIRST_EVAL_STEP = 10


class TrainingError(Exception):
    """A run that cannot start or continue; the message says why and what to do."""


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW as GPT-2 is trained: decay on matrices and embeddings, none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass instead of a Python loop of small ops.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def learning_rate(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to a floor."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class StopRequest:
    """SIGTERM and Ctrl-C ask the loop to stop after the current step, so `docker compose stop` loses
    nothing. A second signal restores the default behaviour, so Ctrl-C twice still ends a stuck run."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing last.pt", flush=True)
        signal.signal(signum, self._previous[signum])


class Trainer:
    def __init__(self, settings: TrainerSettings, ctx: distributed.Context):
        self.ctx = ctx
        self.out = Path(settings.out)
        torch.manual_seed(settings.seed)
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.batch_generator = torch.Generator().manual_seed(settings.seed)

        if ctx.is_main:
            self._remove_partial_files()
        resume = self._resume_data(settings)
        self.model = resume[0] if resume else initial_model(settings, ctx.device)
        config = self.model.config
        # The run's settings as it runs them (and as its checkpoints record them): --seq-len resolved.
        self.settings = s = settings.model_copy(update={"seq_len": sequence_length(settings, config)})
        self.dataset = self._load_data()
        self.model.to(ctx.device).train()
        resumed_dtype = resume[1].get("settings", {}).get("dtype") if resume else None
        self.precision = precision.choose(s.dtype, resumed_dtype, self.model, s.batch_size, s.seq_len, ctx)
        self.dtype = self.precision.dtype
        # Checkpoints record the precision trained in, so that a resumed `auto` run keeps it.
        self.settings = s = s.model_copy(update={"dtype": self.precision.name})
        self.optimizer = adamw(self.model, s.lr, s.weight_decay, ctx.device)
        self.progress = Progress()
        if resume:
            self.progress = checkpoints.restore(resume[1], self.optimizer, self.batch_generator)

        # Compiling pays off on GPUs; on a CPU it costs half a minute and a C++ compiler for 10-25%
        # faster steps (bench/bench_train.py), a poor trade for a quickstart.
        self.compiled = s.compile if s.compile is not None else ctx.device.type == "cuda"
        if self.compiled:
            # Block by block, in place (as torchtitan compiles): the identical blocks share one compiled
            # graph, and the loss (model/loss.py) stays eager, as it must: Inductor would materialise the
            # logits that it computes a block of rows at a time.
            for block in self.model.transformer.h:
                block.compile()
        self.ddp = None
        if ctx.enabled:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * ctx.world_size
        self.flops_per_token = flops_per_token(config, self.model.num_parameters(), s.seq_len)
        peak = peak_flops(ctx.device, self.dtype) if ctx.is_main else None
        self.peak = peak * ctx.world_size if peak else None
        self.resumed = resume is not None

    def _load_data(self) -> Dataset:
        s = self.settings
        cache = Path(s.cache_dir) if s.cache_dir else self.out / ".cache"
        # The main process downloads and tokenizes; the others then find the cached token file.
        if self.ctx.is_main:
            token_file = prepare(s.data, cache)
        distributed.barrier(self.ctx)
        if not self.ctx.is_main:
            token_file = prepare(s.data, cache)
        return Dataset.load(token_file, s.val_fraction, s.seq_len)

    def _remove_partial_files(self) -> None:
        # A partial checkpoint is as large as a checkpoint: a trainer that keeps being killed mid-write
        # would fill the disk.
        for name in (BEST, LAST, FINAL, METRICS_FILE):
            for partial in remove_temporaries(self.out / name):
                print(f"note: removed {partial}, a partial {name} left by a run killed while writing it")

    def _resume_data(self, settings: TrainerSettings):
        path = self.out / LAST
        if not settings.resume:
            if path.exists() and self.ctx.is_main:
                print(f"note: {path} holds an earlier run; starting afresh replaces it (--resume continues it)")
            return None
        if not path.exists():
            if self.ctx.is_main:
                print(f"note: no {path} to resume from: starting a new run")
            return None
        try:
            return checkpoints.read_resume(path, "cpu")
        except (CheckpointError, ValueError) as e:
            raise TrainingError(f"{e}; remove it or run without --resume") from None

    def autocast(self):
        return precision.autocast(self.ctx.device, self.dtype)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step, counted in `progress`; returns the global batch's mean loss and the
        gradient norm."""
        s, ctx = self.settings, self.ctx
        lr = learning_rate(self.progress.step, s.lr, s.min_lr, s.warmup_steps, s.decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.progress.learning_rate = lr
        count = s.grad_accum * ctx.world_size * s.batch_size
        offsets = self.dataset.offsets("train", count, s.seq_len, self.batch_generator)
        offsets = offsets.view(s.grad_accum, ctx.world_size, s.batch_size)
        model = self.ddp or self.model
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(s.grad_accum):
            x, y = self.dataset.batch("train", offsets[micro, ctx.rank], s.seq_len, ctx.device)
            # DDP averages gradients across processes only on the last micro-step.
            last = micro == s.grad_accum - 1
            with nullcontext() if last or not self.ddp else self.ddp.no_sync():
                with self.autocast():
                    _, loss = model(x, y)
                (loss / s.grad_accum).backward()
            loss_sum += loss.detach()
        loss = distributed.mean(loss_sum / s.grad_accum, ctx).item()
        max_norm = s.grad_clip if s.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        for what, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                self._diverged(f"the {what} became {value} at step {self.progress.step + 1}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        self.progress.loss = loss
        return loss, grad_norm

    def _diverged(self, what: str) -> None:
        raise TrainingError(
            f"{what}: training diverged. The checkpoints in {self.out} are left as they were; try a lower "
            f"--lr, a longer --warmup-steps or --dtype fp32"
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the same --eval-iters validation batches every time, so evaluations compare."""
        s, ctx = self.settings, self.ctx
        generator = torch.Generator().manual_seed(s.seed + 1)
        offsets = self.dataset.offsets("val", s.eval_iters * s.batch_size, s.seq_len, generator)
        offsets = offsets.view(s.eval_iters, s.batch_size)
        self.model.eval()
        loss_sum = torch.zeros((), device=ctx.device)
        for i in range(ctx.rank, s.eval_iters, ctx.world_size):
            x, y = self.dataset.batch("val", offsets[i], s.seq_len, ctx.device)
            with self.autocast():
                _, loss = self.model(x, y)
            loss_sum += loss.float()
        self.model.train()
        return distributed.total(loss_sum, ctx).item() / s.eval_iters

    def publish(self, name: str, **extra) -> None:
        # Every process checks (they hold the same weights), so all of them stop together.
        try:
            check_finite(self.model, f"step {self.progress.step}")
        except CheckpointError as e:
            self._diverged(str(e))
        if not self.ctx.is_main:
            return
        path = self.out / name
        try:
            checkpoints.publish(
                path, self.model, self.progress, self.settings.model_dump(mode="json"), self.dataset.digest,
                **extra,
            )
        except OSError as e:  # a full disk, most likely: the atomic write left the previous file as it was
            raise TrainingError(
                f"could not write {path} ({e.strerror or e}); the previous {name} is unchanged"
            ) from None

    def run(self) -> Progress:
        s, ctx, p = self.settings, self.ctx, self.progress
        reporter = Reporter(self.out, p, s, ctx.is_main, tokens_per_step=self.tokens_per_step,
                            flops_per_token=self.flops_per_token, peak_flops=self.peak)
        try:
            with StopRequest() as stop:
                self._describe(reporter)
                self._loop(reporter, stop)
            # Rank 0 may still be writing the final checkpoints; a gloo process that exits while a
            # peer is alive can abort (SIGABRT) at exit, failing the whole torchrun job.
            distributed.barrier(ctx)
        finally:
            reporter.close()
        return p

    def _loop(self, reporter: Reporter, stop: StopRequest) -> None:
        s, ctx, p = self.settings, self.ctx, self.progress
        started = time.perf_counter() - p.elapsed
        first_eval = min(s.eval_interval, FIRST_EVAL_STEP)
        finished = p.step >= s.steps
        while not finished:
            t0 = time.perf_counter()
            _, grad_norm = self.train_step()
            step_seconds = time.perf_counter() - t0
            p.elapsed = time.perf_counter() - started

            time_up = s.time_limit is not None and p.elapsed >= s.time_limit * 60
            stopping, time_up = distributed.any_true([stop.requested, time_up], ctx)
            finished = p.step >= s.steps or time_up
            evaluated = p.step % s.eval_interval == 0 or p.step == first_eval or finished
            if evaluated:
                self._evaluate(reporter)
            log = p.step % s.log_interval == 0 or finished or stopping
            reporter.step(p, grad_norm, step_seconds, evaluated, log)
            if p.step % s.checkpoint_interval == 0 or finished or stopping:
                self.publish(LAST, **checkpoints.resume_state(self.optimizer, self.batch_generator))
                reporter.checkpoint("last")
            if finished:
                self.publish(FINAL)
                reporter.checkpoint("final")
            if stopping:
                break
        self._summarise(reporter, finished)

    def _evaluate(self, reporter: Reporter) -> None:
        p = self.progress
        p.val_loss, p.val_step = self.evaluate(), p.step
        if not math.isfinite(p.val_loss):
            self._diverged(f"the validation loss became {p.val_loss} at step {p.step}")
        if p.best_loss is None or p.val_loss < p.best_loss:
            p.best_loss, p.best_step = p.val_loss, p.step
            self.publish(BEST)
            reporter.checkpoint("best")
            reporter.say(f"Saved best model (val loss {p.val_loss:.4f}, step {p.step}) to {self.out / BEST}")

    def _describe(self, reporter: Reporter) -> None:
        s, c = self.settings, self.model.config
        n = self.model.num_parameters(non_embedding=False)
        start = f"resuming at step {self.progress.step}" if self.resumed else "from " + s.init
        reporter.say(
            f"Training {c.n_layer} layers × {c.n_head} heads × {c.n_embd} wide, context {c.block_size} "
            f"({n / 1e6:.1f}M parameters), {start}, on {self.ctx.device} "
            f"in {precision.describe(self.precision)}"
            + (f" × {self.ctx.world_size} processes" if self.ctx.enabled else "")
            + (", compiled block by block" if self.compiled else "")
        )
        reporter.say(
            f"Data {s.data}: {len(self.dataset.train):,} training and {len(self.dataset.val):,} validation tokens; "
            f"{s.seq_len} tokens per sequence, {self.tokens_per_step:,} per step, {s.steps} steps"
        )

    def _summarise(self, reporter: Reporter, finished: bool) -> None:
        p = self.progress
        verb = "Finished" if finished else "Stopped"
        reporter.say(
            f"{verb} at step {p.step}: {p.tokens:,} tokens in {duration(p.elapsed)} "
            f"({p.tokens / max(p.elapsed, 1e-9):,.0f} tokens/s overall)"
        )
        if p.best_loss is not None:
            reporter.say(f"Best validation loss {p.best_loss:.4f} at step {p.best_step}: {self.out / BEST}")
        reporter.say(f"Final model: {self.out / FINAL}" if finished else f"Continue with --resume ({self.out / LAST})")


def sequence_length(s: TrainerSettings, config: GPTConfig) -> int:
    """--seq-len as given, or the model's context up to the seed's 128."""
    if s.seq_len is None:
        return min(config.block_size, 128)
    if s.seq_len > config.block_size:
        raise TrainingError(
            f"--seq-len {s.seq_len} exceeds the model's context of {config.block_size} tokens: "
            f"lower --seq-len or raise --block-size"
        )
    return s.seq_len


def initial_model(s: TrainerSettings, device: torch.device) -> GPT:
    """The model a new run starts from: a preset built from scratch, or pretrained weights."""
    if s.init == "scratch":
        overrides = {k: getattr(s, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(s, k)}
        # Rows padded to a multiple of 64 suit GPU matrix units; on a CPU the padded logits only add
        # work to the softmax, the step's most expensive part.
        vocab_multiple = 64 if device.type == "cuda" else 1
        try:
            return GPT(GPTConfig.from_preset(s.preset, vocab_multiple=vocab_multiple, **overrides))
        except ValueError as e:
            raise TrainingError(f"invalid model shape: {e}") from None
    if Path(s.init).is_file():
        try:
            return load_checkpoint(s.init)[0]
        except CheckpointError as e:
            raise TrainingError(f"--init: {e}") from None
    try:
        return GPT.from_pretrained(s.init)
    except ValueError as e:
        raise TrainingError(f"--init: {e}; or use scratch or a .pt checkpoint") from None
    except OSError as e:
        raise TrainingError(
            f"--init {s.init}: could not load the weights ({e}); with no network use a local folder"
        ) from None
