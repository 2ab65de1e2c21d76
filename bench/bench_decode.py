"""Decode speed of the engine against the engines a user would pick instead, on the same weights.

    python -m bench.bench_decode [--preset gpt2] [--new-tokens 128] [--checkpoint best_model.pt --data text]

Every implementation decodes greedily from the same 32-token prompt for exactly --new-tokens tokens,
at batch 1 and at batch 8 (the engine also at 16), after one warm-up run, with the same torch/OpenMP
thread count: the engine in fp32 and bf16 with plain weights and with weights packed for oneDNN
(the CPU default where our kernels are not built), on our decode kernels (model.decode_linear: fp32, bf16,
int8), and quantized to int8 / int4; transformers' generate
in fp32 and bf16; and the peers of bench.peers (llama.cpp, CTranslate2, onnxruntime) at each of
their precisions, which need the benchmark environment (`make bench-env`; without it they are
reported missing). The weights are random, scaled as the tests' `sharpen` does so that greedy
tokens are decided by real margins; each row says how many of its first 32 tokens match the
engine's at the same precision. The same run measures the machine's memory-read bandwidth, and from it the
batch-1 bound of each precision (every weight read once per token), and what batch invariance costs:
the fp32 and packed layouts timed again without it (Engine(batch_invariant=False)). With a trained checkpoint and
a text file, the validation loss of each engine variant shows what quantization costs in quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from bench import peers
from bench.common import print_table, write_result
from model import GPT, Engine, GPTConfig, SamplingParams, Tokenizer, load_checkpoint
from model import native, packing
from model.decode_linear import use_native
from model.quantize import quantize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (dtype, weights): plain, packed (model.packing) or quantized (model.quantize).
ENGINE_VARIANTS = [("fp32", "plain"), ("fp32", "packed"), ("bf16", "plain"), ("bf16", "packed"), ("bf16", "int8"),
                   ("bf16", "int4")]  # fmt: skip
# Our decode kernels (model.decode_linear), where they were built: fp32, bf16 and int8 weights, and bf16
# weights in an fp32 model (residual stream, norms, attention and every accumulation in fp32, as llama.cpp).
NATIVE_VARIANTS = [("fp32", "native"), ("bf16", "native"), ("bf16", "int8-native"), ("fp32", "bf16-native")]
# Bytes per weight of each precision, for the batch-1 bound.
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}
# The layouts whose batch invariance is priced: each is timed again right after, without it.
INVARIANCE_PRICED = [("fp32", "plain"), ("fp32", "packed"), ("bf16", "packed")]
INVARIANCE_ROUNDS, INVARIANCE_TOKENS = 3, 64
SHARPEN = 8.0  # as tests/modelkit.py's sharpen
AGREEMENT_TOKENS = 32


def precision(dtype: str, weights: str) -> str:
    """The precision the weights are read in: the dtype, or the quantization."""
    weights = weights.removesuffix("-native")
    return weights if weights in WEIGHT_BYTES else dtype


def sharpened(model: GPT) -> GPT:
    """Weight matrices scaled by SHARPEN: logits far apart, so greedy tokens are decided by margins."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(SHARPEN)
    return model


def engine_model(model: GPT, dtype: str, weights: str) -> GPT:
    """A copy of `model` in `dtype` with its weights held as `weights` says."""
    copied = copy.deepcopy(model).to(DTYPES[dtype]).eval()
    if weights == "packed":
        return packing.pack(copied)
    if weights == "bf16-native":
        return use_native(copied, torch.bfloat16)
    if weights.endswith("native"):
        return use_native(quantize(copied, weights.removesuffix("native").removesuffix("-") or "none"))
    return quantize(copied, "none" if weights == "plain" else weights)


def engine_generate(model: GPT, batch_invariant: bool = True):
    def generate(prompt: list[int], batch: int, new_tokens: int) -> list[list[int]]:
        engine = Engine(model, max_batch_size=batch, max_seq_len=len(prompt) + new_tokens,
                        batch_invariant=batch_invariant)  # fmt: skip
        return engine.generate_tokens([prompt] * batch, SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                                                       stop_at_eot=False))  # fmt: skip

    return generate


def transformers_generate(hf: GPT2LMHeadModel):
    def generate(prompt: list[int], batch: int, new_tokens: int) -> list[list[int]]:
        idx = torch.tensor([prompt] * batch)
        kwargs = dict(do_sample=False, pad_token_id=50256, attention_mask=torch.ones_like(idx))
        with torch.no_grad():
            out = hf.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        return out[:, len(prompt) :].tolist()

    return generate


def timed(generate, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, list[int]]:
    """Tokens/s of one run after a short warm-up, and the first row's tokens."""
    generate(prompt, batch, 8)
    start = time.perf_counter()
    out = generate(prompt, batch, new_tokens)
    elapsed = time.perf_counter() - start
    assert len(out) == batch and all(len(row) == new_tokens for row in out), "every row decodes new_tokens tokens"
    return batch * new_tokens / elapsed, out[0]


def time_engine(model: GPT, prompt: list[int], batch: int, new_tokens: int) -> float:
    """The engine's greedy tokens/s (bench/gpu.py's decode section uses it on a GPU)."""
    return timed(engine_generate(model), prompt, batch, new_tokens)[0]


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many of the first AGREEMENT_TOKENS tokens match the reference before the first difference."""
    matched = 0
    for ours, theirs in zip(tokens[:AGREEMENT_TOKENS], reference[:AGREEMENT_TOKENS]):
        if ours != theirs:
            break
        matched += 1
    return matched


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


# Where a decode step's time goes: the profiler's ops, by what they do.
PROFILE_PARTS = {
    "linear layers (they read the weights)": {"mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm",
                                              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                                              "gpt_kernels::linear"},
    "attention and the KV-cache write": {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_index_put_impl_",
                                         "aten::index_put_"},
    "layer norms, GELU, residual adds": {"aten::native_layer_norm", "aten::gelu", "aten::add", "aten::embedding",
                                         "aten::index_select"},
    "sampling": {"aten::argmax", "aten::topk", "aten::cumsum", "aten::exp", "aten::searchsorted", "aten::sort",
                 "aten::gather", "aten::masked_fill", "aten::nonzero", "aten::index_put"},
}  # fmt: skip


def profile_step(model: GPT, prompt: list[int], batch: int, steps: int = 16) -> list[dict]:
    """Milliseconds per decode step by part, from torch.profiler over `steps` engine steps; what no
    op accounts for is Python and dispatch."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, max_batch_size=batch, max_seq_len=len(prompt) + 2 * steps + 8)
    params = SamplingParams(max_new_tokens=2 * steps + 4, temperature=0.0, stop_at_eot=False)
    for _ in range(batch):
        engine.add(prompt, params)
    for _ in range(steps // 2 + 1):  # the prefill and warm-up steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    parts = dict.fromkeys([*PROFILE_PARTS, "other ops"], 0.0)
    for event in prof.key_averages():
        part = next((name for name, ops in PROFILE_PARTS.items() if event.key in ops), "other ops")
        parts[part] += event.self_cpu_time_total / 1e6 / steps
    parts["Python and dispatch (no op running)"] = max(wall - sum(parts.values()), 0.0)
    return [{"part": name, "ms_per_step": seconds * 1e3, "share": seconds / wall} for name, seconds in parts.items()]


def measure(rows: list[dict], impl: str, dtype: str, weights: str, generate, prompt, batches, new_tokens, references):
    """Time `generate` at each batch size; `references` holds, per precision, the first tokens the
    engine decoded in it (the first row measured at a precision sets them), which each row is checked
    against: greedy tokens of random weights part between fp32 and bf16 within a few tokens, so
    each precision is compared with itself."""
    for batch in batches:
        rate, first = timed(generate, prompt, batch, new_tokens)
        reference = references.setdefault(precision(dtype, weights), first)
        rows.append({"impl": impl, "dtype": dtype, "weights": weights, "precision": precision(dtype, weights),
                     "batch": batch, "tokens_per_s": rate, "agrees": f"{agreement(first, reference)}/{AGREEMENT_TOKENS}",
                     "missing": None})  # fmt: skip
        print_table(f"{impl} {dtype} {weights} batch {batch}", rows[-1:])


def price_invariance(model: GPT, dtype: str, weights: str, prompt: list[int], batches: list[int]) -> list[dict]:
    """The engine with and without batch invariance (without: prompts prefilled padded together, one
    masked attention call, any row count), INVARIANCE_ROUNDS alternated rounds of INVARIANCE_TOKENS
    tokens at each batch size, medians: the difference is small next to a shared machine's noise."""
    priced = []
    for batch in batches:
        rates = {True: [], False: []}
        for _ in range(INVARIANCE_ROUNDS):
            for invariant in rates:
                generate = engine_generate(model, batch_invariant=invariant)
                rates[invariant].append(timed(generate, prompt, batch, INVARIANCE_TOKENS)[0])
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        priced.append({"dtype": dtype, "weights": weights, "batch": batch, "new_tokens": INVARIANCE_TOKENS,
                       "invariant_tokens_per_s": on, "not_invariant_tokens_per_s": off,
                       "invariant_vs_not": on / off})  # fmt: skip
        print_table(f"engine {dtype} {weights} batch {batch}: batch invariance priced", priced[-1:])
    return priced


PEER_RESULT = "peer result: "


def peer_rows(name: str, wanted: str, args: argparse.Namespace, references: dict) -> list[dict]:
    """One peer at one precision, run by this script in a process of its own (--peer): a peer that
    crashes (llama.cpp's AMX kernels die of an illegal instruction on some CPUs) is then a missing
    row with its signal, and llama.cpp is tried once more without its repacked weights."""
    weights = peers.PRECISIONS[name][wanted]
    note = ""
    for repack in (True, False) if name == "llama.cpp" else (True,):
        command = [sys.executable, "-m", "bench.bench_decode", "--preset", args.preset, "--new-tokens",
                   str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens), "--batches",
                   *map(str, args.batches), "--peer", name, wanted, "--reference", ",".join(map(str, references.get(wanted, [])))]
        command += [] if repack else ["--no-repack"]  # fmt: skip
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        result = next((json.loads(line[len(PEER_RESULT):]) for line in done.stdout.splitlines()
                       if line.startswith(PEER_RESULT)), None)  # fmt: skip
        if done.returncode == 0 and result is not None and "rows" in result:
            return [{**row, "weights": row["weights"] + note} for row in result["rows"]]
        if done.returncode >= 0:
            break
        note = f" (repacking off: with it, {signal.Signals(-done.returncode).name})"
    reason = (result or {}).get("missing") or f"exited with {done.returncode}{note}"
    if done.returncode < 0:
        reason = f"killed by {signal.Signals(-done.returncode).name}{note}"
    print(f"\n{name} {wanted}: missing: {reason}", flush=True)
    return [{"impl": name, "dtype": wanted, "weights": weights, "precision": wanted, "batch": batch,
             "tokens_per_s": None, "agrees": None, "missing": reason} for batch in args.batches]  # fmt: skip


def run_peer(args: argparse.Namespace, model: GPT, prompt: list[int]) -> None:
    """--peer NAME PRECISION: measure that peer alone and print its rows as one JSON line."""
    name, wanted = args.peer
    rows: list[dict] = []
    try:
        peer = peers.load(name, wanted, model, f"{args.preset}-seed0-sharpen{SHARPEN:g}", torch.get_num_threads(),
                          repack=args.repack)  # fmt: skip
        references = {wanted: [int(token) for token in args.reference.split(",") if token]}
        measure(rows, name, wanted, peers.PRECISIONS[name][wanted], peer.generate, prompt, args.batches,
                args.new_tokens, {k: v for k, v in references.items() if v})  # fmt: skip
        print(PEER_RESULT + json.dumps({"rows": rows}), flush=True)
    except peers.Missing as e:
        print(PEER_RESULT + json.dumps({"missing": str(e)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of every implementation")
    parser.add_argument("--engine-batches", type=int, nargs="+", default=[16], help="more batch sizes of the engine")
    parser.add_argument("--peers", nargs="*", default=list(peers.PRECISIONS), choices=list(peers.PRECISIONS))
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the quality table")
    parser.add_argument("--data", type=Path, help="text whose last tenth is the validation split")
    parser.add_argument("--peer", nargs=2, metavar=("NAME", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--no-repack", dest="repack", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    model = sharpened(GPT(GPTConfig.from_preset(args.preset))).eval()
    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    if args.peer:
        return run_peer(args, model, prompt)
    bandwidth = peers.read_bandwidth()
    bounds = {name: bandwidth / peers.bytes_per_token(model, size) for name, size in WEIGHT_BYTES.items()}
    print_table("Memory-read bandwidth and the batch-1 bound it sets",
                [{"bandwidth_GB_per_s": bandwidth / 1e9, **{f"{k}_tokens_per_s": v for k, v in bounds.items()}}])

    rows: list[dict] = []
    references: dict[str, list[int]] = {}  # the engine's first tokens per precision
    invariance: list[dict] = []
    native_variants = NATIVE_VARIANTS if native.available() else []
    for dtype, weights in ENGINE_VARIANTS + native_variants:
        variant = engine_model(model, dtype, weights)
        batches = args.batches + (args.engine_batches if weights in ("packed", "native") else [])
        measure(rows, "engine", dtype, weights, engine_generate(variant), prompt, batches, args.new_tokens, references)
        if (dtype, weights) in INVARIANCE_PRICED:
            invariance += price_invariance(variant, dtype, weights, prompt, args.batches)
        del variant
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        hf_fp32 = GPT2LMHeadModel.from_pretrained(directory).eval()
    for name, dtype in DTYPES.items():
        hf = copy.deepcopy(hf_fp32).to(dtype)
        measure(rows, "transformers", name, "plain", transformers_generate(hf), prompt, args.batches,
                args.new_tokens, references)  # fmt: skip
    for name in args.peers:
        for wanted in ("fp32", "bf16", "int8"):
            if wanted in peers.PRECISIONS[name]:
                rows += peer_rows(name, wanted, args, references)

    profiles = {}
    for dtype, weights in [("bf16", "packed"), ("fp32", "packed")] + native_variants:
        variant = engine_model(model, dtype, weights)
        for batch in args.batches:
            name = f"engine {dtype} {weights}, batch {batch}"
            profiles[name] = profile_step(variant, prompt, batch)
            print_table(f"Where a decode step's time goes: {name}", profiles[name])
        del variant

    transformers_single = [r["tokens_per_s"] for r in rows if r["impl"] == "transformers" and r["batch"] == 1]
    reference_rate = max(transformers_single)
    single = {(r["impl"], r["dtype"], r["weights"]): r["tokens_per_s"] for r in rows if r["batch"] == 1}
    for row in rows:
        rate, own = row["tokens_per_s"], single.get((row["impl"], row["dtype"], row["weights"]))
        row["vs_transformers_batch1"] = rate / reference_rate if rate else None
        row["vs_own_batch1"] = rate / own if rate and own else None
        row["of_bound"] = rate / bounds[row["precision"]] if rate and row["batch"] == 1 else None
    print_table(f"Greedy decode, {args.preset} shape, {len(prompt)}-token prompt, {args.new_tokens} new tokens, "
                f"{threads} threads", rows)  # fmt: skip

    result = {"preset": args.preset, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt), "threads": threads,
              "sharpen": SHARPEN, "bandwidth_bytes_per_s": bandwidth, "batch1_bound_tokens_per_s": bounds,
              "transformers_batch1_tokens_per_s": reference_rate, "rows": rows, "invariance": invariance,
              "profiles": profiles}  # fmt: skip
    if args.checkpoint and args.data:
        result["quality"] = quality(args.checkpoint, args.data)
        print_table(f"Validation loss by engine precision ({args.checkpoint})", result["quality"])
    write_result("decode", result)


if __name__ == "__main__":
    main()
