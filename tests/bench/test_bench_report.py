"""bench/report.py writes the README's benchmark section from the results, and only that section."""

from __future__ import annotations

import json
import shutil

from bench import report
from bench.common import read_results

README = """# gpt-service

Intro the team wrote.

<!-- bench:start -->
numbers typed by hand
<!-- bench:end -->

## After

Kept as it is.
"""


def section(text: str) -> str:
    return text.split(report.START, 1)[1].split(report.END, 1)[0]


def write_report(results, readme):
    report.main(["--results-dir", str(results), "--readme", str(readme)])
    return readme.read_text()


def record_step(results, name: str, record: dict) -> None:
    """`record` written as the result of one more step of the last suite, named `name`."""
    (results / f"{name}.json").write_text(json.dumps(record))
    suite = json.loads((results / "suite.json").read_text())
    suite["steps"].append({**suite["steps"][-1], "name": name, "results": [f"{name}.json"]})
    (results / "suite.json").write_text(json.dumps(suite))


def test_the_section_between_the_markers_is_replaced_and_the_rest_kept(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    text = write_report(results, readme)
    before, after = README.split("numbers typed by hand\n")
    assert text.startswith(before) and text.endswith(after)
    body = section(text)
    assert "numbers typed by hand" not in body
    assert "| benchmark | measured | reference (same run) | result | goal | met |" in body
    # Figures of the fixture's run: trainer fp32 compiled 2,394 vs the reference 2,117 tokens/s.
    assert (
        "| Training throughput (4×4×128, batch 16×128, CPU with native bf16) | trainer fp32 compiled: 2,394 tokens/s "
        "| seed-style loop: 2,117 tokens/s | 1.13× | ≥ 2× | **no** |" in body
    )
    assert "| Serving overhead (mini, one client) | HTTP streaming: 226 tokens/s" in body
    assert "0.89× | ≥ 0.95× | **no** |" in body
    assert "![decode tokens/s](bench/results/decode.png)" in body
    assert "random weights, fp32, packed for oneDNN, 1 decode thread(s)" in body
    assert "Last run on Intel(R) Xeon(R) Processor (2 cores), torch 2.13.0+cpu, commit `164a303`" in body
    assert "18.2 minutes" in body  # the steps' seconds in suite.json: 620 + 150 + 320
    # Written again from the same results, the README does not change.
    assert write_report(results, readme) == text


def test_every_summary_ratio_is_in_summary_json(results, tmp_path):
    write_report(results, tmp_path / "README.md")
    summary = json.loads((results / "summary.json").read_text())
    names = [row["benchmark"] for row in summary["rows"]]
    assert names[:3] == [
        "Training throughput (4×4×128, batch 16×128, CPU with native bf16)",
        "Training MFU (same loop, an estimate)",
        "Quality per minute (10 min each, tinyshakespeare.txt)",
    ]
    assert {"Batched decode (batch 8)", "Serving batching (gpt2, 16 clients)"} <= set(names)
    assert summary["machine"]["cores"] and summary["commit"] and summary["date"]


def test_markers_are_appended_when_the_readme_has_none(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# gpt-service\n\nNo section yet.\n")
    text = write_report(results, readme)
    assert text.startswith("# gpt-service\n\nNo section yet.\n\n## Performance\n\n" + report.START + "\nLast run on ")
    assert text.endswith(report.END + "\n")


def test_gpu_results_are_reported_when_present_and_explained_when_not(results, tmp_path):
    readme = tmp_path / "README.md"
    body = section(write_report(results, readme))
    # The fixture is gpu.sh's CPU dry run: tiny, trained until a step's loss was below 7.
    assert "| GPU time to training loss < 7 (tiny from scratch) | 12 s (11 s after the first step), 17 steps |" in body
    assert "![GPU training loss against wall clock](bench/results/gpu_train.png)" in body
    assert "No GPU run is recorded yet" not in body

    shutil.rmtree(results / "gpu")
    body = section(write_report(results, readme))
    assert "No GPU run is recorded yet" in body
    assert "GPU time to training loss" not in body


def test_only_the_files_of_the_last_suite_are_read(results):
    records = read_results(results)
    assert "serve_mini_gpt2_passive" in records
    assert "serve_mini_active" not in records  # serve_stale.json: in the folder, not in suite.json


def test_the_engine_is_judged_against_the_fastest_peer_and_the_memory_bound(results, tmp_path):
    body = section(write_report(results, tmp_path / "README.md"))
    # The fixture: issue 14's figures, onnxruntime missing, 45 GB/s over gpt2's 124M weights.
    assert ("| Decode against the fastest peer (fp32, batch 1) | engine packed: 73.0 tokens/s "
            "| CTranslate2 float32: 81.0 tokens/s | 0.90× | ≥ 1× | **no** |") in body
    assert ("| Decode against the fastest peer (int8, batch 8) | engine int8: 440 tokens/s "
            "| llama.cpp q8_0: 390 tokens/s | 1.13× | ≥ 1× | yes |") in body
    assert ("| Batch-1 decode against the memory bound (bf16) | engine packed: 115 tokens/s "
            "| 45 GB/s over the weights: 182 tokens/s | 63% | ≥ 90% | **no** |") in body
    assert "| implementation | fp32 b1 | fp32 b8 | bf16 b1 | bf16 b8 | int8 b1 | int8 b8 |" in body
    assert "| llama.cpp | 79 (32/32) | 343 (32/32) | 163 (32/32) | 547 (32/32) | 212 (30/32) | 390 (30/32) |" in body
    assert "| onnxruntime | missing | missing | — | — | missing | missing |" in body
    assert "- onnxruntime int8: pip install failed (.cache/bench/install-onnxruntime.log)" in body
    assert "![decode tokens/s by precision against the peers](bench/results/decode_peers.png)" in body
    assert "| part of a decode step | engine bf16 packed, batch 1 | engine bf16 packed, batch 8 |" in body
    assert "| linear layers (they read the weights) | 6.9 ms (79%) | 11.2 ms (72%) |" in body
    assert "| Python and dispatch (no op running) | 0.6 ms (7%) | 0.8 ms (5%) |" in body
    summary = json.loads((results / "summary.json").read_text())
    assert sum(row["benchmark"].startswith("Decode against the fastest peer") for row in summary["rows"]) == 6


def test_what_batch_invariance_costs_is_reported_beside_the_plain_path(results, tmp_path):
    body = section(write_report(results, tmp_path / "README.md"))
    assert "### What batch invariance costs" in body
    assert "| decode, engine fp32 packed, batch 8 | 416 | 430 | 0.967 |" in body
    assert "| serving gpt2, 16 streaming client(s) | 450 | 500 | 0.9 |" in body
    assert ("| Batch invariance's price (gpt2, 16 clients) | invariant service: 450 tokens/s "
            "| --no-batch-invariant: 500 tokens/s | 0.90× | reported | — |") in body  # fmt: skip
    assert "Batch invariance's price (mini" not in body  # a record from before it was measured


def test_the_balancers_cost_is_judged_and_a_fleet_worked_out_when_measured(results, tmp_path):
    body = section(write_report(results, tmp_path / "README.md"))
    assert "Load balancer" not in body and "### Past one machine" not in body  # a suite from before it was measured
    record = {"benchmark": "balancer", "preset": "gpt2", "direct_tok_per_s": 40.0, "balancer_tok_per_s": 39.2,
              "balancer_vs_direct": 0.98, "direct_ttft_p50_ms": 50.0, "balancer_ttft_p50_ms": 53.0,
              "ttft_p50_added_ms": 3.0}  # fmt: skip
    record_step(results, "balancer", record)
    body = section(write_report(results, tmp_path / "README.md"))
    assert ("| Load balancer (gpt2, one client) | through HAProxy: 39.2 tokens/s | the replica directly: 40.0 tokens/s "
            "| 0.98× | ≥ 0.97× | yes |") in body  # fmt: skip
    assert ("| Load balancer's time to first token (gpt2, p50) | through HAProxy: 53.0 ms "
            "| the replica directly: 50.0 ms | +3.0 ms | ≤ +2 ms | **no** |") in body  # fmt: skip
    # The fixture's gpt2 replica serves 16 clients at 140.5 tokens/s: three replicas 3 × 140.5 × 0.98.
    assert "Worked out, not measured" in body and "3 replicas 413 tokens/s" in body
    # A balancer measured faster than the replica is noise: the fleet is never worked out above N replicas.
    (results / "balancer.json").write_text(json.dumps({**record, "balancer_tok_per_s": 41.2, "balancer_vs_direct": 1.03}))
    body = section(write_report(results, tmp_path / "README.md"))
    assert "3 replicas 421 tokens/s" in body and "(measured 1.03×, counted as at most 1×)" in body


def test_speculative_decodings_goals_are_judged_when_measured(results, tmp_path):
    assert "Speculative decoding" not in section(write_report(results, tmp_path / "README.md"))
    rows = [{"workload": workload, "sampling": "greedy", "speculation": setting, "batch": 1, "tokens_per_s": rate,
             "vs_off": rate / off, "of_bound": rate / 100.0}
            for workload, off, rates in [("continuation", 50.0, {"off": 50.0, "lookup": 60.0, "draft": 70.0,
                                                                  "lookup + draft": 80.0}),
                                         ("rewrite", 40.0, {"off": 40.0, "lookup": 120.0, "draft": 30.0,
                                                             "lookup + draft": 110.0})]
            for setting, rate in rates.items()]  # fmt: skip
    model = {"preset": "mini", "shape": "4×4×256, context 256", "val_loss": 5.0, "step": 300,
             "provenance": "trained in this run (600 s)"}  # fmt: skip
    record = {"benchmark": "speculative", "samples": {"rewrite, greedy": "\n\n\n"}, "threads": 1, "new_tokens": 48,
              "prompts": 4, "rounds": 3,
              "passage_lines": 5, "samplings": {"greedy": {"temperature": 0.0}}, "never_a_loss_sampling": "greedy",
              "layout": "fp32, native",
              "models": {"target": model, "draft": {**model, "preset": "tiny"}}, "bandwidth_bytes_per_s": 6.4e9,
              "batch1_bound_tokens_per_s": 100.0, "rows": rows,
              "agreement": {"shared_keys": 0.517, "independent_keys": 0.14, "best_coupling": 0.573, "positions": 942},
              "never_a_loss": [{"drafts": "random-weight draft model", "batch": 16, "off_tokens_per_s": 500.0,
                                "on_tokens_per_s": 460.0, "on_vs_off": 0.92, "proposed": 30, "acceptance": 0.0}]}  # fmt: skip
    record_step(results, "speculative", record)
    body = section(write_report(results, tmp_path / "README.md"))
    # The fastest setting that may meet each goal: lookup on the rewrite (3×), both sources on continuation (1.6×).
    assert ("| Speculative decoding, rewrite (mini, greedy, batch 1) | lookup: 120 tokens/s "
            "| speculation off: 40.0 tokens/s | 3.00× | ≥ 2× | yes |") in body  # fmt: skip
    assert ("| Speculative decoding, continuation (mini, greedy, batch 1) | lookup + draft: 80.0 tokens/s "
            "| batch-1 bound: 100 tokens/s | 0.80× | > 1× | **no** |") in body  # fmt: skip
    assert ("| Speculative decoding never a loss: random-weight draft model, batch 16 | on: 460 tokens/s "
            "| off: 500 tokens/s | 0.92× | ≥ 0.95× | **no** |") in body  # fmt: skip
    assert "### Speculative decoding on the CPU" in body and "trained in this run (600 s)" in body
    assert "- rewrite, greedy: `'\\n\\n\\n'`" in body  # what the target wrote, visible
    assert ("the same token 52% of the time with the position's key shared (as the engine drafts), 14% with "
            "independent keys, and at most 57% for any coupling") in body  # fmt: skip
