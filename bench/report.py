"""The README's benchmark section, written from the last run's JSON results so that no number is typed by hand.

    python -m bench.report [--results-dir bench/results] [--readme README.md]

Replaces the text between `<!-- bench:start -->` and `<!-- bench:end -->` in the README (appending
both markers at its end when they are missing) with a summary table of every ratio against its goal,
the plots from bench.plot and the detailed tables; the GPU part comes from bench/results/gpu/ once a
run of bench/gpu.sh on a lent GPU is copied there. The summary is also printed and written to
summary.json beside the results.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import reporting
from bench.common import (
    RESULTS,
    format_value,
    print_table,
    read_gpu_results,
    read_results,
    serve_record,
    write_result,
)

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"

# The issues' goals (2: decode, 3: training, 4: serving, 8: GPU), as (test, how the README says it).
AT_LEAST = {
    "train_speedup": 2.0,  # trainer tokens/s over the seed-style loop's, on a CPU with native bf16
    "train_speedup_without_bf16": 1.3,  # the same on a CPU without
    "decode_speedup": 3.0,  # engine batch-1 tokens/s over transformers' generate
    "batch_speedup": 5.0,  # engine batch-8 aggregate tokens/s over its batch 1
    "http_vs_engine": 0.95,  # one client's rate through HTTP within 5% of the engine's
    "sixteen_clients": 8.0,  # 16 streaming clients' aggregate tokens/s over one client's
    "gpu_mfu": 0.45,  # gpt2 at 1024 context on one H100
    "vs_best_peer": 1.0,  # issue 14: the engine's decode over the fastest peer's, per precision and batch
    "of_bound": 0.9,  # issue 14: batch-1 decode over the memory-bandwidth bound of its precision
    "balancer_vs_direct": 0.97,  # issue 24: one client's tokens/s through HAProxy over the replica directly
    "speculative_rewrite": 2.0,  # issue 25: batch-1 tokens/s with speculation over plain decoding, rewrite workload
    "speculative_continuation": 1.5,  # issue 25: the same with the draft model, text continuation
    "speculative_of_bound": 1.0,  # issue 25: both above the target's batch-1 memory-bandwidth bound
    "speculative_never_a_loss": 0.95,  # issue 25: drafts that never match, speculation on over off, batch 1 and 16
}
BALANCER_TTFT_ADDED_MS = 2.0  # issue 24: at most this much more time to first token at p50 through HAProxy
GPU_SECONDS_TO_TARGET = 90.0  # gpt2 from scratch to training loss < 0.1 on one H100


def ratio(value: float) -> str:
    return f"{value:.2f}×"


def tokens(value: float) -> str:
    return f"{value:,.0f} tokens/s" if value >= 100 else f"{value:.1f} tokens/s"


def row(benchmark: str, measured: str, reference: str, result: str, goal: str, met: bool | None) -> dict:
    """One line of the summary; `met` is None where the issue asks for a figure rather than sets a goal."""
    return {"benchmark": benchmark, "measured": measured, "reference (same run)": reference, "result": result,
            "goal": goal, "met": met}  # fmt: skip


def cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return format_value(value)


def markdown_table(rows: list[dict]) -> str:
    return reporting.markdown_table(rows, cell)


def train_rows(throughput: dict, quality: dict) -> list[dict]:
    rows = throughput["rows"]
    reference = rows[0]
    best = max(rows[1:], key=lambda r: r["tokens/s"])
    shape = throughput["shape"]
    name = f"{shape['n_layer']}×{shape['n_head']}×{shape['n_embd']}, batch {shape['batch']}×{shape['seq_len']}"
    trainer_end, reference_end = quality["trainer_mini"][-1], quality["reference"][-1]
    gain = reference_end["val_loss"] - trainer_end["val_loss"]
    # Results from before the bench recorded it were measured on CPUs with native bf16.
    native_bf16 = throughput.get("native_bf16", True)
    goal = AT_LEAST["train_speedup" if native_bf16 else "train_speedup_without_bf16"]
    cpu = "CPU with native bf16" if native_bf16 else "CPU without native bf16"
    return [
        row(f"Training throughput ({name}, {cpu})", f"{best['loop']}: {tokens(best['tokens/s'])}",
            f"seed-style loop: {tokens(reference['tokens/s'])}", ratio(best["vs reference"]),
            f"≥ {goal:g}×", best["vs reference"] >= goal),
        row("Training MFU (same loop, an estimate)",
            f"{best['MFU vs bf16 peak']:.0%} of the measured bf16 matmul rate",
            f"{best['MFU vs fp32 peak']:.0%} of the fp32 rate", "", "reported", None),
        row(f"Quality per minute ({quality['minutes']:g} min each, {Path(quality['data']).name})",
            f"mini preset: val loss {trainer_end['val_loss']:.3f}",
            f"seed-style loop: {reference_end['val_loss']:.3f}", f"{-gain:+.3f} nats",
            "below the reference", gain > 0),
    ]  # fmt: skip


# Decode rows whose weights hold the model's own numbers (the others are quantized).
FULL_PRECISION = ("plain", "packed", "native")


def variant(r: dict) -> str:
    return f"{r['impl']} {r['dtype']}" + ("" if r["weights"] == "plain" else f" {r['weights']}")


def decode_rows(decode: dict) -> list[dict]:
    rows = measured(decode["rows"])
    single = [r for r in rows if r["batch"] == 1]
    reference = max((r for r in single if r["impl"] == "transformers"), key=lambda r: r["tokens_per_s"])
    engine = [r for r in single if r["impl"] == "engine"]
    same_weights = max((r for r in engine if r["weights"] in FULL_PRECISION), key=lambda r: r["tokens_per_s"])
    quantized = max((r for r in engine if r["weights"] not in FULL_PRECISION), key=lambda r: r["tokens_per_s"])
    batched = next(r for r in rows if r["batch"] > 1 and variant(r) == variant(same_weights))
    versus = f"{variant(reference)} generate: {tokens(reference['tokens_per_s'])}"
    return [
        row(f"Single-stream decode ({decode['preset']} shape, CPU)",
            f"{variant(same_weights)}: {tokens(same_weights['tokens_per_s'])}", versus,
            ratio(same_weights["vs_transformers_batch1"]), f"≥ {AT_LEAST['decode_speedup']:g}×",
            same_weights["vs_transformers_batch1"] >= AT_LEAST["decode_speedup"]),
        row("Single-stream decode, quantized", f"{variant(quantized)}: {tokens(quantized['tokens_per_s'])}",
            versus, ratio(quantized["vs_transformers_batch1"]), "reported", None),
        row(f"Batched decode (batch {batched['batch']})", f"{variant(batched)}: {tokens(batched['tokens_per_s'])}",
            f"the same at batch 1: {tokens(same_weights['tokens_per_s'])}", ratio(batched["vs_own_batch1"]),
            f"≥ {AT_LEAST['batch_speedup']:g}×", batched["vs_own_batch1"] >= AT_LEAST["batch_speedup"]),
    ]  # fmt: skip


PEER_PRECISIONS = ("fp32", "bf16", "int8")


def measured(rows: list[dict]) -> list[dict]:
    """The rows that ran (a missing peer's rows carry its reason instead of a rate)."""
    return [r for r in rows if r["tokens_per_s"] is not None]


def peer_rows(decode: dict) -> list[dict]:
    """Issue 14's goals: the engine at or ahead of the fastest peer, per precision and batch, and
    within 90% of the memory-bandwidth bound at batch 1."""
    rows = measured(decode["rows"])
    out = []
    for precision in PEER_PRECISIONS:
        for batch in (1, 8):
            same = [r for r in rows if r["precision"] == precision and r["batch"] == batch]
            engine = max((r for r in same if r["impl"] == "engine"), key=lambda r: r["tokens_per_s"], default=None)
            peer = max((r for r in same if r["impl"] not in ("engine", "transformers")),
                       key=lambda r: r["tokens_per_s"], default=None)  # fmt: skip
            if engine is None or peer is None:
                continue
            gain = engine["tokens_per_s"] / peer["tokens_per_s"]
            out.append(row(f"Decode against the fastest peer ({precision}, batch {batch})",
                           f"engine {engine['weights']}: {tokens(engine['tokens_per_s'])}",
                           f"{peer['impl']} {peer['weights']}: {tokens(peer['tokens_per_s'])}", ratio(gain),
                           f"≥ {AT_LEAST['vs_best_peer']:g}×", gain >= AT_LEAST["vs_best_peer"]))  # fmt: skip
    bounds = decode["batch1_bound_tokens_per_s"]
    for precision in PEER_PRECISIONS:
        single = [r for r in rows if r["impl"] == "engine" and r["precision"] == precision and r["batch"] == 1]
        if not single:
            continue
        best = max(single, key=lambda r: r["tokens_per_s"])
        share = best["tokens_per_s"] / bounds[precision]
        out.append(row(f"Batch-1 decode against the memory bound ({precision})",
                       f"engine {best['weights']}: {tokens(best['tokens_per_s'])}",
                       f"{decode['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s over the weights: "
                       f"{tokens(bounds[precision])}", f"{share:.0%}", f"≥ {AT_LEAST['of_bound']:.0%}",
                       share >= AT_LEAST["of_bound"]))  # fmt: skip
    return out


def peer_table(decode: dict) -> str:
    """Implementations down, precision and batch across: tokens/s (or why a peer is missing)."""
    rows = decode["rows"]
    batches = sorted({r["batch"] for r in rows if r["impl"] != "engine"})
    implementations = list(dict.fromkeys((r["impl"], r["weights"] if r["impl"] == "engine" else "") for r in rows))
    table = []
    for impl, weights in implementations:
        mine = [r for r in rows if r["impl"] == impl and (not weights or r["weights"] == weights)]
        line = {"implementation": f"{impl} {weights}".strip()}
        for precision in PEER_PRECISIONS:
            for batch in batches:
                hit = next((r for r in mine if r["precision"] == precision and r["batch"] == batch), None)
                line[f"{precision} b{batch}"] = "—" if hit is None else "missing" if hit["missing"] else (
                    f"{format_value(hit['tokens_per_s'])} ({hit['agrees']})")  # fmt: skip
        if any(value != "—" for key, value in line.items() if key != "implementation"):
            table.append(line)
    return markdown_table(table)


def profile_table(decode: dict) -> str:
    """Where a decode step's time goes: one column per profiled engine and batch, one row per part."""
    profiles = decode.get("profiles", {})
    parts = list(dict.fromkeys(row["part"] for rows in profiles.values() for row in rows))
    table = []
    for part in parts:
        line = {"part of a decode step": part}
        for name, rows in profiles.items():
            hit = next(r for r in rows if r["part"] == part)
            line[name] = f"{hit['ms_per_step']:.1f} ms ({hit['share']:.0%})"
        table.append(line)
    return markdown_table(table) if table else ""


def missing_peers(decode: dict) -> list[str]:
    reasons = dict.fromkeys((r["impl"], r["weights"], r["missing"]) for r in decode["rows"] if r["missing"])
    return [f"- {impl} {weights}: {reason}" for impl, weights, reason in reasons]


def serve_rows(serve: dict) -> list[dict]:
    rows = []
    for preset, result in serve["presets"].items():
        overhead, batching = result["overhead"], result["batching"]
        rows += [
            row(f"Serving overhead ({preset}, one client)", f"HTTP streaming: {tokens(overhead['http_tok_per_s'])}",
                f"engine called directly: {tokens(overhead['engine_tok_per_s'])}", ratio(overhead["http_vs_engine"]),
                f"≥ {AT_LEAST['http_vs_engine']:g}×", overhead["http_vs_engine"] >= AT_LEAST["http_vs_engine"]),
            row(f"Serving batching ({preset}, 16 clients)", tokens(batching["sixteen_clients_tok_per_s"]),
                f"one client: {tokens(batching['one_client_tok_per_s'])}", ratio(batching["ratio"]),
                f"≥ {AT_LEAST['sixteen_clients']:g}×", batching["ratio"] >= AT_LEAST["sixteen_clients"]),
        ]  # fmt: skip
        rows += [
            row(f"Batch invariance's price ({preset}, {r['clients']} client{'s' if r['clients'] > 1 else ''})",
                f"invariant service: {tokens(r['invariant_tok_per_s'])}",
                f"--no-batch-invariant: {tokens(r['not_invariant_tok_per_s'])}", ratio(r["invariant_vs_not"]),
                "reported", None)
            for r in result.get("invariance", [])
        ]  # fmt: skip
    return rows


def balancer_rows(records: dict[str, dict]) -> list[dict]:
    if "balancer" not in records:
        return []
    b = records["balancer"]
    added = b["ttft_p50_added_ms"]
    return [
        row(f"Load balancer ({b['preset']}, one client)", f"through HAProxy: {tokens(b['balancer_tok_per_s'])}",
            f"the replica directly: {tokens(b['direct_tok_per_s'])}", ratio(b["balancer_vs_direct"]),
            f"≥ {AT_LEAST['balancer_vs_direct']:g}×", b["balancer_vs_direct"] >= AT_LEAST["balancer_vs_direct"]),
        row(f"Load balancer's time to first token ({b['preset']}, p50)",
            f"through HAProxy: {b['balancer_ttft_p50_ms']:.1f} ms",
            f"the replica directly: {b['direct_ttft_p50_ms']:.1f} ms",
            f"{added:+.1f} ms", f"≤ +{BALANCER_TTFT_ADDED_MS:g} ms", added <= BALANCER_TTFT_ADDED_MS),
    ]  # fmt: skip


# Issue 25's two goals: the workload, the speculation settings that may meet it, and its goal's key.
SPECULATIVE_GOALS = [("rewrite", ("lookup", "lookup + draft"), "speculative_rewrite"),
                     ("continuation", ("draft", "lookup + draft"), "speculative_continuation")]  # fmt: skip


def speculative_rows(records: dict[str, dict]) -> list[dict]:
    """Issue 25's goals at batch 1, per sampling: the fastest setting that may meet each against plain
    decoding and against the bound, and the worst never-matching case against speculation off."""
    if "speculative" not in records:
        return []
    spec, rows = records["speculative"], []
    off = {(r["workload"], r["sampling"]): r for r in spec["rows"] if r["speculation"] == "off"}
    for workload, settings, goal in SPECULATIVE_GOALS:
        for sampling in spec["samplings"]:
            best = max((r for r in spec["rows"] if r["workload"] == workload and r["sampling"] == sampling
                        and r["speculation"] in settings), key=lambda r: r["tokens_per_s"])  # fmt: skip
            name = f"Speculative decoding, {workload} ({spec['models']['target']['preset']}, {sampling}, batch 1)"
            measured = f"{best['speculation']}: {tokens(best['tokens_per_s'])}"
            rows += [
                row(name, measured, f"speculation off: {tokens(off[(workload, sampling)]['tokens_per_s'])}",
                    ratio(best["vs_off"]), f"≥ {AT_LEAST[goal]:g}×", best["vs_off"] >= AT_LEAST[goal]),
                row(name, measured, f"batch-1 bound: {tokens(spec['batch1_bound_tokens_per_s'])}",
                    ratio(best["of_bound"]), f"> {AT_LEAST['speculative_of_bound']:g}×",
                    best["of_bound"] > AT_LEAST["speculative_of_bound"]),
            ]  # fmt: skip
    for case in spec["never_a_loss"]:
        rows.append(row(f"Speculative decoding never a loss: {case['drafts']}, batch {case['batch']}",
                        f"on: {tokens(case['on_tokens_per_s'])}", f"off: {tokens(case['off_tokens_per_s'])}",
                        ratio(case["on_vs_off"]), f"≥ {AT_LEAST['speculative_never_a_loss']:g}×",
                        case["on_vs_off"] >= AT_LEAST["speculative_never_a_loss"]))  # fmt: skip
    return rows


def agreement_lines(agreement: dict | None) -> list[str]:
    """How often the draft model's sampled pick is the target's, which bounds how many drafts are kept."""
    if agreement is None:
        return []
    return [
        (
            "The draft model's pick against the target's at the same position, seeded sampling, over "
            f"{agreement['positions']} positions of the validation text fed to both: the same token "
            f"{agreement['shared_keys']:.0%} of the time with the position's key shared (as the engine drafts), "
            f"{agreement['independent_keys']:.0%} with independent keys, and at most "
            f"{agreement['best_coupling']:.0%} for any coupling (one minus the total variation distance)."
        ),
        "",
    ]


def speculative_lines(records: dict[str, dict]) -> list[str]:
    if "speculative" not in records:
        return []
    spec = records["speculative"]
    models = "; ".join(f"{name} `{m['preset']}` ({m['shape']}, validation loss {m['val_loss']:.2f} after "
                       f"{m['step']} steps, {m['provenance']})" for name, m in spec["models"].items())  # fmt: skip
    samplings = ", ".join(f"{name} ({', '.join(f'{k} {v:g}' for k, v in options.items())})"
                          for name, options in spec["samplings"].items())  # fmt: skip
    return [
        "### Speculative decoding on the CPU",
        "",
        (
            f"Trained models: {models}. Layout {spec['layout']}, {spec['threads']} thread(s). Batch 1, "
            f"{spec['prompts']} requests of {spec['new_tokens']} tokens one after another per run, medians of "
            f"{spec['rounds']} rounds in which every setting takes its turn; {samplings}. Continuation: "
            f"{spec['passage_lines']}-line passages of the validation text continued; rewrite: the passage, a "
            "blank line and its first line again (the model copies it out). Every run's tokens equal plain "
            f"decoding's. The target's batch-1 bound: {tokens(spec['batch1_bound_tokens_per_s'])} "
            f"({spec['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read, fp32 weights read once per token)."
        ),
        "",
        markdown_table(spec["rows"]),
        "",
        "What the target writes (each workload's first request; the tokens are the same with speculation on):",
        "",
        *[f"- {name}: `{text!r}`" for name, text in spec.get("samples", {}).items()],
        "",
        *agreement_lines(spec.get("agreement")),
        (
            "Never a loss: drafts that (almost) never match (a draft model of random weights; prompt lookup on "
            f"passages whose words are shuffled), {spec['never_a_loss_sampling']}, 16 requests one after another "
            "(batch 1) or together (batch 16), speculation on and off in alternated rounds."
        ),
        "",
        markdown_table(spec["never_a_loss"]),
        "",
    ]


def fleet_lines(records: dict[str, dict]) -> list[str]:
    """What N replicas would serve, worked out from one replica's measured figures."""
    if "balancer" not in records:
        return []
    b = records["balancer"]
    one = serve_record(records)["presets"].get(b["preset"])
    if one is None:
        return []
    replica = one["batching"]["sixteen_clients_tok_per_s"]
    # A balancer cannot add throughput: a measured gain is noise, and counts as 1.
    kept = min(b["balancer_vs_direct"], 1.0)
    fleet = ", ".join(f"{n} replicas {tokens(n * replica * kept)}" for n in (2, 3, 4, 8))
    return [
        "### Past one machine",
        "",
        f"Worked out, not measured (two cores cannot hold a fleet): N replicas of {b['preset']}, each on a machine "
        f"like this one with 16 streaming clients, serve N × {tokens(replica)} (one replica's figure above) times "
        f"what the balancer keeps of a stream's rate (measured {ratio(b['balancer_vs_direct'])}, counted as at most 1×): "
        f"{fleet}. It holds while "
        "the balancer has cores to spare and every replica gets its share of clients (least connections).",
        "",
    ]


def invariance_table(decode: dict, serve: dict) -> str:
    """What batch invariance costs: each measurement with and without it, side by side in the same run."""
    table = [{"where": f"decode, engine {r['dtype']} {r['weights']}, batch {r['batch']}",
              "invariant tokens/s": r["invariant_tokens_per_s"], "without tokens/s": r["not_invariant_tokens_per_s"],
              "invariant / without": r["invariant_vs_not"]} for r in decode.get("invariance", [])]  # fmt: skip
    for preset, result in serve["presets"].items():
        table += [{"where": f"serving {preset}, {r['clients']} streaming client(s)",
                   "invariant tokens/s": r["invariant_tok_per_s"], "without tokens/s": r["not_invariant_tok_per_s"],
                   "invariant / without": r["invariant_vs_not"]} for r in result.get("invariance", [])]  # fmt: skip
    return markdown_table(table) if table else ""


def gpu_rows(gpu: dict[str, dict]) -> list[dict]:
    rows = []
    if "gpu_train" in gpu:
        train = gpu["gpu_train"]
        run, card = train["run"], train["machine"].get("gpu", train["run"]["device"])
        mfu = train["mfu"]
        rows.append(row(f"GPU training ({run['preset']}, {run['seq_len']} context, {card})",
                        tokens(train["tokens_per_s"]), "the card's dense bf16 peak",
                        f"{mfu:.0%} MFU" if mfu is not None else "", f"≥ {AT_LEAST['gpu_mfu']:.0%} MFU",
                        mfu >= AT_LEAST["gpu_mfu"] if mfu is not None else None))  # fmt: skip
        seconds = train["seconds_to_target"]
        # The goal is judged on the whole wall clock; the time after the compiling first step is shown beside it.
        reached = (
            f"{seconds:.0f} s ({train['seconds_to_target_after_first_step']:.0f} s after the first step), "
            f"{train['steps']} steps"
            if seconds is not None
            else f"not reached in {train['elapsed_s']:.0f} s (lowest {train['lowest_loss']:.3f})"
        )
        rows.append(
            row(
                f"GPU time to training loss < {train['target_loss']:g} ({run['preset']} from scratch)",
                reached,
                "students: about 31 minutes on a T4",
                "",
                f"< {GPU_SECONDS_TO_TARGET:g} s",
                seconds is not None and seconds < GPU_SECONDS_TO_TARGET,
            )
        )
    if "gpu_decode" in gpu:
        decode = gpu["gpu_decode"]
        for dtype in dict.fromkeys(r["dtype"] for r in decode["rows"]):
            same = [r for r in decode["rows"] if r["dtype"] == dtype]
            first, last = same[0], same[-1]
            rows.append(row(f"GPU decode ({decode['preset']}, {dtype})",
                            f"batch {last['batch']}: {tokens(last['tokens_per_s'])}",
                            f"batch {first['batch']}: {tokens(first['tokens_per_s'])}",
                            ratio(last["tokens_per_s"] / first["tokens_per_s"]), "reported", None))  # fmt: skip
    if "gpu_serve" in gpu:
        best = max(gpu["gpu_serve"]["sweep"], key=lambda r: r["output_tok_per_s"])
        rows.append(
            row(
                f"GPU serving ({gpu['gpu_serve']['preset']}, best of the sweep)",
                f"{tokens(best['output_tok_per_s'])} at concurrency {best['concurrency']}",
                "",
                "",
                "reported",
                None,
            )
        )
    return rows


DECODE_COLUMNS = ["impl", "dtype", "weights", "batch", "tokens_per_s", "agrees", "vs_transformers_batch1",
                  "vs_own_batch1", "of_bound"]  # fmt: skip
SWEEP_COLUMNS = ["concurrency", "req_per_s", "output_tok_per_s"] + [
    f"{kind}_{p}_ms" for kind in ("ttft", "itl", "e2e") for p in ("p50", "p95", "p99")
]


def sweep_table(sweep: list[dict]) -> str:
    """A serving sweep as a markdown table, one row per concurrency level."""
    return markdown_table([{c: r[c] for c in SWEEP_COLUMNS} for r in sweep])


def image(path: Path, readme: Path, alt: str) -> str:
    return f"![{alt}]({Path(os.path.relpath(path, readme.parent)).as_posix()})"


def machine_line(record: dict) -> str:
    m = record["machine"]
    device = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores)"
    return f"{device}, torch {m['torch']}, commit `{record['commit']}`, {record['date'].replace('T', ' ')}"


def gpu_section(gpu: dict[str, dict], results_dir: Path, readme: Path) -> list[str]:
    lines = ["### On a GPU (`bench/gpu.sh`)", ""]
    if not gpu:
        return lines + [
            (
                "No GPU run is recorded yet: no session so far has had a GPU lent. With one, run "
                "`bash bench/gpu.sh prepare` here, then `bash bench/gpu.sh` on the GPU with `.device` carried "
                "(one call, under 8 minutes), copy the JSON files it leaves in `$OUT` into `bench/results/gpu/` "
                "and run `python -m bench.plot && python -m bench.report`."
            ),
        ]
    first = next(iter(gpu.values()))
    lines += [f"Measured on {machine_line(first)}.", ""]
    if "gpu_train" in gpu:
        train, run = gpu["gpu_train"], gpu["gpu_train"]["run"]
        lines += [
            (
                f"Training {run['preset']} ({run['parameters'] / 1e6:.0f}M parameters) from scratch on "
                f"{Path(run['data']).name}: {run['dtype']}, torch.compile {run['compile']}, fused AdamW "
                f"{run['fused_adamw']}, attention kernel {run['attention_kernel']}, batch {run['batch_size']} × "
                f"{run['seq_len']}, learning rate {run['lr']:g} (warmup {run['warmup_steps']}, cosine to "
                f"{run['min_lr']:g} over {run['decay_steps']} steps). The first step, which compiles, took "
                f"{train['first_step_seconds']:.0f} s; tokens/s leave the first steps out."
            ),
            "",
            image(results_dir / "gpu_train.png", readme, "GPU training loss against wall clock"),
            "",
        ]
    if "gpu_decode" in gpu:
        decode = gpu["gpu_decode"]
        lines += [f"**Greedy decode**, {decode['preset']}, {decode['new_tokens']} new tokens", "",
                  markdown_table(decode["rows"]), ""]  # fmt: skip
    if "gpu_serve" in gpu:
        serve = gpu["gpu_serve"]
        lines += [
            (
                f"**Serving sweep**, {serve['preset']} in {serve['dtype']}, {serve['input_len']} prompt tokens, "
                f"{serve['output_len']} output tokens per request"
            ),
            "",
            sweep_table(serve["sweep"]),
            "",
        ]
    return lines


def section(
    records: dict[str, dict], gpu: dict[str, dict], summary: list[dict], results_dir: Path, readme: Path
) -> str:
    suite, serve = records["suite"], serve_record(records)
    throughput, quality, decode = records["train_throughput"], records["train_quality"], records["decode"]
    minutes = sum(step["seconds"] for step in suite["steps"]) / 60
    loads = ", ".join(f"{s['name']} {s['load_average_before'][0]:.1f}" for s in suite["steps"])
    lengths = "full-length" if all(s["full"] for s in suite["steps"]) else "`make bench`'s quick lengths"
    lines = [
        (
            f"Last run on {machine_line(suite)}: {minutes:.1f} minutes at {lengths} "
            "(`make bench BENCH_ARGS=--full` for the full-length versions). The machine is shared, so each "
            "benchmark is a ratio against its reference measured side by side in the same run; the one-minute "
            f"load average as each step began: {loads}."
        ),
        "",
        "### Summary",
        "",
        markdown_table(summary),
        "",
        "### Training on the CPU",
        "",
        image(results_dir / "train_throughput.png", readme, "training throughput"),
        image(results_dir / "train_quality.png", readme, "validation loss against training time"),
        "",
        markdown_table(throughput["rows"]),
        "",
        "Matrix-product rate of this CPU (best of the rounds): "
        + ", ".join(f"{dtype} {rate / 1e9:,.0f} GFLOP/s" for dtype, rate in throughput["peak_flops"].items())
        + (
            f". Quality race: the trainer in {quality['trainer_dtype']}"
            f"{' compiled' if quality['trainer_compiled'] else ''} planned {quality['trainer_plan']['steps']} "
            f"steps, the reference {quality['reference_plan']['steps']}; each ran until its own clock reached "
            f"{quality['minutes']:g} minutes or its steps were done."
        ),
        "",
        "### Decoding on the CPU, against the engines users would pick instead",
        "",
        image(results_dir / "decode_peers.png", readme, "decode tokens/s by precision against the peers"),
        "",
        (
            f"Greedy decoding of the {decode['preset']} shape (the same random weights, scaled by "
            f"{decode['sharpen']:g} so that greedy tokens have margins), {decode['prompt_tokens']}-token prompt, "
            f"{decode['new_tokens']} new tokens, {decode['threads']} threads, tokens/s with, in brackets, how many "
            "of the first 32 tokens match the engine's at the same precision. Memory-read bandwidth measured in the same run: "
            f"{decode['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, which bounds batch-1 decoding (every weight read "
            "once per token) at "
            + ", ".join(f"{tokens(v)} in {k}" for k, v in decode["batch1_bound_tokens_per_s"].items())
            + "."
        ),
        "",
        peer_table(decode),
        "",
        *(["Missing peers, and why:", "", *missing_peers(decode), ""] if missing_peers(decode) else []),
        *(["Where a decode step's time goes (torch.profiler over 16 engine steps; what no op accounts for is "
           "Python and dispatch):", "", profile_table(decode), ""] if decode.get("profiles") else []),
        image(results_dir / "decode.png", readme, "decode tokens/s"),
        "",
        markdown_table([{k: r[k] for k in DECODE_COLUMNS} for r in measured(decode["rows"])]),
        "",
        "### Serving on the CPU",
        "",
        image(results_dir / "serve_sweep.png", readme, "serving throughput and latency against concurrency"),
        "",
        (
            f"{serve['input_len']} prompt tokens, {serve['output_len']} output tokens per request, random "
            f"weights, fp32{', packed for oneDNN' if serve['pack_weights'] else ''}, {serve['threads']} decode "
            f"thread(s), OpenMP wait policy {serve['omp_wait_policy']}."
        ),
        "",
    ]
    for preset, result in serve["presets"].items():
        lines += [f"**{preset}**", "", sweep_table(result["sweep"]), ""]
    if invariance_table(decode, serve):
        lines += [
            "### What batch invariance costs",
            "",
            "The engine with and without batch invariance (`Engine(batch_invariant=False)`, the service's "
            "`--no-batch-invariant`: prompts prefilled padded together, one masked attention call per layer, "
            "any row count), side by side in the same run: decode as above but 64 new tokens, serving as in "
            "the sweep; each the median of three alternated rounds.",
            "",
            invariance_table(decode, serve),
            "",
        ]
    lines += speculative_lines(records)
    lines += fleet_lines(records)
    lines += gpu_section(gpu, results_dir, readme)
    return "\n".join(lines).rstrip() + "\n"


def replace_section(text: str, body: str) -> str:
    """`text` with the part between the markers replaced by `body`; without markers, a Performance
    heading and both markers are appended."""
    replaced = reporting.replace_between(text, START, END, body)
    if replaced is not None:
        return replaced
    return text.rstrip("\n") + f"\n\n## Performance\n\n{START}\n{body}{END}\n"


def summary_rows(records: dict[str, dict], gpu: dict[str, dict]) -> list[dict]:
    return (train_rows(records["train_throughput"], records["train_quality"]) + decode_rows(records["decode"])
            + peer_rows(records["decode"]) + serve_rows(serve_record(records)) + balancer_rows(records)
            + speculative_rows(records) + gpu_rows(gpu))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    records, gpu = read_results(args.results_dir), read_gpu_results(args.results_dir)
    summary = summary_rows(records, gpu)
    print_table("Benchmark summary", summary)
    write_result("summary", {"rows": summary}, args.results_dir)
    text = args.readme.read_text() if args.readme.exists() else ""
    args.readme.write_text(replace_section(text, section(records, gpu, summary, args.results_dir, args.readme)))
    print(f"wrote the benchmark section of {args.readme}")


if __name__ == "__main__":
    main()
