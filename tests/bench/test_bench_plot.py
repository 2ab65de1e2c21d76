"""bench/plot.py draws one PNG per figure from the results."""

from __future__ import annotations

from bench import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = {"train_quality.png", "train_throughput.png", "decode.png", "decode_peers.png", "serve_sweep.png", "gpu_train.png"}


def test_every_figure_is_drawn_as_a_png(results, tmp_path):
    out = tmp_path / "plots"
    plot.main(["--results-dir", str(results), "--out-dir", str(out)])
    assert {p.name for p in out.iterdir()} == FIGURES
    for path in out.iterdir():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path.name


def test_without_gpu_results_there_is_no_gpu_figure(results, tmp_path):
    for path in (results / "gpu").iterdir():
        path.unlink()
    out = tmp_path / "plots"
    plot.main(["--results-dir", str(results), "--out-dir", str(out)])
    assert {p.name for p in out.iterdir()} == FIGURES - {"gpu_train.png"}
