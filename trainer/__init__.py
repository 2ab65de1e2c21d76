"""The training sidecar: `trainer fit` trains a GPT from the `model` package and publishes checkpoints.

Modules, one job each: settings (every option, from flags or TRAINER_* variables), data (text to a
cached token file and random batches), schedule (learning rate), optimizer (AdamW groups),
distributed (torchrun / DDP plumbing), checkpoints (what each .pt file holds), flops (MFU),
progress (console, metrics.jsonl, Prometheus), stopping (SIGTERM / Ctrl-C), train (the loop),
commands (sample, export, info) and cli (the click entry point).
"""
