"""Decode speed of the engine against transformers' `generate`, on the same weights, prompt and length.

    python -m bench.bench_decode [--preset gpt2] [--new-tokens 128] [--checkpoint best_model.pt --data text]

Both sides decode greedily from the same 16-token prompt for exactly --new-tokens tokens, at batch 1
and at batch 8, after one warm-up run. The engine runs in fp32 and bf16 with plain weights and with
weights packed for oneDNN (the service's CPU default), and with int8 / int4 weight-only
quantization; transformers in fp32 and bf16. With a trained checkpoint and a text file, the
validation loss of each engine variant shows what quantization costs in quality.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from bench.common import print_table, write_result
from model import GPT, Engine, GPTConfig, SamplingParams, Tokenizer, load_checkpoint
from model import packing
from model.quantize import quantize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (dtype, weights): plain, packed (model.packing) or a weight-only quantization (model.quantize).
ENGINE_VARIANTS = [("fp32", "plain"), ("fp32", "packed"), ("bf16", "plain"), ("bf16", "packed"), ("bf16", "int8"),
                   ("bf16", "int4")]  # fmt: skip


def engine_model(model: GPT, dtype: str, weights: str) -> GPT:
    """A copy of `model` in `dtype` with its weights held as `weights` says."""
    copied = copy.deepcopy(model).to(DTYPES[dtype]).eval()
    if weights == "packed":
        return packing.pack(copied)
    return quantize(copied, "none" if weights == "plain" else weights)


def time_engine(model: GPT, prompt: list[int], batch: int, new_tokens: int) -> float:
    engine = Engine(model, max_batch_size=batch, max_seq_len=len(prompt) + new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False)
    engine.generate_tokens([prompt] * batch, SamplingParams(max_new_tokens=8, temperature=0.0))
    start = time.perf_counter()
    engine.generate_tokens([prompt] * batch, params)
    return batch * new_tokens / (time.perf_counter() - start)


def time_transformers(hf: GPT2LMHeadModel, prompt: list[int], batch: int, new_tokens: int) -> float:
    idx = torch.tensor([prompt] * batch)
    kwargs = dict(do_sample=False, pad_token_id=50256, attention_mask=torch.ones_like(idx))
    with torch.no_grad():
        hf.generate(idx, max_new_tokens=8, **kwargs)
        start = time.perf_counter()
        out = hf.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == len(prompt) + new_tokens
    return batch * new_tokens / elapsed


def validation_loss(model: GPT, tokens: torch.Tensor, block: int, blocks: int = 16) -> float:
    starts = torch.linspace(0, len(tokens) - block - 2, blocks).long()
    x = torch.stack([tokens[s : s + block] for s in starts])
    y = torch.stack([tokens[s + 1 : s + block + 1] for s in starts])
    with torch.no_grad():
        _, loss = model(x, y)
    return loss.item()


def quality(checkpoint: Path, data: Path) -> list[dict]:
    base, meta = load_checkpoint(checkpoint)
    text = data.read_text(encoding="utf-8")
    tokens = torch.tensor(Tokenizer().encode(text[int(len(text) * 0.9) :]))
    block = min(base.config.block_size, 256)
    rows = []
    for dtype, weights in ENGINE_VARIANTS:
        model = engine_model(base, dtype, weights)
        rows.append({"engine": f"{dtype}/{weights}", "val_loss": validation_loss(model, tokens, block)})
    reference = rows[0]["val_loss"]
    for row in rows:
        row["delta_vs_fp32"] = row["val_loss"] - reference
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the quality table")
    parser.add_argument("--data", type=Path, help="text whose last tenth is the validation split")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        hf_fp32 = GPT2LMHeadModel.from_pretrained(directory).eval()
    prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(1)).tolist()

    rows = []
    for name, dtype in DTYPES.items():
        hf = copy.deepcopy(hf_fp32).to(dtype)
        for batch in (1, args.batch):
            rows.append({"impl": "transformers", "dtype": name, "weights": "plain", "batch": batch,
                         "tokens_per_s": time_transformers(hf, prompt, batch, args.new_tokens)})
    for dtype, weights in ENGINE_VARIANTS:
        variant = engine_model(model, dtype, weights)
        for batch in (1, args.batch):
            rows.append({"impl": "engine", "dtype": dtype, "weights": weights, "batch": batch,
                         "tokens_per_s": time_engine(variant, prompt, batch, args.new_tokens)})

    reference = max(r["tokens_per_s"] for r in rows if r["impl"] == "transformers" and r["batch"] == 1)
    single = {(r["impl"], r["dtype"], r["weights"]): r["tokens_per_s"] for r in rows if r["batch"] == 1}
    for row in rows:
        row["vs_transformers_batch1"] = row["tokens_per_s"] / reference
        row["vs_own_batch1"] = row["tokens_per_s"] / single[(row["impl"], row["dtype"], row["weights"])]
    print_table(f"Greedy decode, {args.preset} shape, 16-token prompt, {args.new_tokens} new tokens", rows)

    result = {"preset": args.preset, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
              "transformers_batch1_tokens_per_s": reference, "rows": rows}
    if args.checkpoint and args.data:
        result["quality"] = quality(args.checkpoint, args.data)
        print_table(f"Validation loss by engine precision ({args.checkpoint})", result["quality"])
    write_result("decode", result)


if __name__ == "__main__":
    main()
