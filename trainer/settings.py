"""Every option of `trainer fit`, from a flag, a TRAINER_* environment variable or the default.

The defaults are the seed script's hyperparameters, so `trainer fit` reproduces its run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model import PRESETS

PresetName = Literal[tuple(PRESETS)]


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="forbid")

    data: str = Field(
        "input.txt",
        description="Training text: a UTF-8 file, builtin:pydoc (Python's own documentation, no network needed) "
        "or an http(s) URL downloaded once into the cache.",
    )
    out: Path = Field(
        Path("checkpoints"), description="Folder for best_model.pt, last.pt, final_model.pt and metrics.jsonl."
    )
    cache_dir: Path | None = Field(None, description="Folder for token caches and downloads (none: OUT/.cache).")
    preset: PresetName = Field("mini", description="Model shape to train from scratch.")
    n_layer: int | None = Field(None, gt=0, description="Override the preset's number of layers.")
    n_head: int | None = Field(None, gt=0, description="Override the preset's number of attention heads.")
    n_embd: int | None = Field(None, gt=0, description="Override the preset's embedding width.")
    block_size: int | None = Field(None, gt=0, description="Override the preset's context length.")
    init: str = Field(
        "scratch",
        description="Starting weights: scratch, a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a "
        "save_pretrained folder or a .pt checkpoint. Anything but scratch brings its own shape.",
    )
    resume: bool = Field(False, description="Continue exactly from OUT/last.pt (starts afresh when there is none).")
    batch_size: int = Field(16, gt=0, description="Sequences per micro-step on each process.")
    seq_len: int | None = Field(
        None, gt=0,
        description="Tokens per training sequence, at most the model's context (none: the context, up to 128).",
    )
    grad_accum: int = Field(1, gt=0, description="Micro-steps accumulated into one optimizer step.")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate, reached after the warmup.")
    min_lr: float = Field(6e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay, applied to matrices and embeddings only.")
    warmup_steps: int = Field(100, ge=0, description="Steps of linear warmup from 0 to --lr.")
    lr_decay_steps: int | None = Field(
        None, gt=0, description="Step where the cosine decay reaches --min-lr (none: --steps)."
    )
    steps: int = Field(5000, gt=0, description="Optimizer steps to train for (a resumed run counts those done).")
    time_limit: float | None = Field(
        None, gt=0, description="Stop after this many minutes of training, as if --steps were reached."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0: no clipping).")
    eval_interval: int = Field(
        100, gt=0, description="Steps between validation-loss evaluations; the first comes by step 10, so a new "
        "run publishes best_model.pt early."
    )
    eval_iters: int = Field(10, gt=0, description="Validation batches per evaluation.")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the tokens, from the end, held out for validation."
    )
    checkpoint_interval: int = Field(100, gt=0, description="Steps between writes of last.pt.")
    log_interval: int = Field(10, gt=0, description="Steps between console lines and metrics.jsonl records.")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Compute precision. auto: on a CPU the faster of bf16 and fp32, timed on a training "
        "step of the run's shape at start-up; on a GPU bf16 where supported; a resumed run keeps its precision."
    )
    compile: bool | None = Field(
        None, description="Compile the model with torch.compile: slower start, faster steps (none: on CUDA only)."
    )
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    seed: int = Field(1337, description="Seed for weights, batches and dropout.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics on this port (0: any free port; none: off)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainerSettings:
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        return self

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.steps
