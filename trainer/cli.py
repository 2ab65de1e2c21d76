"""`trainer`: fit, sample, export and info."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from model import CheckpointError, ContextLengthError
from model.cli_options import build_settings, settings_options
from trainer import commands, distributed
from model.files import FolderInUse
from trainer.checkpoints import hold
from trainer.data import DataError
from trainer.settings import TrainerSettings
from trainer.train import Trainer, TrainingError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Train a GPT-2-class model and publish its checkpoints (see `trainer fit --help`)."""


@main.command()
@settings_options(TrainerSettings)
def fit(**flags):
    """Train a model. Every option may also be set as a TRAINER_* environment variable.

    Under `torchrun --nproc_per_node=N -m trainer fit ...` it trains with DistributedDataParallel.
    """
    settings = build_settings(TrainerSettings, flags)
    try:
        ctx = distributed.setup(settings.device)
    except ValueError as e:
        raise click.UsageError(f"--device: {e}") from None
    try:
        # Only the main process locks: the others of a torchrun job write nothing there.
        with hold(settings.out) if ctx.is_main else nullcontext():
            Trainer(settings, ctx).run()
    except (DataError, TrainingError, FolderInUse, OSError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        distributed.teardown(ctx)


checkpoint_option = click.option(
    "--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="A .pt file written by `trainer fit`.",
)


@main.command()
@checkpoint_option
@click.option("--prompt", default="", help="Text to continue (empty: start a new document).")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=50, show_default=True, help="0: no top-k filter.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True, help="0: greedy.")
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--device", default="auto", show_default=True)
def sample(checkpoint, prompt, num_samples, max_new_tokens, top_k, temperature, seed, device):
    """Generate text from a checkpoint."""
    try:
        texts = commands.sample(checkpoint, prompt, num_samples, max_new_tokens, top_k or None, temperature, seed,
                                device)
    except (CheckpointError, ContextLengthError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for i, text in enumerate(texts):
        if i:
            click.echo("-" * 40)
        click.echo(text)


@main.command()
@checkpoint_option
@click.option("--hf", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the Hugging Face GPT-2 model to.")
def export(checkpoint, directory):
    """Write a checkpoint as a Hugging Face GPT2LMHeadModel folder."""
    try:
        commands.export(checkpoint, directory)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Wrote {directory} (load it with transformers.GPT2LMHeadModel.from_pretrained)")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(path):
    """Show a checkpoint's config, step, losses and size."""
    try:
        rows = commands.info(path)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label.ljust(width)}  {value}")
