import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import processes
import pytest
import torch
from faultkit import limit_file_size

from model import GPT, CheckpointError, GPTConfig, load_checkpoint, save_checkpoint

SEED_KEYS = dict(step=7, loss=2.5, best_loss=2.25, learning_rate=3e-4)


def test_round_trip_keeps_weights_metadata_and_tying(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny", vocab_multiple=64))
    path = save_checkpoint(tmp_path / "best_model.pt", model, **SEED_KEYS, val_loss=2.3)
    loaded, checkpoint = load_checkpoint(path)
    assert {k: checkpoint[k] for k in SEED_KEYS} == SEED_KEYS
    assert checkpoint["val_loss"] == 2.3
    assert checkpoint["tokenizer"] == "r50k_base"
    assert GPTConfig.from_dict(checkpoint["config"]) == model.config
    assert "model" not in checkpoint
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pt"]


def test_compiled_and_ddp_models_save_clean_names(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny"))
    save_checkpoint(tmp_path / "compiled.pt", torch.compile(model), **SEED_KEYS)
    assert load_checkpoint(tmp_path / "compiled.pt")[0].state_dict().keys() == model.state_dict().keys()

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        save_checkpoint(tmp_path / "ddp.pt", ddp, **SEED_KEYS)
    finally:
        torch.distributed.destroy_process_group()
    raw = torch.load(tmp_path / "ddp.pt", weights_only=True)["model"]
    assert raw.keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: random.Random(0).randbytes(len(data)), id="random-bytes"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_damaged_files_raise_one_clear_error_naming_the_file(tmp_path, damage):
    path = save_checkpoint(tmp_path / "best_model.pt", GPT(GPTConfig.from_preset("tiny")), **SEED_KEYS)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="best_model.pt"):
        load_checkpoint(path)


def test_foreign_and_mismatched_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a gpt-service checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    path = save_checkpoint(tmp_path / "odd.pt", GPT(GPTConfig.from_preset("tiny")), **SEED_KEYS)
    data = torch.load(path, weights_only=True)
    data["config"]["n_embd"] = 64
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="odd.pt: weights do not match its config"):
        load_checkpoint(path)

    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_crafted_to_run_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "best_model.pt"
    payload = {"format": "gpt-service/checkpoint-v1", "config": {}, "model": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="best_model.pt: not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


WRITER = textwrap.dedent(
    """
    import sys, torch
    from model import GPT, GPTConfig, save_checkpoint
    model = GPT(GPTConfig.from_preset("tiny", n_embd=128, n_head=4))
    step = 0
    while True:
        step += 1
        save_checkpoint(sys.argv[1], model, step=step, loss=0.0, best_loss=0.0, learning_rate=0.0)
        print(step, flush=True)
    """
)


def test_a_writer_killed_at_random_moments_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "best_model.pt"
    rng = random.Random(0)
    for _ in range(3):
        writer = processes.spawn([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one full checkpoint exists
        for _ in range(rng.randint(0, 3)):
            writer.stdout.readline()
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        model, checkpoint = load_checkpoint(path)
        assert checkpoint["step"] >= 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "best_model.pt"]
    assert all(name.startswith(".best_model.pt.") and name.endswith(".tmp") for name in leftovers)


FULL_DISK = textwrap.dedent(
    """
    import sys
    from model import GPT, GPTConfig, save_checkpoint
    try:
        save_checkpoint(sys.argv[1], GPT(GPTConfig.from_preset("tiny")), step=2, loss=0.0, best_loss=0.0,
                        learning_rate=0.0)
    except OSError as e:
        print("refused:", e.strerror)
        sys.exit(3)
    """
)


def test_a_write_that_runs_out_of_space_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", GPT(GPTConfig.from_preset("tiny")), **SEED_KEYS)
    before = path.read_bytes()
    result = processes.run(
        [sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, preexec_fn=limit_file_size(100_000)
    )
    assert result.returncode == 3, result.stderr
    assert "refused: File too large" in result.stdout
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1]["step"] == SEED_KEYS["step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
