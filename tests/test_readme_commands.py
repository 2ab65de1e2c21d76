"""Every command the README shows runs: shell lines and the Python example, each at a small size (or, where it
needs a GPU, the hub or a Docker engine, as far as this machine can take it), so that no README command
can break again unnoticed.

Each fenced `bash` line is one test. Commands are run as written, with only what a test must change:
the address of the service (a real one, started here), a tiny model and a few steps for the trainer,
and a temporary folder to work in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import processes
import pytest
from servicekit import publish

from trainer.data import read_source

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


COMMANDS = shell_commands()
# A citation of a README section by its title (the quote as a character class, so that this line is not one).
CITED_SECTION = re.compile(r'README, ["]([^"]+)"')
# What a trainer command needs to finish in seconds: tiny shapes, a few steps, the CPU.
SMALL_RUN = ["--preset", "tiny", "--steps", "3", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
             "--seq-len", "32", "--device", "cpu", "--no-compile", "--checkpoint-interval", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir):
    """A folder laid out as a user's checkout: input.txt, a checkpoint, and the token cache."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "input.txt").write_text(read_source("builtin:pydoc", cache_dir)[:200_000])
    publish(folder / "checkpoints", step=5)
    return folder


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("readme-checkpoints")
    publish(checkpoint_dir, step=9)
    return launch_for_module(checkpoint_dir)


def run(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    result = processes.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def split_environment(words: list[str]) -> tuple[dict, list[str]]:
    """`A=1 B=2 command ...` as ({A: 1, B: 2}, [command, ...])."""
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, workdir, service, cache_dir, tmp_path):
    env, words = split_environment(shlex.split(command))
    program = words[0]
    if program == "make":
        # The targets run for real elsewhere (make test is this run; make up has its own test); here the
        # recipe must exist and expand.
        run(["make", "-n", *words[1:]], ROOT, env)
    elif program in ("docker", "docker-compose"):
        compose = words[2:] if program == "docker" else words[1:]
        assert program == "docker-compose" or words[1] == "compose", command
        files = [word for i, word in enumerate(compose) if i and compose[i - 1] == "-f"]
        options = [part for file in files for part in ("-f", file)]
        subcommand = compose[len(options)]
        # The compose files as the command combines them, with its environment, and the subcommand itself.
        run(["docker-compose", *options, "config", "-q"], ROOT, env)
        run(["docker-compose", subcommand, "--help"], ROOT, env)
    elif program == "kubectl":
        # No cluster here: what `apply -k DIR` would send, composed by kubectl itself (tests/deploy validates it).
        assert words[1:3] == ["apply", "-k"], command
        run(["kubectl", "kustomize", words[3]], ROOT, env)
    elif program == "curl":
        address = service.url.removeprefix("http://")
        result = run([word.replace("localhost:8000", address) for word in words], workdir)
        if '"stream": true' in command:
            events = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["finish_reason"], events[-3:]
        else:
            assert json.loads(result.stdout)["usage"]["completion_tokens"] >= 1, result.stdout
    elif program.endswith(("/trainer", "/torchrun")):
        argv = [str(BIN / Path(program).name) if program.startswith(".venv/") else program, *words[1:]]
        env = {**env, "TRAINER_CACHE_DIR": str(cache_dir)}
        if "fit" in argv and "--init" in argv and "gpt2" in argv:
            run([*argv, "--help"], workdir, env)  # the Hugging Face hub is out of reach here
        elif "fit" in argv:
            if "--out" in argv:
                argv[argv.index("--out") + 1] = str(tmp_path / "run")
            else:
                argv += ["--out", str(tmp_path / "checkpoints")]
            run([*argv, *SMALL_RUN], workdir, env)
        else:
            run(argv, workdir, env)
    elif program.endswith("/service"):
        # Serving for real is what tests/service does; here the command line must be one the CLI takes.
        result = run([str(BIN / "service"), *words[1:], "--help"], workdir, env)
        assert "--checkpoint-dir" in result.stdout
    else:
        pytest.fail(f"the README shows {command!r}: teach this test how to run it")


def test_the_python_example_runs_against_a_live_service(service):
    [example] = [block for block in fenced("python") if "OpenAI(" in block]
    source = example.replace("http://127.0.0.1:8000", service.url)
    result = processes.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 20


def test_the_readme_cites_only_sections_and_files_that_exist():
    headings = set(re.findall(r"^#+ (.+)$", README, flags=re.M))
    tracked = processes.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    documents = (".py", ".md", "Makefile", ".yml", ".sh", "Dockerfile")
    for path in tracked:
        if not (path.endswith(documents) and (ROOT / path).is_file()):
            continue
        text = (ROOT / path).read_text(errors="replace")
        for section in CITED_SECTION.findall(text):
            assert section in headings, f"{path} cites a README section that does not exist: {section!r}"
        for cited in re.findall(r"(?<![\w/.])((?:model|service|trainer|deploy|bench|tests)/[\w/.-]+\.(?:py|yml|sh|md))",
                                text):  # fmt: skip
            assert (ROOT / cited).exists() or shutil.which(cited), f"{path} cites {cited}, which does not exist"
