"""Speculative decoding on trained models: tokens/s with it off and on, at batch 1, against the batch-1 bound.

    python -m bench.bench_speculative [--rounds 5] [--new-tokens 48] [--prompts 4] [--threads 1]

The models are the ones a user trains with the README's "Speculative decoding" commands: the target is
the `mini` preset (the quality race's model), the draft the `tiny` preset with the target's 256-token
context, each a `trainer fit` on tiny-shakespeare with the same data flags, so the draft sees the target's
batches. They are cached under .cache/bench/speculative/ and reused while their recorded settings match
(the output says whether they were trained in this run or found there). Both are served as the service
serves them: fp32, on our decode kernels where they were built (else oneDNN's packed weights).

Workloads, each at batch 1, greedy and seeded sampling (temperature 0.8, top-k 50):
- continuation: passages of the validation text (the last tenth, which neither model trained on), continued;
- rewrite: a passage, a blank line and the passage's first line again, so that a model that has learnt to
  copy writes the passage out a second time: prompt lookup's case.
Speculation off, prompt lookup, the draft model and both take turns in --rounds rounds in this one process
(medians); every run's tokens are checked equal to plain decoding's. The batch-1 bound is the target's
weight bytes per token over the memory-read bandwidth measured in the same run (bench/peers.py).

Never a loss: drafts that (almost) never match, timed on and off in alternated rounds, 16 requests of seeded
sampling one after another (batch 1) and together (batch 16): a draft model of random weights, and prompt
lookup on prompts made to mislead it (a passage whose words are shuffled: its word pairs recur in the text
with other words after them). Greedy text of these models falls into loops that lookup predicts from the
text itself, so it would not mislead.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import peers, report
from bench.common import SHAKESPEARE, print_table, write_result
from model import GPT, Engine, GPTConfig, SamplingParams, Tokenizer, load_checkpoint
from model.device import cpu_layout
from model.native import status as kernel_status
from model.sampling import KEY_BITS, sample

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench" / "speculative"
# `trainer fit` flags shared by both models: the same data, batches and schedule.
DATA_FLAGS = ["--seq-len", "256", "--batch-size", "8", "--steps", "300", "--warmup-steps", "30", "--lr", "2e-3",
              "--min-lr", "2e-4", "--eval-interval", "50", "--log-interval", "25", "--device", "cpu",
              "--seed", "1337"]  # fmt: skip
MODELS = {"target": ["--preset", "mini"], "draft": ["--preset", "tiny", "--block-size", "256"]}
SAMPLINGS = {"greedy": dict(temperature=0.0), "seeded sampling": dict(temperature=0.8, top_k=50)}
SPECULATION = {"off": dict(), "lookup": dict(prompt_lookup=True), "draft": dict(draft=True),
               "lookup + draft": dict(prompt_lookup=True, draft=True)}  # fmt: skip
PASSAGE_LINES = 5
NEVER_BATCHES = (1, 16)
# Greedy text of a model trained for minutes falls into loops, which prompt lookup then predicts from the
# text itself: sampled text is where its drafts miss.
NEVER_SAMPLING = "seeded sampling"
NEVER_ROUNDS = 4  # runs of the 16 requests together per round at batch 16


def flag_settings(flags: list[str]) -> dict[str, str]:
    return {flags[i].removeprefix("--").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}


def trained(name: str) -> tuple[GPT, dict, str]:
    """Model `name`, trained now by `trainer fit` or found in the cache from an earlier run with the same flags."""
    out = CACHE / name
    flags = [*MODELS[name], *DATA_FLAGS]
    path = out / "final_model.pt"
    if path.exists():
        model, meta = load_checkpoint(path)
        recorded = meta.get("settings", {})
        if Path(recorded.get("data", "")).name == SHAKESPEARE.name and all(
            str(recorded.get(key)) == value or _same_number(recorded.get(key), value)
            for key, value in flag_settings(flags).items()
        ):
            return model, meta, f"cached in {path.relative_to(ROOT)} by an earlier run"
    start = time.perf_counter()
    command = [sys.executable, "-m", "trainer", "fit", "--data", str(SHAKESPEARE), "--out", str(out), *flags]
    print(f"\ntraining the {name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    model, meta = load_checkpoint(path)
    return model, meta, f"trained in this run ({time.perf_counter() - start:.0f} s)"


def _same_number(recorded, wanted: str) -> bool:
    try:
        return float(recorded) == float(wanted)
    except (TypeError, ValueError):
        return False


def passages(tokenizer: Tokenizer, count: int, lines: int, seed: int = 0) -> list[str]:
    """`count` passages of `lines` lines from the validation text (its last tenth), each from a speech's start."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    rows = text[int(len(text) * 0.9) :].splitlines()
    # A speech starts after a blank line with its speaker's name; take the lines after the name.
    starts = [i + 2 for i in range(len(rows) - lines - 2) if not rows[i] and all(rows[i + 1 : i + 2 + lines])]
    chosen = random.Random(seed).sample(starts, count)
    return ["\n".join(rows[s : s + lines]) for s in chosen]


def workloads(tokenizer: Tokenizer, count: int) -> dict[str, list[list[int]]]:
    texts = passages(tokenizer, count, PASSAGE_LINES)
    shuffler = random.Random(1)
    misleading = []
    for text in passages(tokenizer, count, PASSAGE_LINES, seed=2):
        words = text.split()
        shuffler.shuffle(words)
        misleading.append(" ".join(words))
    return {
        "continuation": [tokenizer.encode(t + "\n") for t in texts],
        "rewrite": [tokenizer.encode(t + "\n\n" + t.splitlines()[0] + "\n") for t in texts],
        "misleading": [tokenizer.encode(t + "\n") for t in misleading],
    }


class Runner:
    """One engine per speculation setting, kept across rounds as a service keeps its engine (the planner's
    pass timings with it); every run's tokens are checked against plain decoding's."""

    def __init__(self, target: GPT, draft: GPT | None, batch: int):
        self.target, self.draft, self.batch = target, draft, batch
        self.engines: dict[str, Engine] = {}
        self.reference: dict[tuple, list[list[int]]] = {}

    def engine(self, setting: str) -> Engine:
        if setting not in self.engines:
            options = dict(SPECULATION[setting])
            draft = self.draft if options.pop("draft", False) else None
            self.engines[setting] = Engine(self.target, max_batch_size=self.batch, draft_model=draft, **options)
        return self.engines[setting]

    def run(self, setting: str, prompts: list[list[int]], sampling: str, new_tokens: int, key: tuple) -> dict:
        engine = self.engine(setting)
        params = [SamplingParams(max_new_tokens=new_tokens, stop_at_eot=False, seed=i, **SAMPLINGS[sampling])
                  for i in range(len(prompts))]  # fmt: skip
        stats = engine.planner.stats if engine.planner else None
        before = (dict(stats.proposed), dict(stats.accepted)) if stats else ({}, {})
        ids = [engine.add(prompt, p) for prompt, p in zip(prompts, params)]
        out: dict = {i: [] for i in ids}
        passes = 0
        start = time.perf_counter()
        while engine.has_work():
            for event in engine.step():
                out[event.request_id].append(event.token)
            passes += 1
        seconds = time.perf_counter() - start
        tokens = [out[i] for i in ids]
        reference = self.reference.setdefault((key, sampling), tokens)
        assert tokens == reference, f"{setting} changed the tokens of {key} ({sampling})"
        count = sum(map(len, tokens))
        result = {"tokens_per_s": count / seconds, "tokens_per_pass": count / passes, "tokens": count,
                  "seconds": seconds}  # fmt: skip
        if stats:
            for source in ("lookup", "draft"):
                proposed = stats.proposed[source] - before[0].get(source, 0)
                accepted = stats.accepted[source] - before[1].get(source, 0)
                result[f"{source}_proposed"], result[f"{source}_accepted"] = proposed, accepted
        return result


def warm_up(runner: Runner, settings, prompt: list[int]) -> None:
    """One short request per engine: kernels and buffers warm, the planner's first pass timings taken."""
    for setting in settings:
        for sampling in SAMPLINGS:
            runner.run(setting, [prompt] * runner.batch, sampling, 16, ("warm-up",))


def summarise(runs: list[dict], off: list[dict] | None) -> dict:
    """Medians of alternated rounds, and acceptance over all of them."""
    row = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
           "tokens_per_pass": statistics.median(r["tokens_per_pass"] for r in runs)}  # fmt: skip
    if off is not None:
        row["vs_off"] = row["tokens_per_s"] / statistics.median(r["tokens_per_s"] for r in off)
    for source in ("lookup", "draft"):
        proposed = sum(r.get(f"{source}_proposed", 0) for r in runs)
        row[f"{source}_acceptance"] = sum(r.get(f"{source}_accepted", 0) for r in runs) / proposed if proposed else None
        row[f"{source}_proposed"] = proposed
    return row


def agreement(target: GPT, draft: GPT, prompts: list[list[int]], setting: dict) -> dict:
    """How often the draft model picks the target's token at a position, sampling with `setting`, over every
    position of `prompts` (the text itself, not the models' own): with the position's key shared, as the
    engine drafts; with independent keys; and the best any coupling can do, 1 - total variation distance."""
    same = independent = best = positions = 0.0
    keys = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            p_logits, q_logits = target(x)[0][0].float(), draft(x)[0][0].float()
            n = len(ids)
            params = (torch.full((n,), setting.get("temperature", 1.0)), torch.full((n,), setting.get("top_k") or 0),
                      torch.full((n,), setting.get("top_p", 1.0)))  # fmt: skip
            shared = torch.randint(2**KEY_BITS, (n,), generator=keys)
            other = torch.randint(2**KEY_BITS, (n,), generator=keys)
            picked = sample(p_logits, *params, shared)
            same += (picked == sample(q_logits, *params, shared)).sum().item()
            independent += (picked == sample(q_logits, *params, other)).sum().item()
            best += (1 - 0.5 * (kept(p_logits, setting) - kept(q_logits, setting)).abs().sum(dim=-1)).sum().item()
            positions += n
    return {"shared_keys": same / positions, "independent_keys": independent / positions,
            "best_coupling": best / positions, "positions": int(positions)}  # fmt: skip


def kept(logits: torch.Tensor, setting: dict) -> torch.Tensor:
    """Each row's sampling distribution under `setting` (temperature and top-k), in float64."""
    top = logits.double().topk(setting.get("top_k") or logits.shape[-1], dim=-1)
    weights = torch.softmax(top.values / setting.get("temperature", 1.0), dim=-1)
    return torch.zeros_like(logits, dtype=torch.float64).scatter_(-1, top.indices, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of every setting")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--prompts", type=int, default=4, help="requests per workload at batch 1, one after another")
    # One thread, as bench/bench_kernels.py: on a shared 2-core machine a second OpenMP thread waits at every
    # op for a core that another process holds, which times the load rather than the engine.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the bandwidth is measured with them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threads = args.threads
    tokenizer = Tokenizer()

    models, raw = {}, {}
    for name in MODELS:
        model, meta, provenance = trained(name)
        raw[name] = model.float().eval()
        c = model.config
        models[name] = {"model": cpu_layout(copy.deepcopy(raw[name])), "preset": MODELS[name][1],
                        "shape": f"{c.n_layer}×{c.n_head}×{c.n_embd}, context {c.block_size}",
                        "parameters": model.num_parameters(non_embedding=False), "step": meta.get("step"),
                        "val_loss": meta.get("val_loss"), "provenance": provenance}  # fmt: skip
        print(f"{name}: {models[name]['shape']}, val loss {meta.get('val_loss'):.3f} at step {meta.get('step')}, "
              f"{provenance}", flush=True)  # fmt: skip
    target, draft = models["target"]["model"], models["draft"]["model"]
    work = workloads(tokenizer, max(args.prompts, max(NEVER_BATCHES)))
    coupling = agreement(raw["target"], raw["draft"], work["continuation"], SAMPLINGS["seeded sampling"])
    print_table("The draft model's pick against the target's, seeded sampling, teacher-forced over "
                f"{coupling['positions']} positions of the validation text", [coupling])  # fmt: skip
    torch.manual_seed(0)
    random_draft = cpu_layout(GPT(GPTConfig.from_preset("tiny", block_size=target.config.block_size)).eval())

    bandwidth = peers.read_bandwidth()
    bound = bandwidth / peers.bytes_per_token(target, 4)
    print_table("Memory-read bandwidth and the target's batch-1 bound (fp32 weights, each read once per token)",
                [{"bandwidth_GB_per_s": bandwidth / 1e9, "bound_tokens_per_s": bound}])  # fmt: skip

    runner = Runner(target, draft, 1)
    warm_up(runner, SPECULATION, work["continuation"][0])
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for workload in ("continuation", "rewrite"):
            for sampling in SAMPLINGS:
                for setting in SPECULATION:
                    prompts = work[workload][: args.prompts]
                    result = runner.run(setting, prompts, sampling, args.new_tokens, (workload,))
                    runs.setdefault((workload, sampling, setting), []).append(result)
    rows = []
    for (workload, sampling, setting), results in runs.items():
        row = summarise(results, runs[(workload, sampling, "off")] if setting != "off" else None)
        rows.append({"workload": workload, "sampling": sampling, "speculation": setting, "batch": 1, **row,
                     "of_bound": row["tokens_per_s"] / bound})  # fmt: skip
    print_table(f"Batch 1, {args.prompts} requests of {args.new_tokens} tokens per run, medians of {args.rounds} "
                f"alternated rounds, {threads} threads", rows)  # fmt: skip

    never = []
    for batch in NEVER_BATCHES:
        cases = {"random-weight draft model": (Runner(target, random_draft, batch), "draft", "continuation"),
                 "lookup on misleading text": (Runner(target, None, batch), "lookup", "misleading")}  # fmt: skip
        for name, (case, setting, workload) in cases.items():
            # The same 16 requests at both batch sizes. On and off take turns run by run, which goes first
            # alternating: at batch 1 a run is one request (a fifth of a second), at 16 all of them, with
            # NEVER_ROUNDS times the rounds. This machine's speed drifts by a fifth between runs of the same
            # work, CPU time included; short turns put the drift on both alike, and the totals compare.
            prompts = work[workload][: max(NEVER_BATCHES)]
            warm_up(case, ("off", setting), prompts[0])
            timings: dict[str, list[dict]] = {"off": [], setting: []}
            runs = [(i, [p]) for i, p in enumerate(prompts)] if batch == 1 else [(0, prompts)] * NEVER_ROUNDS
            for round_ in range(args.rounds):
                for turn, (index, run) in enumerate(runs):
                    order = list(timings) if (round_ + turn) % 2 == 0 else list(timings)[::-1]
                    for which in order:
                        key = (workload, batch, index)
                        timings[which].append(case.run(which, run, NEVER_SAMPLING, args.new_tokens, key))
            rate = {which: sum(r["tokens"] for r in results) / sum(r["seconds"] for r in results)
                    for which, results in timings.items()}  # fmt: skip
            row = summarise(timings[setting], None)
            never.append({"drafts": name, "batch": batch, "off_tokens_per_s": rate["off"],
                          "on_tokens_per_s": rate[setting], "on_vs_off": rate[setting] / rate["off"],
                          "proposed": row[f"{setting}_proposed"],
                          "acceptance": row[f"{setting}_acceptance"]})  # fmt: skip
            print_table(f"Never a loss: {name}, batch {batch}", never[-1:])
    print_table(f"Never a loss: drafts that (almost) never match, {NEVER_SAMPLING}", never)

    # What the target writes, plainly decoded: the first request of each workload (the rows' tokens are these).
    samples = {f"{workload}, {sampling}": tokenizer.decode(runner.reference[(workload,), sampling][0])
               for workload in ("continuation", "rewrite") for sampling in SAMPLINGS}  # fmt: skip
    record = {
        "samples": samples, "threads": threads, "new_tokens": args.new_tokens, "prompts": args.prompts, "rounds": args.rounds,
        "passage_lines": PASSAGE_LINES, "samplings": SAMPLINGS, "never_a_loss_sampling": NEVER_SAMPLING,
        "layout": f"fp32, {kernel_status()}",
        "models": {name: {k: v for k, v in m.items() if k != "model"} for name, m in models.items()},
        "bandwidth_bytes_per_s": bandwidth, "batch1_bound_tokens_per_s": bound, "agreement": coupling, "rows": rows,
        "never_a_loss": never,
    }  # fmt: skip
    print_table("Issue 25's goals", report.speculative_rows({"speculative": record}))
    write_result("speculative", record)


if __name__ == "__main__":
    main()
