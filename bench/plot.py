"""PNG plots of the last `make bench` run (and of bench/gpu.sh's, where its results are in), for the README.

    python -m bench.plot [--results-dir bench/results] [--out-dir bench/results]

Draws train_quality.png (validation loss against training time, trainer and seed-style reference),
train_throughput.png, decode.png (tokens/s by engine and precision at batch 1 and batched),
decode_peers.png (the engine against llama.cpp, CTranslate2 and onnxruntime per precision and batch,
with the memory-bandwidth bound at batch 1) and
serve_sweep.png (throughput and latency percentiles against concurrency, one row per preset and
device); gpu_train.png (training loss against wall clock, with the target) when a GPU run is in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt

from bench.common import RESULTS, read_gpu_results, read_results, serve_record

plt.switch_backend("Agg")  # files only: the benchmark machines have no display
LATENCIES = (("ttft", "time to first token"), ("itl", "inter-token"), ("e2e", "end to end"))


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def train_quality(record: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("trainer_mini", "trainer, mini preset"), ("reference", "seed-style reference")):
        points = record[key]
        ax.plot([p["elapsed"] / 60 for p in points], [p["val_loss"] for p in points], marker="o", label=label)
    ax.set_xlabel("training time (minutes, each side's own clock)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Quality per minute: {Path(record['data']).name}, {record['minutes']:g} minutes each")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def train_throughput(record: dict, path: Path) -> Path:
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    names = [r["loop"] for r in rows]
    values = [r["tokens/s"] for r in rows]
    bars = ax.barh(names, values, color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    ax.bar_label(bars, labels=[f"{v:,.0f} ({r['vs reference']:.2f}×)" for v, r in zip(values, rows)], padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.35)
    shape = record["shape"]
    ax.set_xlabel("training tokens/s (best round)")
    ax.set_title(
        f"Training throughput, {shape['n_layer']}×{shape['n_head']}×{shape['n_embd']}, "
        f"batch {shape['batch']}×{shape['seq_len']}"
    )
    return save(fig, path)


def decode(record: dict, path: Path) -> Path:
    rows = [r for r in record["rows"] if r["impl"] in ("engine", "transformers")]
    variants = list(dict.fromkeys((r["impl"], r["dtype"], r["weights"]) for r in rows))
    batches = sorted({r["batch"] for r in rows})
    rate = {(r["impl"], r["dtype"], r["weights"], r["batch"]): r["tokens_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(variants))]
        values = [rate.get((*v, batch), 0.0) for v in variants]
        bars = ax.bar(xs, values, width, label=f"batch {batch}")
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8, padding=2)
    labels = [f"{impl}\n{dtype}" + (f" {w}" if w != "plain" else "") for impl, dtype, w in variants]
    ax.set_xticks(range(len(variants)), labels, fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Greedy decode, {record['preset']} shape, {record['new_tokens']} new tokens")
    ax.legend()
    return save(fig, path)


def decode_peers(record: dict, path: Path) -> Path:
    """One group of bars per precision and batch, one bar per implementation (the engine's fastest
    weight layout at that precision), the batch-1 bound as a dashed line over its group."""
    rows = [r for r in record["rows"] if r["tokens_per_s"] is not None]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    batches = sorted({r["batch"] for r in rows if r["impl"] != "engine"})
    groups = [(p, b) for p in ("fp32", "bf16", "int8") for b in batches]
    best = {}
    for r in rows:
        key = (r["impl"], r["precision"], r["batch"])
        best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        values = [best.get((impl, p, b), 0.0) for p, b in groups]
        bars = ax.bar(xs, values, width, label=impl)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=6, padding=1, rotation=90)
    for g, (precision, batch) in enumerate(groups):
        if batch == 1:
            bound = record["batch1_bound_tokens_per_s"][precision]
            ax.hlines(bound, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1)
    ax.plot([], [], "k--", linewidth=1, label="memory bound (batch 1)")
    ax.set_xticks(range(len(groups)), [f"{p}\nbatch {b}" for p, b in groups], fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Greedy decode against the peers, {record['preset']} shape, {record['threads']} threads, "
                 f"{record['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s read")  # fmt: skip
    ax.legend(fontsize=7)
    return save(fig, path)


def serve_sweep(sweeps: list[tuple[str, list[dict]]], path: Path) -> Path:
    """One row per (label, sweep): throughput on the left, latency percentiles on the right."""
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 3.6 * len(sweeps)), squeeze=False)
    for (label, sweep), (left, right) in zip(sweeps, axes):
        levels = [r["concurrency"] for r in sweep]
        left.plot(levels, [r["output_tok_per_s"] for r in sweep], marker="o")
        left.set_ylabel("output tokens/s")
        # Every request asks for the same number of tokens, so requests/s is a second scale on the same line.
        per_request = sweep[0]["output_tok_per_s"] / sweep[0]["req_per_s"]
        scale = (lambda t, k=per_request: t / k, lambda r, k=per_request: r * k)  # bound now, not at drawing
        left.secondary_yaxis("right", functions=scale).set_ylabel("requests/s")
        left.set_title(f"{label}: throughput")
        for key, name in LATENCIES:
            line = right.plot(levels, [r[f"{key}_p50_ms"] for r in sweep], marker="o", label=f"{name} p50")[0]
            right.plot(
                levels, [r[f"{key}_p95_ms"] for r in sweep], linestyle="--", color=line.get_color(), label=f"{name} p95"
            )
        right.set_yscale("log")
        right.set_ylabel("ms")
        right.set_title(f"{label}: latency")
        right.legend(fontsize=7)
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("concurrent streaming clients")
            ax.grid(alpha=0.3)
    return save(fig, path)


def gpu_train(record: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    curve = record["curve"]
    ax.plot([p["elapsed"] for p in curve], [p["loss"] for p in curve], label="training loss")
    ax.axhline(record["target_loss"], color="tab:red", linestyle="--", label=f"target {record['target_loss']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("wall clock from the first step (s, compilation included)")
    ax.set_ylabel("training loss")
    run = record["run"]
    ax.set_title(f"{run['preset']} from scratch on {record['machine'].get('gpu', run['device'])}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    records, gpu = read_results(results_dir), read_gpu_results(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        train_quality(records["train_quality"], out_dir / "train_quality.png"),
        train_throughput(records["train_throughput"], out_dir / "train_throughput.png"),
        decode(records["decode"], out_dir / "decode.png"),
        decode_peers(records["decode"], out_dir / "decode_peers.png"),
    ]
    serve = serve_record(records)
    cpu = serve["machine"]["cpu"]
    sweeps = [(f"{preset}, {cpu}", result["sweep"]) for preset, result in serve["presets"].items()]
    if "gpu_serve" in gpu:
        record = gpu["gpu_serve"]
        sweeps.append((f"{record['preset']}, {record['machine'].get('gpu', record['device'])}", record["sweep"]))
    paths.append(serve_sweep(sweeps, out_dir / "serve_sweep.png"))
    if "gpu_train" in gpu:
        paths.append(gpu_train(gpu["gpu_train"], out_dir / "gpu_train.png"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    draw(args.results_dir, args.out_dir)


if __name__ == "__main__":
    main()
