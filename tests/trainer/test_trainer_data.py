import http.server
import threading
from functools import partial

import pytest
import torch
from click.testing import CliRunner

from model import Tokenizer
from trainer.cli import main
from trainer.data import Dataset, DataError, prepare, read_source, tokenize

TEXT = "To be, or not to be, that is the question.\n" * 40


def test_tokens_are_cached_by_content(tmp_path):
    first = tokenize(TEXT, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert tokenize(TEXT, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp, "an unchanged text must not be tokenized again"
    ids = torch.from_file(str(first), size=first.stat().st_size // 2, dtype=torch.uint16).tolist()
    assert Tokenizer().decode(ids) == TEXT
    assert tokenize(TEXT + "Whether 'tis nobler", tmp_path) != first


def test_validation_is_the_last_fraction(tmp_path):
    path = tokenize(TEXT, tmp_path)
    everything = torch.from_file(str(path), size=path.stat().st_size // 2, dtype=torch.uint16)
    data = Dataset.load(path, val_fraction=0.25, seq_len=8)
    assert len(data.val) == int(len(everything) * 0.25)
    assert torch.equal(torch.cat([data.train, data.val]), everything)


def test_batches_are_windows_with_shifted_targets(tmp_path):
    data = Dataset.load(tokenize(TEXT, tmp_path), val_fraction=0.1, seq_len=8)
    offsets = data.offsets("train", 5, 8, torch.Generator().manual_seed(0))
    x, y = data.batch("train", offsets, 8, torch.device("cpu"))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.long
    for row, start in enumerate(offsets.tolist()):
        assert x[row].tolist() == data.train[start : start + 8].tolist()
        assert y[row].tolist() == data.train[start + 1 : start + 9].tolist()


def test_builtin_corpus_needs_no_files(tmp_path):
    text = read_source("builtin:pydoc", tmp_path)
    assert len(text) > 400_000 and "assert" in text


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(CountingHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    CountingHandler.requests = 0
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_url_is_downloaded_once(http_root, tmp_path):
    root, base = http_root
    (root / "input.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    first = prepare(f"{base}/input.txt", cache)
    assert prepare(f"{base}/input.txt", cache) == first
    assert CountingHandler.requests == 1
    with pytest.raises(DataError, match="could not download .*/missing.txt"):
        read_source(f"{base}/missing.txt", cache)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no training text at"),
        (b"", "is empty"),
        (b"caf\xe9 au lait " * 100, "is not UTF-8 text (invalid byte at offset 3)"),
        (b"Hello there.", "too few for one sequence of 128 tokens"),
    ],
)
def test_bad_text_gets_a_message_not_a_traceback(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["fit", "--data", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "last.pt").exists()


def test_unknown_builtin_is_named(tmp_path):
    result = CliRunner().invoke(main, ["fit", "--data", "builtin:wiki", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown built-in corpus 'builtin:wiki': use one of builtin:pydoc" in result.output
