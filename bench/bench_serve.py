"""What the HTTP service costs and what batching buys, measured side by side in one run.

    python -m bench.bench_serve [--presets mini gpt2] [--input-len 32] [--output-len 128]
                                [--omp-wait-policy passive|default] [--stream-interval SECONDS]
                                [--threads N] [--no-pack-weights]

For each preset (random weights, fp32, CPU), with the same prompt, sampling and length, and the
same weights (packed as the service packs them, unless --no-pack-weights) and OpenMP wait policy on
both sides (the service's default, passive, unless told otherwise):
  1. overhead: one client's decode rate (tokens over the time from request to last token) through
     HTTP streaming against the engine called directly in this process, alternated three times,
     medians compared;
  2. batching: aggregate output tokens/s of 16 concurrent streaming clients against one client's,
     in the same alternated rounds;
  3. what batch invariance costs: one client and 16 clients against a second service started with
     --no-batch-invariant, in the same alternated rounds;
  4. the load generator's concurrency sweep (1, 4, 16, 32), as `vllm bench serve` reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_table, write_result
from bench.loadgen import PROMPT_TOKEN, run_level, running_service
from model import GPT, Engine, GPTConfig, SamplingParams, Tokenizer, packing, save_checkpoint
from service.settings import ServiceSettings

SWEEP = (1, 4, 16, 32)
ROUNDS = 3


def engine_decode_rate(model: GPT, prompt: list[int], output_len: int, seed: int) -> float:
    """Tokens/s of one request from its arrival to its last token, the engine driven directly."""
    engine = Engine(model, Tokenizer(), max_batch_size=1)
    params = SamplingParams(max_new_tokens=output_len, temperature=1.0, top_k=50, seed=seed, stop_at_eot=False)
    start = time.perf_counter()
    engine.add(prompt, params)
    tokens = 0
    while engine.has_work():
        tokens += len(engine.step())
    return tokens / (time.perf_counter() - start)


def bench_preset(preset: str, args: argparse.Namespace) -> dict:
    input_len, output_len = args.input_len, args.output_len
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset)).eval()
    prompt = Tokenizer().encode(PROMPT_TOKEN * input_len)
    assert len(prompt) == input_len
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(Path(directory) / "best_model.pt", model, step=0, val_loss=None)
        flags = [
            "--device", "cpu", "--dtype", "fp32", "--max-batch-size", str(max(SWEEP)),
            "--omp-wait-policy", args.omp_wait_policy, "--stream-interval", str(args.stream_interval),
            "--threads", str(args.threads), "--pack-weights" if args.pack_weights else "--no-pack-weights",
            # Plain decoding on every side, as in the engine called directly: bench_speculative prices drafts.
            "--no-speculation",
        ]  # fmt: skip
        if args.pack_weights:
            model = packing.pack(copy.deepcopy(model))
        # A second service without batch invariance prices it; idle, its workers sleep (passive wait).
        with (
            running_service(Path(directory), flags) as url,
            running_service(Path(directory), [*flags, "--no-batch-invariant"]) as plain_url,
        ):

            def run(concurrency: int, requests: int, at: str = url):
                return asyncio.run(run_level(at, concurrency, requests, input_len, output_len))

            for warm in (url, plain_url):  # first requests pay lazy initialisation in every process
                run(1, 2, warm)
            engine_decode_rate(model, prompt, 16, seed=0)
            # Alternated rounds, medians: a shared machine's noise then hits both sides of each ratio alike.
            direct, http, single, sixteen, plain_single, plain_sixteen = [], [], [], [], [], []
            for round_ in range(ROUNDS):
                direct.append(engine_decode_rate(model, prompt, output_len, seed=round_))
                one_client, results = run(1, 2)
                http.append(statistics.median(r.tokens_per_s for r in results))
                single.append(one_client["output_tok_per_s"])
                sixteen.append(run(16, 16)[0]["output_tok_per_s"])
                plain_single.append(run(1, 2, plain_url)[0]["output_tok_per_s"])
                plain_sixteen.append(run(16, 16, plain_url)[0]["output_tok_per_s"])
            sweep = [run(c, max(args.sweep_requests, c))[0] for c in SWEEP]
    overhead = {
        "engine_tok_per_s": statistics.median(direct),
        "http_tok_per_s": statistics.median(http),
    }
    overhead["http_vs_engine"] = overhead["http_tok_per_s"] / overhead["engine_tok_per_s"]
    batching = {
        "one_client_tok_per_s": statistics.median(single),
        "sixteen_clients_tok_per_s": statistics.median(sixteen),
    }
    batching["ratio"] = batching["sixteen_clients_tok_per_s"] / batching["one_client_tok_per_s"]
    invariance = []
    for clients, on, off in ((1, single, plain_single), (16, sixteen, plain_sixteen)):
        on, off = statistics.median(on), statistics.median(off)
        invariance.append({"clients": clients, "invariant_tok_per_s": on, "not_invariant_tok_per_s": off,
                           "invariant_vs_not": on / off})  # fmt: skip
    return {"overhead": overhead, "batching": batching, "invariance": invariance, "sweep": sweep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mini", "gpt2"])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--sweep-requests", type=int, default=32, help="requests per sweep level (at least c)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "default"], default="passive")
    service_defaults = ServiceSettings()
    parser.add_argument(
        "--stream-interval", type=float, default=service_defaults.stream_interval, help="the service's setting"
    )
    parser.add_argument(
        "--threads", type=int, default=service_defaults.worker_threads(1), help="torch threads on both sides"
    )
    parser.add_argument(
        "--pack-weights", action=argparse.BooleanOptionalAction, default=service_defaults.pack_weights,
        help="the service's setting, applied to the directly driven engine too",
    )
    args = parser.parse_args()
    wanted = "PASSIVE" if args.omp_wait_policy == "passive" else None
    if os.environ.get("OMP_WAIT_POLICY") != wanted:
        # OpenMP reads the policy once, when torch loads: start again with the service workers' one.
        environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        if wanted:
            environment["OMP_WAIT_POLICY"] = wanted
        os.execve(sys.executable, [sys.executable, "-m", "bench.bench_serve", *sys.argv[1:]], environment)
    torch.set_num_threads(args.threads)
    results = {}
    for preset in args.presets:
        print(f"\n== {preset} (pid {os.getpid()}) ==", flush=True)
        results[preset] = bench_preset(preset, args)
        print_table(f"{preset}: one client's decode rate, HTTP against the engine", [results[preset]["overhead"]])
        print_table(f"{preset}: 16 streaming clients against one", [results[preset]["batching"]])
        print_table(f"{preset}: batch invariance priced (against --no-batch-invariant)", results[preset]["invariance"])
        print_table(
            f"{preset}: concurrency sweep, {args.input_len} prompt / {args.output_len} output tokens",
            results[preset]["sweep"],
        )
    keys = ("input_len", "output_len", "omp_wait_policy", "stream_interval", "threads", "pack_weights")
    settings = {key: getattr(args, key) for key in keys}
    write_result(
        f"serve_{'_'.join(args.presets)}_{args.omp_wait_policy}",
        {**settings, "load_average": os.getloadavg(), "presets": results},
    )


if __name__ == "__main__":
    main()
