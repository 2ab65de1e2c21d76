"""`--dtype auto` trains in the precision it measured faster at the run's shape, and keeps it on resume; the
MFU estimate never shows more than 100%."""

import re

import torch

from model import GPT, GPTConfig, read_checkpoint
from trainer.precision import time_passes
from trainer.report import utilisation

CHOICE = re.compile(r"in (bfloat16|float32) \(auto: the faster at this shape; a pass (\d+) ms in bf16, (\d+) ms in fp32\)")


def test_auto_trains_in_the_precision_it_timed_faster_and_a_resume_keeps_it(fit, tmp_path):
    out = tmp_path / "run"
    first = fit(out, "--steps", "2", "--eval-interval", "2", "--dtype", "auto")
    chosen, bf16_ms, fp32_ms = CHOICE.search(first.output).groups()
    faster = "bfloat16" if int(bf16_ms) < int(fp32_ms) else "float32"
    if int(bf16_ms) != int(fp32_ms):  # equal after rounding to milliseconds: either is the faster
        assert chosen == faster
    name = {"bfloat16": "bf16", "float32": "fp32"}[chosen]
    assert read_checkpoint(out / "last.pt")["settings"]["dtype"] == name
    resumed = fit(out, "--steps", "4", "--eval-interval", "2", "--dtype", "auto", "--resume")
    assert f"in {chosen} (as the resumed run trained)" in resumed.output
    assert read_checkpoint(out / "final_model.pt")["settings"]["dtype"] == name


def test_timing_leaves_the_weights_gradients_and_random_stream_as_they_were():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.1)).train()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    seconds = time_passes(model, batch_size=8, seq_len=16, device=torch.device("cpu"))
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < float("inf") for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None and torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_the_mfu_estimate_is_unknown_rather_than_above_the_peak():
    assert utilisation(5e9, 1e10) == "50.0% (est.)"
    assert utilisation(1e10, 1e10) == "100.0% (est.)"
    assert utilisation(1.2e10, 1e10) == "unknown (peak measured under load)"
    assert utilisation(5e9, None) is None
