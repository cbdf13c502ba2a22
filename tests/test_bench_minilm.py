"""The MiniLM benchmark end to end on a tiny BERT: every row built, read back and measured, the page and plot written."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_minilm_rows_on_a_tiny_bert(tmp_path: Path, write_tiny_bert, load_benchmark) -> None:
    model = write_tiny_bert(tmp_path / "tiny")
    bench = load_benchmark("bench_minilm")
    out, published = tmp_path / "out", tmp_path / "published"
    from deepshrink.compress.quantize import share_weights_
    from deepshrink.huggingface import load_pretrained, save_pretrained

    tiny = load_pretrained(model)
    share_weights_(tiny.model, bits=3, progress=False)
    save_pretrained(tiny.model, tmp_path / "mine", model)  # a folder compressed before the run
    settings = ["original", "fp16 + xz", "torch qint8", "deepshrink k-means 5 bits"]  # the recipe is MiniLM's
    args = ["--model", str(model), "--repeats", "1", "--limit", "16", "--threads", "1", "--settings", *settings]
    result = bench.main(args + ["--prebuilt", f"mine={tmp_path / 'mine'}", "--int8", "mine", "--out-dir", str(out),
                                "--publish", str(published)])  # fmt: skip
    assert result["sentences"] == result["pairs"] == 16
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == [*settings, "mine", "mine, engine int8"]
    assert rows["mine"]["ratio"] > rows["deepshrink k-means 5 bits"]["ratio"]  # 3 bits, not 5
    int8 = rows["mine, engine int8"]  # the same file, computed in int8 on the engine
    assert int8["bytes"] == rows["mine"]["bytes"] and "engine in int8" in int8["measured"]
    # int8 rounding moves a random tiny BERT's embeddings a little either way (its cost model runs the smallest
    # products in float32), never far
    assert int8["mean_cos"] > 0.8 and abs(int8["mean_cos"] - rows["mine"]["mean_cos"]) < 0.02
    fp32 = (model / "model.safetensors").stat().st_size
    assert rows["original"]["bytes"] == result["fp32_bytes"] == fp32
    assert rows["original"]["mean_cos"] > 0.99999 and rows["original"]["spearman"] > 0.99999
    for row in rows.values():
        assert abs(row["ratio"] - fp32 / row["bytes"]) < 1e-9
        assert 0 < row["min_cos"] <= row["mean_cos"] <= 1.00001 and -1 <= row["spearman"] <= 1.00001
        assert row["latency_ms"] > 0 and row["embed_s"] > 0
    assert rows["fp16 + xz"]["ratio"] > 2 and rows["fp16 + xz"]["mean_cos"] > 0.999  # fp16 rounding only
    assert rows["torch qint8"]["mean_cos"] < rows["fp16 + xz"]["mean_cos"]
    assert rows["deepshrink k-means 5 bits"]["ratio"] > rows["fp16 + xz"]["ratio"]
    assert json.loads((out / "minilm.json").read_text())["rows"][1]["setting"] == "fp16 + xz"
    for folder in (out, published):
        assert (folder / "minilm.png").stat().st_size > 1000
        assert "| torch qint8 |" in (folder / "minilm.md").read_text()
    assert [p.name for p in out.iterdir() if p.is_dir()] == []  # the settings' files were temporary


def test_readme_minilm_rows_are_the_published_page() -> None:
    """README's all-MiniLM-L6-v2 table repeats docs/results/minilm.md's figures (bytes, ratio, cosines, Spearman)."""
    import re

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "results" / "minilm.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    published = {cells[0]: cells[1:6] for cells in _rows(page)}
    names = {"torch dynamic qint8": "torch qint8", "deepshrink, 5-bit sharing alone": "deepshrink k-means 5 bits",
             "deepshrink `minilm` recipe": "deepshrink minilm recipe", "fp16 + xz": "fp16 + xz",
             "the recipe, 1 bit less": "deepshrink minilm recipe, 1 bit less",
             "the recipe on the engine in int8": "deepshrink minilm recipe, engine int8"}  # fmt: skip
    shown = {names[c[0]]: [re.sub(r"\*", "", v) for v in c[1:6]] for c in _rows(readme) if c[0] in names}
    assert len(shown) == len(names)
    for setting, figures in shown.items():
        assert figures == published[setting], setting


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
