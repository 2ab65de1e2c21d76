"""The training sidecar: `trainer fit` trains a GPT from the `model` package and publishes checkpoints.

Modules, one job each: settings (every option, from flags or TRAINER_* variables), data (text to a
cached token file and random batches), train (the loop, with its optimizer groups, learning-rate
schedule and graceful stop), distributed (torchrun / DDP plumbing), checkpoints (what each .pt file
holds, and the output folder's lock), report (console, metrics.jsonl, Prometheus, tokens/s and MFU),
commands (sample, export, info) and cli (the click entry point).
"""
