"""Our decode kernels against torch's, one matrix product at a time, over gpt2's 49 weight matrices.

    python -m bench.bench_kernels [--rows 1 8] [--rounds 5] [--precisions fp32 bf16 int8]

Per precision and row count, each implementation multiplies `rows` rows by every weight matrix of
the gpt2 shape once (one decode step's products): our kernels on each path the CPU has, F.linear on
plain weights, oneDNN's packed weights (model.packing) and, for int8, Int8Linear (torch._int_mm). On a
shared 2-core machine, OMP_NUM_THREADS=1 keeps a neighbour's load from stalling every parallel region.
Rounds alternate the implementations, so a busy neighbour slows all of them alike; each row is the
median of the rounds.

The bound: the extension's STREAM-style read (gpt_kernels::stream_read, the same threads) over a
buffer as large as that precision's weights, alternated in the same rounds; its fastest round is the
bound. No product reads its weights faster than that read, so a row above 100% of the bound is a
measurement error and the benchmark fails on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

from bench.common import print_table, write_result
from model import native, packing
from model.decode_linear import DecodeLinear
from model.quantize import Int8Linear

# gpt2: per layer attention in and out, MLP in and out; the LM head once.
LAYER_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
LAYERS, HEAD = 12, (768, 50257)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def matrices() -> list[nn.Linear]:
    torch.manual_seed(0)
    shapes = LAYER_SHAPES * LAYERS + [HEAD]
    return [nn.Linear(i, o, bias=(i, o) != HEAD).requires_grad_(False) for i, o in shapes]


def implementations(linears: list[nn.Linear], precision: str) -> dict[str, list[tuple]]:
    """Name -> (kernel path or None, layer, input width) for each of one decode step's products."""
    dtype = DTYPES[precision]
    layers = [lin.to(dtype) for lin in linears]
    widths = [lin.in_features for lin in linears]
    if precision == "int8":
        torch_impls = {"Int8Linear (torch._int_mm)": [Int8Linear(lin, dtype) for lin in layers]}
    else:
        torch_impls = {"F.linear": layers, "oneDNN packed": [packing.PackedLinear(lin) for lin in layers]}
    impls = {name: [(None, layer, w) for layer, w in zip(layers_, widths)] for name, layers_ in torch_impls.items()}
    shared = [DecodeLinear(layer) for layer in next(iter(torch_impls.values()))]  # one copy, run on every path
    for path in native.supported_paths():
        if path != "scalar":  # the portable fallback, for correctness on any CPU, not a contender
            impls[f"ours {path}"] = [(path, layer, w) for layer, w in zip(shared, widths)]
    return impls


def step_seconds(products: list[tuple], x: dict[int, torch.Tensor]) -> float:
    native.use_path(products[0][0])
    start = time.perf_counter()
    for _, layer, width in products:
        layer(x[width])
    return time.perf_counter() - start


def run(precisions: list[str], row_counts: list[int], rounds: int) -> list[dict]:
    rows_out = []
    for precision in precisions:
        linears = matrices()
        impls = implementations(linears, precision)
        weight_bytes = sum(lin.weight.numel() for lin in linears) * WEIGHT_BYTES[precision]
        buffer = torch.ones(weight_bytes // 4)
        for count in row_counts:
            x = {i: torch.randn(count, i).to(DTYPES[precision]) for i in (768, 3072)}
            times: dict[str, list[float]] = {name: [] for name in [*impls, "stream read"]}
            with torch.inference_mode():
                for round_ in range(rounds + 1):
                    for name, layers in impls.items():
                        seconds = step_seconds(layers, x)
                        if round_:  # the first round warms up
                            times[name].append(seconds)
                    start = time.perf_counter()
                    torch.ops.gpt_kernels.stream_read(buffer, native.PATHS.index(native.supported_paths()[-1]))
                    if round_:
                        times["stream read"].append(time.perf_counter() - start)
            native.use_path(None)
            bound = min(times["stream read"])  # the best read: a busy neighbour never makes it faster
            reference = statistics.median(times["F.linear" if "F.linear" in times else "Int8Linear (torch._int_mm)"])
            for name, seconds in times.items():
                ms = statistics.median(seconds)
                rows_out.append({"precision": precision, "rows": count, "impl": name, "ms_per_step": ms * 1e3,
                                 "GB_per_s": weight_bytes / ms / 1e9, "of_bound": bound / ms,
                                 "vs_torch": reference / ms})  # fmt: skip
            print_table(f"{precision}, {count} row(s): {weight_bytes / 1e6:.0f} MB of weights",
                        [r for r in rows_out if r["precision"] == precision and r["rows"] == count])  # fmt: skip
        del impls, linears, buffer
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="row counts (decode batch sizes)")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds; each row is their median")
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args(argv)
    if not native.available():
        sys.exit(f"the decode kernels are not built: {native.status()}")
    rows = run(args.precisions, args.rows, args.rounds)
    write_result("kernels", {"threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows})
    over = [r for r in rows if r["of_bound"] > 1.0 and r["impl"] != "stream read"]
    for r in over:
        print(f"measurement error: {r['impl']} ({r['precision']}, {r['rows']} rows) read faster than the "
              f"stream read ({r['of_bound']:.0%} of the bound)", file=sys.stderr)  # fmt: skip
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
