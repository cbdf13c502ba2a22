"""The CNN benchmark end to end on small images: both models, every column, the page written."""

from __future__ import annotations

from pathlib import Path


def test_bench_cnn_rows_on_small_images(tmp_path: Path, load_benchmark) -> None:
    bench = load_benchmark("bench_cnn")
    out = tmp_path / "out"
    args = ["--repeats", "1", "--batches", "2", "--sparsity", "0.7", "--size", "40", "--threads", "1"]
    result = bench.main(args + ["--out-dir", str(out)])
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["ResNet-18", "MobileNetV2"]
    for row in rows.values():
        engines = {"engine", "engine int8"}
        formats = {f"{e} {f}" for e in engines for f in ("NCHW", "channels-last")}
        assert set(row["ms"]) == {"torch fp32", "torch fp32 channels-last", *engines, *formats}
        assert all(row["ms"][e] == min(row["ms"][f"{e} NCHW"], row["ms"][f"{e} channels-last"]) for e in engines)
        assert row["errors"]["engine"] < 1e-5  # float32: the decoded model's logits (direct and patch products)
        assert 0 < row["errors"]["engine int8"] < 0.3  # int8 rounds every patch and codebook, never far
    page = (out / "cnn.md").read_text()
    assert "| ResNet-18 | 70% | 2 |" in page and "40 x 40 images" in page
