import torch
from click.testing import CliRunner

from model import Tokenizer, load_checkpoint
from trainer.cli import main
from tolerance import logits_bound


def run(*args, expect=0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result.output


def test_sample_is_reproducible_per_seed(trained):
    ckpt = str(trained / "best_model.pt")
    args = ("sample", "--checkpoint", ckpt, "--prompt", "The list", "--num-samples", "2", "--max-new-tokens", "12",
            "--device", "cpu")
    first = run(*args, "--seed", "3")
    samples = first.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("The list") for s in samples)
    assert samples[0] != samples[1]
    assert run(*args, "--seed", "3") == first
    assert run(*args, "--seed", "4") != first
    greedy = run(*args, "--temperature", "0").rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert greedy[0] == greedy[1]


def test_export_loads_in_transformers_with_equal_logits(trained, tmp_path):
    from transformers import GPT2LMHeadModel

    output = run("export", "--checkpoint", str(trained / "final_model.pt"), "--hf", str(tmp_path / "hf"))
    assert "Wrote" in output
    ours, _ = load_checkpoint(trained / "final_model.pt")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([Tokenizer().encode("def main():\n    return 0")])
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() <= logits_bound(ours, idx)


def test_info_shows_config_progress_and_size(trained):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    output = run("info", str(trained / "last.pt"))
    rows = dict(line.split(None, 1) for line in output.splitlines())
    assert rows["step"] == "6" and rows["n_layer"] == "2" and rows["n_embd"] == "32"
    assert rows["val_loss"] == f"{ckpt['val_loss']:.6g}" and rows["best_loss"] == f"{ckpt['best_loss']:.6g}"
    assert rows["resumable"] == "yes" and "MiB" in rows["file"]


def test_commands_explain_bad_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for args in (("info", str(junk)), ("export", "--checkpoint", str(junk), "--hf", str(tmp_path / "x")),
                 ("sample", "--checkpoint", str(junk))):
        output = run(*args, expect=1)
        assert f"{junk}: not a readable checkpoint" in output and "Traceback" not in output


def test_sample_refuses_a_prompt_that_fills_the_context(trained):
    prompt = "word " * 80  # 81 tokens: 80 words and the trailing space
    output = run("sample", "--checkpoint", str(trained / "best_model.pt"), "--prompt", prompt, expect=1)
    assert "the prompt's 81 tokens plus max_new_tokens 1 exceed the context of 64 tokens" in output
