"""Training speed and quality per minute: the trainer against the seed-style reference loop.

    python -m bench.bench_train [--minutes 10] [--rounds 8] [--data PATH] [--no-compile]

Throughput: at the reference's shape (4 layers, 4 heads, 128 wide, batch 16 × 128) the reference
loop and the trainer's step in each precision, with and without torch.compile, take turns for
--rounds rounds of --round-steps steps, so background load hits them alike. The table gives each
loop's best round in tokens/s (load from elsewhere only slows a round down), the peak memory its
first steps add in a fresh process (eager loops), its median tokens/s, the ratio of best rounds to
the reference, and an MFU estimate against this CPU's fp32 and bf16 matrix-product rates, measured
between the rounds (the best of them).

Quality per minute: the trainer trains the `mini` preset (in its fastest precision above) and the
reference trains its own shape, each for --minutes of its own training time with a learning-rate
schedule sized to what it manages in that time, on tiny-shakespeare (the built-in corpus when that
file is absent). They take turns in 20-second slices so background load falls on both alike, and
are evaluated on the same validation batches; the table gives validation loss against time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SHAKESPEARE, print_table, write_result
from bench.train_reference import ReferenceTrainer
from model import GPT, GPTConfig
from trainer import distributed
from trainer.data import Dataset, prepare
from trainer.report import flops_per_token, measure_matmul_flops
from trainer.settings import TrainerSettings
from trainer.train import Trainer

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
BATCH, SEQ = 16, 128
EVAL_ITERS = 20
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def settings(data: str, out: Path, **changes) -> TrainerSettings:
    base = dict(data=data, out=out, cache_dir=out.parent / "cache", device="cpu", log_interval=10**9,
                checkpoint_interval=10**9, eval_iters=EVAL_ITERS)
    return TrainerSettings(**{**base, **changes})


def tokens_per_second(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * SEQ / (time.perf_counter() - start)


def contender(name: str, data: str, work: Path):
    """The train_step of loop `name`: "reference (seed-style)" or "trainer DTYPE[ compiled]"."""
    if name.startswith("reference"):
        s = settings(data, work / "reference")
        dataset = Dataset.load(prepare(s.data, s.cache_dir), s.val_fraction, SEQ)
        return ReferenceTrainer(GPTConfig(**SHAPE), dataset, BATCH, SEQ, steps=10**6).train_step
    _, dtype, *compiled = name.split()
    s = settings(data, work / name.replace(" ", "-"), preset="mini", **SHAPE, dtype=dtype, compile=bool(compiled))
    return Trainer(s, distributed.setup("cpu")).train_step


def step_memory(name: str, data: str, work: str, steps: int = 2) -> float:
    """Peak resident memory (MB) that the first `steps` steps of loop `name` add to the process that
    built it: what training needs beyond the model (activations, logits, gradients, optimizer state)."""
    step = contender(name, data, Path(work))
    status = Path("/proc/self/status")
    # Linux resets the peak (VmHWM) to the current resident size on "5" written to clear_refs.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib(status.read_text(), "VmRSS")
    for _ in range(steps):
        step()
    return (_status_kib(status.read_text(), "VmHWM") - before) / 1024


def _status_kib(text: str, key: str) -> int:
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith(key + ":"))


def fresh_step_memory(name: str, data: str, work: Path) -> float:
    """step_memory in a process of its own, so no loop reuses memory another one freed."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(step_memory, (name, data, str(work)))


def throughput(data: str, work: Path, rounds: int, round_steps: int, compile_too: bool, peaks: dict) -> list[dict]:
    """Median tokens/s of each loop over interleaved rounds; `peaks` is updated in place with the best
    matrix-product rate seen in each round, since other load on the machine can only lower it."""
    names = ["reference (seed-style)", "trainer fp32", "trainer bf16"]
    names += ["trainer fp32 compiled", "trainer bf16 compiled"] if compile_too else []
    contenders = {name: contender(name, data, work) for name in names}
    for step in contenders.values():  # warm-up: compilation, allocator, first-touch of weights
        for _ in range(3):
            step()
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            samples[name].append(tokens_per_second(step, round_steps))
        for name, dtype in PEAK_DTYPES.items():
            peaks[name] = max(peaks.get(name, 0.0), measure_matmul_flops(dtype))
    # Compiling again in a fresh process would take minutes; the compiled loops share the eager ones' loss.
    memory = {name: fresh_step_memory(name, data, work) for name in names if "compiled" not in name}
    model = GPT(GPTConfig(**SHAPE))
    work_per_token = flops_per_token(model.config, model.num_parameters(), SEQ)
    # Other work on a shared machine only ever slows a round down, so each loop's best round is the
    # estimate of its own speed; the median shows how much the load moved it.
    ref = max(samples["reference (seed-style)"])
    rows = []
    for name, values in samples.items():
        tps = max(values)
        rows.append({
            "loop": name,
            "tokens/s": tps,
            "peak MB": memory.get(name),
            "median": statistics.median(values),
            "vs reference": tps / ref,
            "MFU vs fp32 peak": work_per_token * tps / peaks["fp32"],
            "MFU vs bf16 peak": work_per_token * tps / peaks["bf16"],
        })
    return rows


def sized_schedule(steps_per_second: float, minutes: float) -> dict:
    """Steps and warmup that fit `minutes`, so each side's cosine decay ends as its time runs out."""
    steps = max(20, int(minutes * 60 * steps_per_second * 0.9))
    return {"steps": steps, "warmup_steps": min(100, steps // 10)}


def race(sides: dict, minutes: float, slice_seconds: float = 20.0) -> dict:
    """Train each side for `minutes` of its own clock, taking turns in slices so that other load on
    the machine falls on both alike. A side is (train_step, evaluate, steps, eval_every); the result
    is each side's validation loss at each evaluation, against its own elapsed training time."""
    clock = {name: 0.0 for name in sides}
    done_steps = {name: 0 for name in sides}
    curves = {name: [] for name in sides}
    running = list(sides)
    while running:
        for name in list(running):
            train_step, evaluate, steps, eval_every = sides[name]
            start = time.perf_counter()
            while time.perf_counter() - start < slice_seconds:
                train_step()
                done_steps[name] += 1
                elapsed = clock[name] + time.perf_counter() - start
                finished = elapsed >= minutes * 60 or done_steps[name] >= steps
                if done_steps[name] % eval_every == 0 or finished:
                    curves[name].append({"elapsed": elapsed, "step": done_steps[name], "val_loss": evaluate()})
                if finished:
                    running.remove(name)
                    break
            clock[name] += time.perf_counter() - start
    return curves


def quality(data: str, work: Path, minutes: float, dtype: str, compiled: bool) -> dict:
    """Validation loss over training time for the trainer's mini preset and for the reference."""
    mini = dict(preset="mini", dtype=dtype, compile=compiled)
    probe = Trainer(settings(data, work / "probe", **mini), distributed.setup("cpu"))
    for _ in range(2):
        probe.train_step()
    plan = sized_schedule(tokens_per_second(probe.train_step, 5) / (BATCH * SEQ), minutes)
    trainer = Trainer(settings(data, work / "mini", **mini, **plan), distributed.setup("cpu"))

    config = GPTConfig(**SHAPE)
    probe = ReferenceTrainer(config, trainer.dataset, BATCH, SEQ, steps=10**6)
    ref_plan = sized_schedule(tokens_per_second(probe.train_step, 5) / (BATCH * SEQ), minutes)
    reference = ReferenceTrainer(config, trainer.dataset, BATCH, SEQ, **ref_plan)

    curves = race({
        "trainer_mini": (trainer.train_step, trainer.evaluate, plan["steps"], max(1, plan["steps"] // 10)),
        "reference": (reference.train_step, lambda: reference.evaluate(EVAL_ITERS), ref_plan["steps"],
                      max(1, ref_plan["steps"] // 10)),
    }, minutes)
    return {**curves, "trainer_plan": plan, "reference_plan": ref_plan, "trainer_dtype": dtype,
            "trainer_compiled": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training time for each side of the quality run")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--round-steps", type=int, default=4)
    parser.add_argument("--data", default=str(SHAKESPEARE) if SHAKESPEARE.exists() else "builtin:pydoc")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (slow to start)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = throughput(args.data, work, args.rounds, args.round_steps, not args.no_compile, peaks)
        print_table("Matrix product rate of this CPU (2048², best of the rounds)",
                    [{"dtype": k, "GFLOP/s": v / 1e9} for k, v in peaks.items()])
        print_table(f"Training throughput, 4 layers × 4 heads × 128 wide, batch {BATCH} × {SEQ} "
                    f"(best of {args.rounds} interleaved rounds; peak MB: the memory the first steps add; "
                    f"MFU: an estimate against the matrix-product rates above)", rows)
        # Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX) decides the report's goal.
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        write_result("train_throughput", {"shape": {**SHAPE, "batch": BATCH, "seq_len": SEQ}, "peak_flops": peaks,
                                          "native_bf16": native_bf16, "rounds": args.rounds, "rows": rows})
        if args.skip_quality:
            return
        # The trainer runs in whichever precision and compile setting measured fastest above.
        fastest = max((r for r in rows if r["loop"].startswith("trainer")), key=lambda r: r["tokens/s"])
        _, dtype, *compiled = fastest["loop"].split()
        curves = quality(args.data, work, args.minutes, dtype, bool(compiled))
    table = [{"loop": "trainer, mini", **r} for r in curves["trainer_mini"]]
    table += [{"loop": "reference", **r} for r in curves["reference"]]
    print_table(f"Validation loss over {args.minutes:g} minutes of training on {args.data} "
                f"(trainer: {fastest['loop']})", table)
    write_result("train_quality", {"data": args.data, "minutes": args.minutes, **curves})


if __name__ == "__main__":
    main()
