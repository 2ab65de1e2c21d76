"""Turning checkpoints and pretrained weights into engines a worker can serve, and checkpoints into draft
models for them (speculative decoding), or refusing them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT, CheckpointError, Engine, Tokenizer, load_checkpoint, native, packing
from model.device import DTYPES, cpu_layout, measure_dtype
from model.quantize import quantize
from service.messages import ModelInfo

log = logging.getLogger(__name__)

# Logits of this prompt must be finite before a model is served: weights that overflow in the served
# precision (or that were garbage to begin with) would otherwise answer nonsense while /health says ready.
PROBE = "The quick brown fox jumps over the lazy dog."


@dataclass
class Loaded:
    """A model ready to serve: the engine that runs it and what to call it in responses."""

    engine: Engine
    info: ModelInfo
    draft: Draft | None = None  # the draft model the engine proposes with, set by the scheduler


@dataclass
class Draft:
    """A draft model ready to propose tokens to the served engines, and which checkpoint it is."""

    model: GPT
    info: ModelInfo


class ModelLoader:
    def __init__(
        self,
        device: torch.device,
        dtype: str,
        quantization: str,
        pack_weights: bool,
        tokenizer: Tokenizer,
        max_batch_size: int,
        batch_invariant: bool = True,
        draft_length: int | None = None,
    ):
        self.device = device
        # None until --dtype auto has measured which precision decodes faster (at the first load).
        self.dtype: torch.dtype | None = None if dtype == "auto" else DTYPES[dtype]
        self.quantization = quantization
        # CPU weights packed for our decode kernels where they were built (plain or int8 layers), else for
        # oneDNN (plain layers; quantized ones have formats of their own). GPUs have no use for either.
        self.native = pack_weights and device.type == "cpu" and quantization != "int4" and native.available()
        self.pack = self.native or pack_weights and quantization == "none" and device.type == "cpu" and packing.available()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_invariant = batch_invariant
        self.draft_length = draft_length
        self.shape: dict | None = None

    @property
    def dtype_name(self) -> str:
        return next((name for name, dtype in DTYPES.items() if dtype == self.dtype), "auto")

    @property
    def weights(self) -> str:
        """How the served weights are held, for the log."""
        if self.native:
            layout = f"{self.quantization}, packed for our decode kernels ({native.status()})".removeprefix("none, ")
        elif self.pack:
            layout = "packed for oneDNN"
        elif self.quantization == "none":
            layout = "plain"
        else:
            layout = self.quantization
        invariance = "" if self.batch_invariant else ", not batch-invariant"
        return f"{str(self.dtype).removeprefix('torch.')} weights, {layout}{invariance}"

    def checkpoint(self, path: Path) -> Loaded:
        """The checkpoint at `path`; CheckpointError (naming the file) if it cannot be served.

        Once a checkpoint is served, later ones must keep its architecture: a file of another shape
        in the folder is more likely a mistake than a new run, and a new shape changes the memory
        the workers need, which a restart (that takes whatever is there) should decide.
        """
        model, meta = load_checkpoint(path, self.device)
        self._check_tokenizer(meta, path)
        shape = _shape(model)
        if self.shape is not None and shape != self.shape:
            raise CheckpointError(
                f"{path}: architecture {shape} differs from the served checkpoint's {self.shape}; "
                "restart the service to serve it"
            )
        loaded = self._serve(model, _info(meta, path), path)
        self.shape = shape
        return loaded

    def draft(self, path: Path) -> Draft:
        """The draft model at `path`, in the served precision and layout; CheckpointError (naming the file)
        if it cannot draft for this service. Any architecture drafts: only the tokenizer must be the same.
        Called once a model is loaded, so that --dtype auto has chosen the precision."""
        model, meta = load_checkpoint(path, self.device)
        self._check_tokenizer(meta, path)
        self._check_vocabulary(model, path)
        model = self._prepare(model, self.dtype)
        self._probe(model, path)
        return Draft(model, _info(meta, path))

    def pretrained(self, name_or_path: str) -> Loaded:
        """Hugging Face GPT-2 weights (a hub name or a save_pretrained directory)."""
        model = GPT.from_pretrained(name_or_path).to(self.device)
        return self._serve(model, ModelInfo(step=None, val_loss=None, checkpoint=Path(name_or_path).name), name_or_path)

    def _serve(self, model: GPT, info: ModelInfo, source) -> Loaded:
        self._check_vocabulary(model, source)
        if self.dtype is None:
            model = self._choose_dtype(model)
        else:
            model = self._prepare(model, self.dtype)
        self._probe(model, source)
        # Prompt lookup costs nothing where no request speculates; drafts need batch invariance.
        engine = Engine(
            model, self.tokenizer, self.max_batch_size, batch_invariant=self.batch_invariant,
            prompt_lookup=self.batch_invariant, draft_length=self.draft_length,
        )  # fmt: skip
        return Loaded(engine, info)

    def _check_tokenizer(self, meta: dict, path: Path) -> None:
        if meta.get("tokenizer", self.tokenizer.name) != self.tokenizer.name:
            raise CheckpointError(
                f"{path}: trained with tokenizer {meta['tokenizer']!r}, this service speaks {self.tokenizer.name!r}"
            )

    def _check_vocabulary(self, model: GPT, source) -> None:
        if model.config.vocab_size != self.tokenizer.vocab_size:
            # Prompt tokens beyond a smaller vocabulary would index past the embedding table.
            raise CheckpointError(
                f"{source}: a vocabulary of {model.config.vocab_size} tokens does not fit the "
                f"{self.tokenizer.vocab_size} of tokenizer {self.tokenizer.name}"
            )

    def _prepare(self, model: GPT, dtype: torch.dtype) -> GPT:
        model = quantize(model.to(dtype).eval(), self.quantization)
        return cpu_layout(model) if self.pack else model

    def _choose_dtype(self, model: GPT) -> GPT:
        """--dtype auto: time a full batch's decode step in each precision, serve the faster from now on."""
        choice = measure_dtype(model, self.max_batch_size, model.config.block_size, prepare=self._prepare)
        self.dtype = choice.dtype
        timings = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in choice.seconds_per_step.items())
        log.info(
            "--dtype auto: a decode step of %d rows over %d positions took %s; serving %s",
            self.max_batch_size, model.config.block_size, timings, self.dtype_name,
        )  # fmt: skip
        return choice.model

    def _probe(self, model: GPT, source) -> None:
        tokens = self.tokenizer.encode(PROBE)[: model.config.block_size]
        with torch.inference_mode():
            logits, _ = model(torch.tensor([tokens], device=self.device))
        if not torch.isfinite(logits).all():
            raise CheckpointError(
                f"{source}: the model's logits on a probe prompt are not finite in {self.dtype_name}; "
                "its weights are broken or overflow this precision"
            )


def _info(meta: dict, path: Path) -> ModelInfo:
    return ModelInfo(
        step=_number(meta.get("step"), int), val_loss=_number(meta.get("val_loss"), float), checkpoint=path.name
    )


def _shape(model: GPT) -> dict:
    config = model.config
    return {name: getattr(config, name) for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}


def _number(value, kind):
    """A metadata number as a plain int/float (None stays None; tensors and numpy scalars are unwrapped)."""
    if value is None:
        return None
    try:
        return kind(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
