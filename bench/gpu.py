"""The GPU benchmarks that bench/gpu.sh runs on a lent GPU (and, with tiny shapes, on the CPU in its dry run).

    python -m bench.gpu train   --data FILE [--preset gpt2] [--seq-len 1024] [--batch-size 32] [--dtype bf16]
                                [--compile] [--target-loss 0.1] [--time-limit 180] [--lr 6e-4] ...
    python -m bench.gpu decode  [--preset gpt2] [--batches 1 32] [--new-tokens 128]
    python -m bench.gpu serve   [--preset gpt2] [--dtype bf16] [--concurrency 1 4 16 32] [--requests 16]
    python -m bench.gpu summary
    (each takes --device and --results-dir)

train: the seed course's target, a model trained from scratch until one step's training loss is
below --target-loss, timed by the wall clock from the first step (which compiles) to that step;
the same run's steady-state tokens/s and MFU after its first --skip-steps steps, with the fused
AdamW the trainer always uses on a GPU and the attention kernel SDPA picks for this shape recorded.
decode: the engine's greedy decode rate at each batch size, fp32 and bf16 (bench/bench_decode.py's
timing). serve: the load generator's concurrency sweep against the service on this device.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import GPU_RESULTS, print_table, write_result

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CURVE_POINTS = 200  # enough to draw the loss curve; the JSON stays small


def race(
    step: Callable[[], float], target_loss: float, time_limit: float, clock: Callable[[], float] = time.perf_counter
) -> list[tuple[float, float]]:
    """Call `step` (one training step, returning its loss) until a loss is below `target_loss` or
    `time_limit` seconds have passed; return (seconds since the start, loss) after every step."""
    start = clock()
    curve = []
    while True:
        loss = step()
        elapsed = clock() - start
        curve.append((elapsed, loss))
        if loss < target_loss or elapsed >= time_limit:
            return curve


def race_summary(curve: list[tuple[float, float]], target_loss: float, tokens_per_step: int, skip_steps: int) -> dict:
    """Time to the target, and tokens/s over the steps after the first `skip_steps` (compilation and
    warm-up stay out of the rate; with too few steps, the second half of the run is used)."""
    times = [t for t, _ in curve]
    skip = min(skip_steps, len(curve) // 2)
    measured = times[-1] - (times[skip - 1] if skip else 0.0)
    reached = curve[-1][1] < target_loss
    stride = -(-len(curve) // CURVE_POINTS)  # ceiling: at most CURVE_POINTS points, and the last
    points = curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else [])
    return {
        "target_loss": target_loss,
        "reached": reached,
        "seconds_to_target": times[-1] if reached else None,
        "seconds_to_target_after_first_step": times[-1] - times[0] if reached else None,
        "first_step_seconds": times[0],
        "steps": len(curve),
        "tokens": len(curve) * tokens_per_step,
        "final_loss": curve[-1][1],
        "lowest_loss": min(loss for _, loss in curve),
        "elapsed_s": times[-1],
        "tokens_per_s": (len(curve) - skip) * tokens_per_step / measured if measured > 0 else None,
        "measured_steps": len(curve) - skip,
        "curve": [{"elapsed": t, "loss": loss} for t, loss in points],
    }


def attention_kernel(n_head: int, head_dim: int, batch: int, seq_len: int, device, dtype) -> str:
    """The kernel F.scaled_dot_product_attention dispatches to for the model's causal attention."""
    q = torch.randn(batch, n_head, seq_len, head_dim, device=device, dtype=dtype)
    backends = {int(value): name for name, value in torch.nn.attention.SDPBackend.__members__.items()}
    return backends.get(torch._fused_sdp_choice(q, q, q, is_causal=True), "unknown")


def bench_train(args: argparse.Namespace) -> None:
    # Imported here so `decode`, `serve` and `summary` need none of the trainer's packages.
    from bench.bench_train import settings
    from trainer import distributed
    from trainer.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        s = settings(
            args.data, Path(tmp) / "run", device=args.device, preset=args.preset, seq_len=args.seq_len,
            batch_size=args.batch_size, dtype=args.dtype, compile=args.compile, lr=args.lr, min_lr=args.min_lr,
            warmup_steps=args.warmup_steps, steps=args.decay_steps, seed=args.seed,
        )  # fmt: skip
        trainer = Trainer(s, distributed.setup(args.device))
        config = trainer.model.config
        kernel = attention_kernel(
            config.n_head,
            config.n_embd // config.n_head,
            args.batch_size,
            args.seq_len,
            trainer.ctx.device,
            trainer.dtype,
        )
        fused = all(group.get("fused") for group in trainer.optimizer.param_groups)
        print(
            f"training {args.preset} from scratch on {trainer.ctx.device} in {args.dtype}"
            f"{' compiled' if args.compile else ''}, batch {args.batch_size} × {args.seq_len}, "
            f"attention {kernel}, fused AdamW {fused}: until loss < {args.target_loss} "
            f"or {args.time_limit:g} s",
            flush=True,
        )
        log_every = max(1, args.log_every)

        def step() -> float:
            loss, _ = trainer.train_step()
            if trainer.progress.step % log_every == 0 or trainer.progress.step == 1:
                print(
                    f"  step {trainer.progress.step:5d}  loss {loss:.4f}  {time.perf_counter() - t0:7.1f} s", flush=True
                )
            return loss

        t0 = time.perf_counter()
        curve = race(step, args.target_loss, args.time_limit)
    result = race_summary(curve, args.target_loss, trainer.tokens_per_step, args.skip_steps)
    tps = result["tokens_per_s"]
    result["mfu"] = trainer.flops_per_token * tps / trainer.peak if tps and trainer.peak else None
    result["peak_flops"] = trainer.peak
    result["flops_per_token"] = trainer.flops_per_token
    result["run"] = {
        "preset": args.preset, "parameters": trainer.model.num_parameters(non_embedding=False),
        "data": args.data, "train_tokens": len(trainer.dataset.train), "device": str(trainer.ctx.device),
        "dtype": args.dtype, "compile": args.compile, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": trainer.tokens_per_step, "lr": args.lr, "min_lr": args.min_lr,
        "warmup_steps": args.warmup_steps, "decay_steps": args.decay_steps, "time_limit_s": args.time_limit,
        "attention_kernel": kernel, "fused_adamw": fused,
    }  # fmt: skip
    write_result("gpu_train", result, args.results_dir)
    print_train(result)


def bench_decode(args: argparse.Namespace) -> None:
    from bench.bench_decode import time_engine
    from model import GPT, GPTConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset(args.preset)).eval()
    prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    for name in args.dtypes:
        model = copy.deepcopy(base).to(device=device, dtype=DTYPES[name])
        first = None
        for batch in args.batches:
            tps = time_engine(model, prompt, batch, args.new_tokens)
            first = first or tps
            rows.append({"dtype": name, "batch": batch, "tokens_per_s": tps, f"vs_batch{args.batches[0]}": tps / first})
        del model
    write_result(
        "gpu_decode",
        {
            "preset": args.preset,
            "device": str(device),
            "new_tokens": args.new_tokens,
            "prompt_tokens": len(prompt),
            "rows": rows,
        },
        args.results_dir,
    )
    print_table(f"Greedy decode, {args.preset} on {device}, {args.new_tokens} new tokens", rows)


def bench_serve(args: argparse.Namespace) -> None:
    import asyncio

    from bench.loadgen import run_level, running_service
    from model import GPT, GPTConfig, save_checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset))
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(Path(directory) / "best_model.pt", model, step=0, val_loss=None)
        flags = ["--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(max(args.concurrency))]
        with running_service(Path(directory), flags, args.start_timeout) as url:

            def level(concurrency: int, requests: int) -> dict:
                return asyncio.run(run_level(url, concurrency, requests, args.input_len, args.output_len))[0]

            level(1, 2)  # warm-up: the first requests pay lazy initialisation (and CUDA's) in every process
            sweep = [level(c, max(args.requests, c)) for c in args.concurrency]
    write_result(
        "gpu_serve",
        {
            "preset": args.preset,
            "device": args.device,
            "dtype": args.dtype,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "sweep": sweep,
        },
        args.results_dir,
    )
    print_table(f"Serving sweep, {args.preset} on {args.device}", sweep)


def print_train(result: dict) -> None:
    run = result["run"]
    print_table(
        f"Training {run['preset']} on {run['device']}, {run['dtype']}{' compiled' if run['compile'] else ''}, "
        f"batch {run['batch_size']} × {run['seq_len']}, attention {run['attention_kernel']}",
        [{
            "tokens/s": result["tokens_per_s"], "MFU": result["mfu"],
            f"s to loss < {result['target_loss']:g}": result["seconds_to_target"],
            "first step s": result["first_step_seconds"], "steps": result["steps"],
            "lowest loss": result["lowest_loss"],
        }],
    )  # fmt: skip


def summary(args: argparse.Namespace) -> None:
    """The tables of every GPU result in the results folder, so the end of the output holds them all."""
    for path in (args.results_dir / f"{name}.json" for name in ("gpu_train", "gpu_decode", "gpu_serve")):
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        print(
            f"\n{path.name}: {record['machine'].get('gpu', record['machine']['cpu'])}, "
            f"commit {record['commit']}, {record['date']}"
        )
        if record["benchmark"] == "gpu_train":
            print_train(record)
        elif record["benchmark"] == "gpu_decode":
            print_table(f"Greedy decode, {record['preset']}", record["rows"])
        elif record["benchmark"] == "gpu_serve":
            columns = ("concurrency", "req_per_s", "output_tok_per_s", "ttft_p50_ms", "itl_p50_ms", "e2e_p50_ms")
            print_table(f"Serving sweep, {record['preset']}", [{c: r[c] for c in columns} for r in record["sweep"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda")
    common.add_argument("--preset", default="gpt2")
    common.add_argument("--results-dir", type=Path, default=GPU_RESULTS)

    train = sections.add_parser("train", parents=[common], help="time to a training loss, tokens/s and MFU")
    train.add_argument("--data", required=True)
    train.add_argument("--seq-len", type=int, default=1024)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--target-loss", type=float, default=0.1)
    train.add_argument("--time-limit", type=float, default=180.0, help="seconds before giving up on the target")
    train.add_argument("--lr", type=float, default=6e-4)
    train.add_argument("--min-lr", type=float, default=6e-5)
    train.add_argument("--warmup-steps", type=int, default=50)
    train.add_argument("--decay-steps", type=int, default=2000, help="steps of the cosine decay to --min-lr")
    train.add_argument("--skip-steps", type=int, default=10, help="first steps left out of tokens/s")
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--log-every", type=int, default=50)
    train.set_defaults(run=bench_train)

    decode = sections.add_parser("decode", parents=[common], help="engine decode tokens/s")
    decode.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    decode.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    decode.add_argument("--new-tokens", type=int, default=128)
    decode.set_defaults(run=bench_decode)

    serve = sections.add_parser("serve", parents=[common], help="the serving sweep on this device")
    serve.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    serve.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    serve.add_argument("--input-len", type=int, default=32)
    serve.add_argument("--output-len", type=int, default=128)
    serve.add_argument("--start-timeout", type=float, default=180.0)
    serve.set_defaults(run=bench_serve)

    sections.add_parser("summary", parents=[common], help="print every GPU result").set_defaults(run=summary)
    args = parser.parse_args()
    # gpu.sh stops a section that overruns with SIGTERM: unwind, so the service and its workers go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.run(args)


if __name__ == "__main__":
    main()
