"""The README's promises that a test can hold it to: its commands and its configuration reference."""

from pathlib import Path

from model.cli_options import env_name, flag_name
from service.settings import ServiceSettings
from trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_commands_are_the_makefile_targets_ci_runs():
    assert "make up" in README.split("\n## ")[0] and "make test" in README.split("\n## ")[0]
    makefile = (ROOT / "Makefile").read_text()
    assert "\nup:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_in_the_configuration_reference(up_module):
    for settings in (TrainerSettings, ServiceSettings, up_module.UpSettings):
        for name, field in settings.model_fields.items():
            assert f"`{env_name(settings, name)}`" in README, name
            assert flag_name(name) in README, name
            assert field.description in README, name
