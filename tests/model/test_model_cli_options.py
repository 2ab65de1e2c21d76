from pathlib import Path
from typing import Literal

import click
from click.testing import CliRunner
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.cli_options import build_settings, settings_options


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")
    steps: int = Field(10, ge=1, description="How many steps.")
    rate: float = Field(0.5, description="A rate.")
    out: Path = Field(Path("out"), description="Where to write.")
    mode: Literal["fast", "slow"] = Field("fast", description="Which way.")
    compile: bool = Field(True, description="Compile or not.")
    port: int | None = Field(None, description="Optional port.")


@click.command()
@settings_options(DemoSettings)
def demo(**flags):
    click.echo(build_settings(DemoSettings, flags).model_dump_json())


def run(args, env=None):
    return CliRunner().invoke(demo, args, env=env or {})


def test_flags_beat_environment_beat_defaults():
    assert '"steps":10' in run([]).output
    assert '"steps":20' in run([], env={"DEMO_STEPS": "20"}).output
    result = run(["--steps", "30", "--no-compile", "--mode", "slow", "--port", "9"], env={"DEMO_STEPS": "20"})
    assert '"steps":30' in result.output
    assert '"compile":false' in result.output and '"mode":"slow"' in result.output and '"port":9' in result.output


def test_help_documents_every_option_with_default_and_variable():
    text = run(["--help"]).output
    for flag, env in [("--steps", "DEMO_STEPS"), ("--rate", "DEMO_RATE"), ("--out", "DEMO_OUT"),
                      ("--mode", "DEMO_MODE"), ("--compile / --no-compile", "DEMO_COMPILE"), ("--port", "DEMO_PORT")]:
        assert flag in text and env in text
    assert "How many steps. [default: 10; env: DEMO_STEPS]" in " ".join(text.split())


def test_bad_values_name_the_flag_and_the_variable():
    result = run(["--steps", "0"])
    assert result.exit_code == 2
    assert "--steps / DEMO_STEPS: Input should be greater than or equal to 1" in result.output
    result = run([], env={"DEMO_MODE": "medium"})
    assert result.exit_code == 2
    assert "--mode / DEMO_MODE" in result.output
