"""`trainer sample`, `export` and `info`: small jobs on a finished checkpoint, all through `model`."""

from __future__ import annotations

from pathlib import Path

from model import EOT_TOKEN, Engine, SamplingParams, Tokenizer, load_checkpoint, resolve_device


def sample(checkpoint: Path, prompt: str, num_samples: int, max_new_tokens: int, top_k: int | None,
           temperature: float, seed: int, device: str) -> list[str]:
    """`num_samples` continuations of `prompt`; sample i uses seed + i, so each is reproducible alone."""
    model, _ = load_checkpoint(checkpoint, resolve_device(device))
    tokenizer = Tokenizer()
    # An empty prompt starts from end-of-text, the token every document follows.
    tokens = tokenizer.encode(prompt) or [EOT_TOKEN]
    engine = Engine(model, tokenizer, max_batch_size=num_samples)
    engine.check_fits(len(tokens), 1)
    # As many new tokens as asked for, or as fit.
    max_new_tokens = min(max_new_tokens, engine.max_seq_len - len(tokens))
    ids = [
        engine.add(tokens, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          seed=seed + i))
        for i in range(num_samples)
    ]
    texts = {i: "" for i in ids}
    for event in engine.stream():
        texts[event.request_id] += event.text
    return [prompt + texts[i] for i in ids]


def export(checkpoint: Path, directory: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    model.save_pretrained(directory)


def info(checkpoint: Path) -> list[tuple[str, str]]:
    """A checkpoint's config, progress, losses and size as (label, value) rows."""
    model, meta = load_checkpoint(checkpoint)
    rows = [("file", f"{checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB)")]
    rows += [(key, str(value)) for key, value in model.config.to_dict().items()]
    rows.append(("parameters", f"{model.num_parameters(non_embedding=False):,}"))
    for key in ("step", "tokens", "loss", "val_loss", "best_loss", "best_step", "learning_rate"):
        if key in meta:
            rows.append((key, _fmt(meta[key])))
    if "elapsed" in meta:
        rows.append(("elapsed", f"{meta['elapsed']:.1f} s"))
    if isinstance(meta.get("settings"), dict):
        rows.append(("data", str(meta["settings"].get("data"))))
    rows.append(("resumable", "yes" if "optimizer" in meta else "no"))
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)
