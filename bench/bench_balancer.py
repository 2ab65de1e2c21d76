"""What the load balancer costs: one streaming client through HAProxy (Debian's, with the compose file's
deploy/haproxy/haproxy.cfg) against the same replica directly, in alternated rounds, medians compared.

    python -m bench.bench_balancer [--preset gpt2] [--input-len 32] [--output-len 128] [--rounds 4]
                                   [--requests 3] [--threads N]

Both sides stream /v1/completions from one service (random weights, fp32, the service's defaults
otherwise), one request at a time: each request's tokens/s (from sending it to its last token) and time
to first token. Each round measures both sides, in turns that swap every round, so a shared machine's
noise hits both alike. Goals (issue 24.7): through the balancer at least 0.97x the tokens/s, and at most
2 ms more time to first token at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import print_table, write_result
from bench.loadgen import run_level, running_balancer, running_service
from model import GPT, GPTConfig, save_checkpoint
from service.settings import ServiceSettings


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    sides: dict[str, dict[str, list[float]]] = {"direct": {"tok": [], "ttft": []}, "balancer": {"tok": [], "ttft": []}}
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        save_checkpoint(folder / "best_model.pt", model, step=0, val_loss=None)
        flags = ["--device", "cpu", "--dtype", "fp32", "--threads", str(args.threads)]
        with running_service(folder, flags) as direct, running_balancer([direct], folder) as balancer:
            urls = {"direct": direct, "balancer": balancer}

            def run(url: str, requests: int):
                return asyncio.run(run_level(url, 1, requests, args.input_len, args.output_len))[1]

            for url in urls.values():  # first requests pay lazy initialisation
                run(url, 2)
            for round_ in range(args.rounds):
                order = ("direct", "balancer") if round_ % 2 == 0 else ("balancer", "direct")
                for side in order:
                    for result in run(urls[side], args.requests):
                        sides[side]["tok"].append(result.tokens_per_s)
                        sides[side]["ttft"].append(result.ttft * 1000)
    medians = {side: {k: statistics.median(v) for k, v in values.items()} for side, values in sides.items()}
    return {
        "direct_tok_per_s": medians["direct"]["tok"],
        "balancer_tok_per_s": medians["balancer"]["tok"],
        "balancer_vs_direct": medians["balancer"]["tok"] / medians["direct"]["tok"],
        "direct_ttft_p50_ms": medians["direct"]["ttft"],
        "balancer_ttft_p50_ms": medians["balancer"]["ttft"],
        "ttft_p50_added_ms": medians["balancer"]["ttft"] - medians["direct"]["ttft"],
        "requests_per_side": len(sides["direct"]["tok"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3, help="requests per side and round")
    parser.add_argument("--threads", type=int, default=ServiceSettings().worker_threads(1), help="the service's")
    args = parser.parse_args()
    result = bench(args)
    print_table(f"{args.preset}: one client through the load balancer against the replica directly", [result])
    keys = ("preset", "input_len", "output_len", "rounds", "requests", "threads")
    write_result("balancer", {**{k: getattr(args, k) for k in keys}, "load_average": os.getloadavg(), **result})


if __name__ == "__main__":
    main()
