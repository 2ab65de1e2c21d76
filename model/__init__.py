"""The shared model package: GPT-2 network, tokenizer, checkpoints, generation and Hugging Face interop."""

from model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from model.device import autocast_dtype, resolve_device
from model.generation import ContextLengthError, Engine, SamplingParams, TokenEvent
from model.gpt import GPT, PRESETS, GPTConfig
from model.tokenizer import EOT_TOKEN, TextStream, Tokenizer

__all__ = [
    "EOT_TOKEN",
    "GPT",
    "PRESETS",
    "CheckpointError",
    "ContextLengthError",
    "Engine",
    "GPTConfig",
    "SamplingParams",
    "TextStream",
    "TokenEvent",
    "Tokenizer",
    "autocast_dtype",
    "load_checkpoint",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
