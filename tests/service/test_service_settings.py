"""`service serve` settings: every one a documented flag and a SERVICE_* variable, checked early."""

from __future__ import annotations

from click.testing import CliRunner

from service.cli import main
from service.settings import ServiceSettings


def test_help_documents_every_setting_with_its_variable_and_default():
    # Compared without whitespace: click wraps the help text, at hyphens too.
    text = "".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    for name, field in ServiceSettings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert f"env:SERVICE_{name.upper()}" in text, name
        assert field.description and "".join(field.description.split()) in text, name


def test_bad_values_are_usage_errors_naming_flag_and_variable():
    result = CliRunner().invoke(main, ["serve", "--max-batch-size", "0"])
    assert result.exit_code == 2
    assert "--max-batch-size / SERVICE_MAX_BATCH_SIZE" in result.output
    result = CliRunner().invoke(main, ["serve"], env={"SERVICE_PORT": "80"})
    assert result.exit_code == 2
    assert "--port / SERVICE_PORT" in result.output


def test_flags_beat_environment_beat_defaults(monkeypatch):
    monkeypatch.setenv("SERVICE_MAX_BATCH_SIZE", "4")
    assert ServiceSettings().max_batch_size == 4
    assert ServiceSettings(max_batch_size=2).max_batch_size == 2
    monkeypatch.delenv("SERVICE_MAX_BATCH_SIZE")
    assert ServiceSettings().max_batch_size == 16
    assert ServiceSettings().api_key is None


def test_settings_that_do_not_fit_the_machine_are_usage_errors(tmp_path, monkeypatch):
    # `serve` sets these for its children: recorded here so that they are restored afterwards.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    result = CliRunner().invoke(main, ["serve", "--checkpoint-dir", str(tmp_path), "--device", "cuda:7"])
    assert result.exit_code == 2
    assert "cuda:7" in result.output


def test_an_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("SERVICE_API_KEY", "")
    assert ServiceSettings().api_key is None
    monkeypatch.setenv("SERVICE_API_KEY", "k")
    assert ServiceSettings().api_key.get_secret_value() == "k"


def test_a_draft_folder_means_its_best_checkpoint_and_draft_lengths_are_auto_or_one_to_eight(tmp_path):
    assert ServiceSettings().draft_path is None and ServiceSettings().fixed_draft_length is None
    assert ServiceSettings(draft_checkpoint=tmp_path).draft_path == tmp_path.resolve() / "best_model.pt"
    assert ServiceSettings(draft_checkpoint=tmp_path / "d.pt").draft_path == tmp_path.resolve() / "d.pt"
    assert ServiceSettings(draft_length="8").fixed_draft_length == 8
    result = CliRunner().invoke(main, ["serve", "--draft-length", "9"])
    assert result.exit_code == 2 and "'9' is not one of 'auto', '1'" in result.output
