"""The engines a user would pick instead of ours, on the same weights: llama.cpp, CTranslate2, onnxruntime.

Each peer gets the model the engine decodes, written by `GPT.save_pretrained` (with GPT-2's
tokenizer files, built offline from tiktoken's ranks) and converted with the peer's own tools:
llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python source distribution (f32, bf16, q8_0),
CTranslate2's converter (float32, int8), and torch.onnx.export with past keys and values for
onnxruntime (fp32, and int8 by onnxruntime's dynamic quantization). Conversions are cached under
.cache/bench/ by what they depend on, so `make bench` pays for them once.

The peers live in the benchmark environment (`make bench-env`, bench/peers-requirements.txt), never
in the product's. A peer that is not installed, fails to build or to convert raises `Missing` with
the reason, which the benchmark reports in its table instead of leaving the peer out.
"""

from __future__ import annotations

import base64
import importlib
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import GPT, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
INSTALL_STATUS = CACHE / "peers-install.json"
REQUIREMENTS = Path(__file__).resolve().parent / "peers-requirements.txt"
# Each peer's precisions, by the names the benchmark's table uses, mapped to the peer's own.
PRECISIONS = {
    "llama.cpp": {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"},
    "CTranslate2": {"fp32": "float32", "int8": "int8"},
    "onnxruntime": {"fp32": "fp32", "int8": "int8"},
}
PACKAGES = {"llama.cpp": "llama-cpp-python", "CTranslate2": "ctranslate2", "onnxruntime": "onnxruntime"}
MODULES = {"llama.cpp": "llama_cpp", "CTranslate2": "ctranslate2", "onnxruntime": "onnxruntime"}


class Missing(Exception):
    """A peer that cannot run here, and why."""


@dataclass
class Peer:
    """A loaded peer: `generate(prompt, batch, new_tokens)` returns each row's greedy tokens."""

    name: str
    precision: str
    generate: Callable[[list[int], int, int], list[list[int]]]


def require(name: str):
    """The peer's Python module, or Missing naming why it is not there."""
    try:
        return importlib.import_module(MODULES[name])
    except ImportError as e:
        status = json.loads(INSTALL_STATUS.read_text()) if INSTALL_STATUS.exists() else {}
        failed = status.get(PACKAGES[name], {})
        if failed and not failed.get("installed"):
            raise Missing(failed["reason"]) from e
        raise Missing(f"{PACKAGES[name]} is not installed ({e}); run `make bench-env`") from e


def hf_folder(model: GPT, key: str) -> Path:
    """`model` as a save_pretrained folder with GPT-2's tokenizer files, cached under `key`."""
    directory = CACHE / key / "hf"
    if not (directory / "tokenizer.json").exists():
        model.save_pretrained(directory)
        # convert_hf_to_gguf.py reads n_ctx, which the hub's GPT-2 configs carry and transformers 5 no longer writes.
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({"n_ctx": config["n_positions"], **config}, indent=2))
        write_tokenizer(directory)
    return directory


def write_tokenizer(directory: Path) -> None:
    """GPT-2's tokenizer as transformers saves it, from tiktoken's ranks (no download, no blobfile)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = Tokenizer()._encoding
    ranks = directory / "r50k_base.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                             for token, rank in encoding._mergeable_ranks.items()))  # fmt: skip
    converted = TikTokenConverter(
        vocab_file=str(ranks), pattern=encoding._pat_str, extra_special_tokens=["<|endoftext|>"]
    ).converted()
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=eot, eos_token=eot, unk_token=eot).save_pretrained(
        directory
    )
    ranks.unlink()


def load(name: str, precision: str, model: GPT, key: str, threads: int, repack: bool = True) -> Peer:
    """Peer `name` at `precision` (fp32, bf16, int8) over `model`'s weights, converting once.

    repack=False turns off llama.cpp's weight repacking into extra buffer types (its AMX kernels
    among them), for CPUs where those die of an illegal instruction."""
    if precision not in PRECISIONS[name]:
        raise Missing(f"{name} has no {precision} here")
    if name == "llama.cpp":
        return Peer(name, precision, _llama_cpp(PRECISIONS[name][precision], model, key, threads, repack))
    loader = {"CTranslate2": _ctranslate2, "onnxruntime": _onnxruntime}[name]
    return Peer(name, precision, loader(PRECISIONS[name][precision], model, key, threads))


def _converted(path: Path, convert: Callable[[Path], None], what: str) -> Path:
    """`path`, made by `convert(path)` unless an earlier run left it; Missing if that fails."""
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        try:
            convert(partial)
        except Exception as e:  # a converter's failure is a result to report, whatever it raised
            raise Missing(f"{what} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        partial.rename(path)
    return path


# llama.cpp ------------------------------------------------------------------------------------


def _llama_converter() -> Path:
    """convert_hf_to_gguf.py (with its gguf-py) out of the pinned llama-cpp-python sdist."""
    target = CACHE / "llama.cpp-converter"
    script = next(target.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)
    if script and (script.parent / "conversion").is_dir():
        return script
    pin = next(line for line in REQUIREMENTS.read_text().splitlines() if line.startswith("llama-cpp-python"))
    download = CACHE / "sdist"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                              str(download), pin], capture_output=True, text=True)  # fmt: skip
    if fetched.returncode:
        raise Missing(f"could not fetch the {pin} sdist for its converter: {fetched.stderr.strip()[-300:]}")
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        parts = ("/vendor/llama.cpp/convert_hf_to_gguf", "/vendor/llama.cpp/gguf-py/", "/vendor/llama.cpp/conversion/")
        members = [m for m in tar.getmembers() if any(part in m.name for part in parts)]
        tar.extractall(target, members=members, filter="data")
    return next(target.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def _llama_cpp(outtype: str, model: GPT, key: str, threads: int, repack: bool):
    llama_cpp = require("llama.cpp")
    llama_cpp._logger.set_verbose(False)

    def convert(path: Path) -> None:
        script = _llama_converter()
        done = subprocess.run([sys.executable, str(script), str(hf_folder(model, key)), "--outtype", outtype,
                               "--outfile", str(path)], capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            raise RuntimeError(done.stderr.strip()[-400:])

    gguf = _converted(CACHE / key / f"model-{outtype}.gguf", convert, f"convert_hf_to_gguf.py --outtype {outtype}")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = repack
    handle = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    if not handle:
        raise Missing(f"llama.cpp could not load {gguf.name}")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(handle))

    contexts = {}  # by batch size, made once (outside the timed runs) and cleared before each run

    def context(batch: int, prompt_tokens: int):
        if batch not in contexts:
            ctx_params = llama_cpp.llama_context_default_params()
            ctx_params.n_ctx = batch * model.config.block_size
            ctx_params.n_batch = ctx_params.n_ubatch = max(batch * prompt_tokens, 32)
            ctx_params.n_seq_max = batch
            ctx_params.n_threads = ctx_params.n_threads_batch = threads
            contexts[batch] = llama_cpp.llama_init_from_model(handle, ctx_params)
        ctx = contexts[batch]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        return ctx

    def generate(prompt: list[int], batch: int, new_tokens: int) -> list[list[int]]:
        ctx = context(batch, len(prompt))
        work = llama_cpp.llama_batch_init(batch * len(prompt), 0, batch)
        try:
            out = [[] for _ in range(batch)]
            # The prompts in one batch (logits at each one's last token), then one token per row a step.
            entries = [(seq, pos, tok, pos == len(prompt) - 1) for seq in range(batch) for pos, tok in enumerate(prompt)]
            for step in range(new_tokens):
                work.n_tokens = len(entries)
                for i, (seq, pos, tok, logits) in enumerate(entries):
                    work.token[i], work.pos[i], work.n_seq_id[i] = tok, pos, 1
                    work.seq_id[i][0], work.logits[i] = seq, logits
                if llama_cpp.llama_decode(ctx, work):
                    raise RuntimeError("llama_decode failed")
                last = [i for i, entry in enumerate(entries) if entry[3]]
                for seq, i in enumerate(last):
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))
                    out[seq].append(int(row.argmax()))
                position = len(prompt) + step
                entries = [(seq, position, out[seq][-1], True) for seq in range(batch)]
            return out
        finally:
            llama_cpp.llama_batch_free(work)

    return generate


# CTranslate2 ----------------------------------------------------------------------------------


def _ctranslate2(quantization: str, model: GPT, key: str, threads: int):
    ctranslate2 = require("CTranslate2")

    def convert(path: Path) -> None:
        ctranslate2.converters.TransformersConverter(str(hf_folder(model, key))).convert(str(path), quantization=quantization)

    directory = _converted(CACHE / key / f"ctranslate2-{quantization}", convert, f"CTranslate2's converter ({quantization})")
    generator = ctranslate2.Generator(str(directory), device="cpu", compute_type=quantization, inter_threads=1,
                                      intra_threads=threads)  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder(model, key))

    def generate(prompt: list[int], batch: int, new_tokens: int) -> list[list[int]]:
        tokens = tokenizer.convert_ids_to_tokens(prompt)
        results = generator.generate_batch([tokens] * batch, max_length=new_tokens, min_length=new_tokens, beam_size=1,
                                           sampling_topk=1, include_prompt_in_result=False)  # fmt: skip
        return [r.sequences_ids[0] for r in results]

    return generate


# onnxruntime ----------------------------------------------------------------------------------


class PastDecoder(torch.nn.Module):
    """The network with its past keys and values as inputs and outputs, the form onnxruntime runs:
    (tokens (B, T) at positions P..P+T-1, past keys and values (L, B, H, P, D) or none) -> (last
    logits, keys and values to P + T)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, positions, past_k=None, past_v=None):
        gpt = self.model
        x = gpt.transformer.wte(idx) + gpt.transformer.wpe(positions)
        keys, values = [], []
        for layer, block in enumerate(gpt.transformer.h):
            q, k, v = block.attn._heads(block.ln_1(x))
            if past_k is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # one new token: it attends to every position
                k, v = torch.cat([past_k[layer], k], dim=2), torch.cat([past_v[layer], v], dim=2)
                y = F.scaled_dot_product_attention(q, k, v)
            keys.append(k)
            values.append(v)
            x = x + block.attn._merge(y)
            x = x + block.mlp(block.ln_2(x))
        return gpt._logits(x[:, -1]), torch.stack(keys), torch.stack(values)


def _onnx_graphs(model: GPT, directory: Path) -> None:
    """prefill.onnx (a prompt, no past) and decode.onnx (one token over the past) in `directory`.

    Two graphs, as optimum exports them: torch.export fixes dimensions it sees at size 0 or 1, so
    one graph cannot serve both an empty past and single tokens; example sizes are 2 and up.
    """
    config = model.config
    decoder = PastDecoder(model).eval()
    batch, tokens, cached = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("past")
    directory.mkdir(parents=True)
    torch.onnx.export(decoder, (torch.zeros(2, 4, dtype=torch.long), torch.arange(4)), str(directory / "prefill.onnx"),
                      input_names=["idx", "positions"], output_names=["logits", "keys", "values"],
                      dynamic_shapes={"idx": {0: batch, 1: tokens}, "positions": {0: tokens}},
                      dynamo=True, external_data=False)  # fmt: skip
    # Two tensors, not one twice: the exporter would take the second for the first.
    past_k, past_v = (torch.zeros(config.n_layer, 2, config.n_head, 3, config.head_dim) for _ in range(2))
    torch.onnx.export(decoder, (torch.zeros(2, 1, dtype=torch.long), torch.arange(3, 4), past_k, past_v),
                      str(directory / "decode.onnx"), input_names=["idx", "positions", "past_k", "past_v"],
                      output_names=["logits", "keys", "values"],
                      dynamic_shapes={"idx": {0: batch}, "positions": None, "past_k": {1: batch, 3: cached},
                                      "past_v": {1: batch, 3: cached}},
                      dynamo=True, external_data=False)  # fmt: skip


def _onnxruntime(precision: str, model: GPT, key: str, threads: int):
    ort = require("onnxruntime")
    fp32 = _converted(CACHE / key / "onnx-fp32", lambda out: _onnx_graphs(model, out),
                      "torch.onnx.export with past keys and values")  # fmt: skip
    graphs = fp32
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        def quantize(out: Path) -> None:
            out.mkdir(parents=True)
            for graph in ("prefill.onnx", "decode.onnx"):
                quantize_dynamic(str(fp32 / graph), str(out / graph), weight_type=QuantType.QInt8)

        graphs = _converted(CACHE / key / "onnx-int8", quantize, "onnxruntime's dynamic int8 quantization")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    prefill, decode = (ort.InferenceSession(str(graphs / g), options, providers=["CPUExecutionProvider"])
                       for g in ("prefill.onnx", "decode.onnx"))  # fmt: skip

    def generate(prompt: list[int], batch: int, new_tokens: int) -> list[list[int]]:
        idx = np.array([prompt] * batch, dtype=np.int64)
        logits, past_k, past_v = prefill.run(None, {"idx": idx, "positions": np.arange(len(prompt))})
        out = [logits.argmax(-1)]
        for position in range(len(prompt), len(prompt) + new_tokens - 1):
            feed = {"idx": out[-1][:, None], "positions": np.array([position]), "past_k": past_k, "past_v": past_v}
            logits, past_k, past_v = decode.run(None, feed)
            out.append(logits.argmax(-1))
        return np.stack(out, axis=1).tolist()

    return generate


# The machine --------------------------------------------------------------------------------


def read_bandwidth(gib: float = 1.0, rounds: int = 5) -> float:
    """Bytes/s the CPU reads from memory: the best of `rounds` sums over a buffer far larger than
    any cache (this machine reports a 300 MiB L3), with the torch threads the benchmark uses."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    buffer.sum()  # every page touched once before timing
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def bytes_per_token(model: GPT, bytes_per_weight: float) -> float:
    """What one batch-1 decode step reads at least: every weight matrix once (the LM head's included)."""
    config = model.config
    per_block = 12 * config.n_embd**2
    return (config.n_layer * per_block + config.padded_vocab_size * config.n_embd) * bytes_per_weight
