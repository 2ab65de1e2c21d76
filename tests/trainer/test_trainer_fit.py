import pytest
import torch
from click.testing import CliRunner
from trainerkit import tiny_flags

from model import load_checkpoint, read_checkpoint
from trainer.cli import main
from trainer.train import learning_rate

SEED_KEYS = ("step", "loss", "val_loss", "best_loss", "learning_rate")


def test_run_publishes_best_last_final_and_metrics(fit, tmp_path, records):
    out = tmp_path / "run"
    result = fit(out, "--steps", "12", "--eval-interval", "4", "--checkpoint-interval", "5", "--log-interval", "3",
                 "--lr", "3e-3", "--warmup-steps", "2")
    logged = records(out)
    assert [r["step"] for r in logged] == [3, 4, 6, 8, 9, 12]
    for r in logged:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed"} <= set(r)
        assert r["lr"] == pytest.approx(learning_rate(r["step"] - 1, 3e-3, 6e-5, 2, 12))
    evals = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}
    assert list(evals) == [4, 8, 12]

    best = read_checkpoint(out / "best_model.pt")
    best_step = min(evals, key=evals.get)
    assert best["step"] == best["best_step"] == best_step
    assert best["val_loss"] == best["best_loss"] == evals[best_step]
    final = read_checkpoint(out / "final_model.pt")
    last = read_checkpoint(out / "last.pt")
    for ckpt in (final, last):
        assert ckpt["step"] == 12
        assert ckpt["val_loss"] == evals[12]
        assert ckpt["best_loss"] == evals[best_step]
        assert ckpt["loss"] == logged[-1]["loss"]
        assert ckpt["learning_rate"] == pytest.approx(logged[-1]["lr"])
        assert ckpt["settings"]["steps"] == 12 and ckpt["tokens"] == 12 * 4 * 32
    assert all(key in ckpt for ckpt in (best, final, last) for key in SEED_KEYS)
    assert "optimizer" in last and "optimizer" not in final
    assert f"Saved best model (val loss {evals[best_step]:.4f}, step {best_step})" in result.output
    assert "step 12 | lr" in result.output and "tok/s" in result.output and "Finished at step 12" in result.output
    assert "% (est.)" in result.output  # MFU is an estimate: its CPU peak is a measurement

    model, _ = load_checkpoint(out / "final_model.pt")
    assert model.config.n_layer == 2 and model.config.n_embd == 32


def test_training_lowers_validation_loss(fit, tmp_path, records):
    fit(tmp_path, "--steps", "30", "--eval-interval", "10", "--lr", "1e-2", "--warmup-steps", "3")
    val = [r["val_loss"] for r in records(tmp_path) if "val_loss" in r]
    assert val[0] < 10.8 and val[-1] < val[0] - 1.5, val


def test_resume_continues_exactly(fit, tmp_path, records):
    common = ("--eval-interval", "5", "--lr", "3e-3", "--warmup-steps", "3", "--lr-decay-steps", "20")
    fit(tmp_path / "once", "--steps", "20", *common)
    fit(tmp_path / "twice", "--steps", "10", *common)
    result = fit(tmp_path / "twice", "--steps", "20", "--resume", *common)
    assert "resuming at step 10" in result.output

    once, twice = records(tmp_path / "once"), records(tmp_path / "twice")
    assert [r["step"] for r in twice] == list(range(1, 21))
    assert [r["loss"] for r in twice] == [r["loss"] for r in once]
    assert [r.get("val_loss") for r in twice] == [r.get("val_loss") for r in once]
    a, b = (read_checkpoint(tmp_path / run / "final_model.pt") for run in ("once", "twice"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (a["best_loss"], a["best_step"], a["tokens"]) == (b["best_loss"], b["best_step"], b["tokens"])


def test_resume_without_last_starts_afresh(fit, tmp_path):
    result = fit(tmp_path, "--steps", "2", "--resume")
    assert "no " in result.output and "starting a new run" in result.output
    assert read_checkpoint(tmp_path / "final_model.pt")["step"] == 2


def test_divergence_stops_with_error_and_keeps_good_checkpoints(fit, tmp_path):
    fit(tmp_path, "--steps", "4", "--eval-interval", "2")
    before = {name: (tmp_path / name).read_bytes() for name in ("best_model.pt", "last.pt", "final_model.pt")}
    result = fit(tmp_path, "--resume", "--steps", "40", "--lr", "1e38", "--min-lr", "1e38", "--warmup-steps", "0",
                 "--eval-interval", "1000", "--checkpoint-interval", "1000", expect=1)
    assert "training diverged" in result.output and "try a lower --lr" in result.output
    assert "Traceback" not in result.output
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_shape_overrides_and_bad_shapes(fit, tmp_path):
    fit(tmp_path / "wide", "--steps", "1", "--n-layer", "3", "--n-embd", "48", "--n-head", "3", "--block-size", "40")
    config = read_checkpoint(tmp_path / "wide" / "final_model.pt")["config"]
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["block_size"]) == (3, 48, 3, 40)
    result = fit(tmp_path / "bad", "--n-embd", "30", "--n-head", "4", expect=1)
    assert "must be divisible by n_head" in result.output
    result = fit(tmp_path / "long", "--seq-len", "65", expect=1)
    assert "--seq-len 65 exceeds the model's context of 64 tokens" in result.output


def test_seq_len_defaults_to_the_models_context_up_to_128(cache_dir, tmp_path):
    for block_size, expected in ((None, 64), ("200", 128)):
        flags = tiny_flags(cache_dir, tmp_path / str(block_size), "--steps", "1")
        at = flags.index("--seq-len")
        del flags[at : at + 2]
        if block_size:
            flags += ["--block-size", block_size]
        result = CliRunner().invoke(main, ["fit", *flags])
        assert result.exit_code == 0, result.output
        assert f"{expected} tokens per sequence" in result.output
        final = read_checkpoint(tmp_path / str(block_size) / "final_model.pt")
        assert final["settings"]["seq_len"] == expected and final["tokens"] == 4 * expected


def test_the_first_checkpoint_comes_after_a_few_steps_then_at_the_interval(fit, tmp_path, records):
    result = fit(tmp_path, "--steps", "25", "--eval-interval", "20", "--lr", "3e-3", "--warmup-steps", "2")
    assert [r["step"] for r in records(tmp_path) if "val_loss" in r] == [10, 20, 25]
    assert read_checkpoint(tmp_path / "best_model.pt")["best_step"] in (10, 20, 25)
    assert "Saved best model (val loss" in result.output and ", step 10) to" in result.output


def test_init_from_checkpoint_and_hf_folder(fit, trained, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=48)).save_pretrained(hf_dir)
    for source in (hf_dir, trained / "final_model.pt"):
        out = tmp_path / source.name
        fit(out, "--steps", "1", "--init", str(source), "--lr", "1e-12", "--min-lr", "0", "--weight-decay", "0")
        start = GPT2LMHeadModel.from_pretrained(hf_dir) if source == hf_dir else load_checkpoint(source)[0]
        wte = start.state_dict()["transformer.wte.weight"]
        after = read_checkpoint(out / "final_model.pt")["model"]["transformer.wte.weight"]
        assert torch.allclose(after[: wte.shape[0]], wte, atol=1e-6)
    assert read_checkpoint(tmp_path / "hf" / "final_model.pt")["config"]["block_size"] == 48


def test_unknown_init_is_explained(fit, tmp_path):
    result = fit(tmp_path, "--init", "gpt3", expect=1)
    assert "--init: 'gpt3' is neither a directory" in result.output


def test_gradient_accumulation_equals_the_larger_batch(fit, tmp_path, records):
    common = ("--steps", "4", "--eval-interval", "2", "--lr", "3e-3", "--warmup-steps", "1")
    fit(tmp_path / "big", "--batch-size", "4", "--grad-accum", "1", *common)
    fit(tmp_path / "accum", "--batch-size", "2", "--grad-accum", "2", *common)
    big, accum = records(tmp_path / "big"), records(tmp_path / "accum")
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in big], abs=1e-5)
    a = read_checkpoint(tmp_path / "big" / "final_model.pt")["model"]
    b = read_checkpoint(tmp_path / "accum" / "final_model.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bf16_autocast_and_compile_train_like_fp32(fit, tmp_path, records):
    common = ("--steps", "3", "--eval-interval", "3", "--lr", "3e-3", "--warmup-steps", "1")
    fit(tmp_path / "fp32", *common)
    bf16 = fit(tmp_path / "bf16", *common, "--dtype", "bf16")
    assert "in bfloat16" in bf16.output
    compiled = fit(tmp_path / "compiled", *common, "--compile")
    assert "compiled block by block" in compiled.output and "compiled block by block" not in bf16.output
    reference = [r["loss"] for r in records(tmp_path / "fp32")]
    assert [r["loss"] for r in records(tmp_path / "bf16")] == pytest.approx(reference, abs=0.05)
    assert [r["loss"] for r in records(tmp_path / "compiled")] == pytest.approx(reference, abs=1e-4)
    state = read_checkpoint(tmp_path / "compiled" / "final_model.pt")["model"]
    assert not any("_orig_mod" in key for key in state)
