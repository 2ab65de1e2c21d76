import pytest
from click.testing import CliRunner

from model import GPTConfig
from model.cli_options import env_name, flag_name
from trainer.cli import main
from trainer.settings import TrainerSettings
from trainer.train import sequence_length


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in TrainerSettings.model_fields:
        monkeypatch.delenv(env_name(TrainerSettings, name), raising=False)


def test_defaults_are_the_seed_hyperparameters():
    s = TrainerSettings()
    seed = dict(batch_size=16, lr=6e-4, weight_decay=0.1, steps=5000, warmup_steps=100, grad_clip=1.0)
    assert {k: getattr(s, k) for k in seed} == seed
    # The seed's 128 tokens per sequence, where the model's context allows it.
    assert sequence_length(s, GPTConfig.from_preset(s.preset)) == 128
    assert sequence_length(s, GPTConfig.from_preset("tiny")) == 64
    assert (s.data, str(s.out), s.val_fraction) == ("input.txt", "checkpoints", 0.1)
    assert (s.init, s.preset, s.compile) == ("scratch", "mini", None)


def test_flag_beats_environment_beats_default(monkeypatch):
    from model.cli_options import build_settings

    monkeypatch.setenv("TRAINER_STEPS", "7")
    monkeypatch.setenv("TRAINER_LR", "0.001")
    monkeypatch.setenv("TRAINER_COMPILE", "true")
    s = build_settings(TrainerSettings, {"steps": 9, "lr": None, "compile": None})
    assert (s.steps, s.lr, s.compile, s.batch_size) == (9, 0.001, True, 16)


def test_help_documents_every_option_with_its_variable():
    result = CliRunner().invoke(main, ["fit", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in TrainerSettings.model_fields:
        assert flag_name(name) in text
        assert env_name(TrainerSettings, name) in text


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--steps", "0"], {}, "--steps / TRAINER_STEPS"),
        (["--val-fraction", "1.5"], {}, "--val-fraction / TRAINER_VAL_FRACTION"),
        ([], {"TRAINER_LR": "fast"}, "--lr / TRAINER_LR"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], {}, "--min-lr (0.001) must not exceed --lr"),
        (["--preset", "huge"], {}, "'huge' is not one of"),
        (["--dtype", "fp8"], {}, "'fp8' is not one of"),
        (["--device", "tpu"], {}, "--device: unknown device 'tpu'"),
    ],
)
def test_bad_options_are_usage_errors(monkeypatch, tmp_path, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["fit", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
