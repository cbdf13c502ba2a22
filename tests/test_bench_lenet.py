"""The LeNet benchmark's short variant on real MNIST: the script keeps working end to end.

A few hundred optimizer steps of the real LeNet-300-100 recipe (train, gradual pruning,
weight sharing, ANS encoding) at two seeds, then every figure the script reports is checked
against the files it wrote: their sizes, the ratios, the per-layer bytes, the error of the
model loaded back from each, and the medians over the seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import evaluate
from deepshrink.fileformat.info import size_breakdown
from deepshrink.fileformat.model_io import load, read
from deepshrink.models import lenet_5, lenet_300_100
from deepshrink.recipes import load_recipe
from deepshrink.recipes.schema import PruneStage, ShareStage


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_root, load_benchmark):
    """One short run of the script on LeNet-300-100 at two seeds, published to a temporary folder."""
    bench = load_benchmark("bench_lenet")
    out, published = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("published")
    args = ["--nets", "lenet-300-100", "--seeds", "0", "1", "--max-steps", "200", "--data-dir", str(data_root)]
    results = bench.main(args + ["--out-dir", str(out), "--publish", str(published)])
    return bench, results[0], out, published


def test_ratio_and_sizes_are_those_of_the_written_file(short_run):
    _, result, out, _ = short_run
    fp32_bytes = 4 * sum(p.numel() for p in lenet_300_100().parameters())  # weights and biases
    for r in result["runs"]:
        path = Path(r["file"])
        assert path.parent == out and path.stat().st_size == r["file_bytes"]
        assert r["dense_bytes"] == fp32_bytes
        assert r["ratio"] == pytest.approx(fp32_bytes / r["file_bytes"])
        layer_bytes = sum(row["bytes"] for row in r["layers"])
        assert layer_bytes + r["bias_bytes"] + r["header_bytes"] == r["file_bytes"]
        assert r["paper_style_bytes"] == layer_bytes + r["bias_bytes"] < r["file_bytes"]
        report = size_breakdown(path)
        assert [row["bytes"] for row in r["layers"]] == [t.total_bytes for t in report.tensors]


def test_kept_fractions_follow_the_recipe(short_run):
    _, result, _, _ = short_run
    prune = next(s for s in load_recipe("lenet-300-100").stages if isinstance(s, PruneStage))
    for r in result["runs"]:
        for row in r["layers"]:
            target = 100 * (1 - prune.sparsity[row["layer"].removesuffix(".weight")])
            assert row["kept_pct"] == pytest.approx(target, abs=0.05), row["layer"]


def test_error_is_that_of_the_reloaded_file(short_run, mnist_test):
    _, result, _, _ = short_run
    for r in result["runs"]:
        model = load(r["file"])
        error = 100 * (1 - evaluate(model, mnist_test))
        assert error == pytest.approx(r["error"], abs=1e-9)
        assert error < 15, "a few hundred steps on real MNIST should already beat chance by far"
        for t in find_targets(model):  # the reloaded model computes with shared weights only
            nonzero = t.weight[t.weight != 0]
            assert torch.unique(nonzero).numel() <= 2 ** max(row["bits"] for row in r["layers"])


def test_each_seed_is_its_own_run_and_the_row_is_their_median(short_run):
    _, result, out, _ = short_run
    runs = result["runs"]
    assert [r["seed"] for r in runs] == result["seeds"] == [0, 1]
    assert [read(r["file"]).metadata["seed"] for r in runs] == [0, 1]
    assert Path(runs[0]["file"]).read_bytes() != Path(runs[1]["file"]).read_bytes()
    for key in ("error", "ratio", "file_bytes"):
        assert result["median"][key] == pytest.approx(statistics.median(r[key] for r in runs))
    middle = next(r for r in runs if r["seed"] == result["median_seed"])
    assert middle["error"] == min(r["error"] for r in runs)  # of two, the lower middle
    assert (out / "lenet-300-100.dsz").read_bytes() == Path(middle["file"]).read_bytes()
    for r in runs:
        assert set(r["stages"]) >= {"0: train", "encode + write", "read + load", "evaluate reloaded", "total"}
        stage_cpu = sum(t["cpu_s"] for name, t in r["stages"].items() if name != "total")
        assert 0 < stage_cpu <= r["stages"]["total"]["cpu_s"] + 1e-6
        assert all(0 < t["wall_s"] for t in r["stages"].values()) and len(r["load"]) == 2


def test_outputs_are_written_and_other_nets_kept(short_run):
    bench, result, out, published = short_run
    for folder in (out, published):
        assert json.loads((folder / "lenet.json").read_text()) == [json.loads(json.dumps(result))]
    other = {"net": "lenet-5", "error": 0.7}
    merged = bench.merge_results(published / "lenet.json", [other])
    assert [row["net"] for row in merged] == ["lenet-300-100", "lenet-5"] and merged[1] is other
    assert bench.merge_results(published / "lenet.json", [result | {"seeds": [7]}])[0]["seeds"] == [7]
    text = (published / "lenet.md").read_text()
    assert f"{result['median']['ratio']:.1f}x" in text and "median of 2" in text
    assert all(f"{r['file_bytes']:,}" in text for r in result["runs"])


def test_holdout_measures_on_held_out_training_images(tmp_path, data_root, mnist_train, load_benchmark):
    bench = load_benchmark("bench_lenet")
    args = ["--nets", "lenet-300-100", "--seeds", "0", "--max-steps", "30", "--holdout", "2000"]
    (result,) = bench.main(args + ["--data-dir", str(data_root), "--out-dir", str(tmp_path)])
    run = result["runs"][0]
    held = (mnist_train[0][-2000:], mnist_train[1][-2000:])
    assert run["error"] == pytest.approx(100 * (1 - evaluate(load(run["file"]), held)), abs=1e-9)
    assert "held-out error (last 2,000 training images)" in (tmp_path / "lenet.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(args + ["--publish", str(tmp_path / "published")])


def test_paper_layers_name_real_weights_of_both_nets(load_benchmark):
    bench = load_benchmark("bench_lenet")
    for net, factory in (("lenet-300-100", lenet_300_100), ("lenet-5", lenet_5)):
        names = {t.name for t in find_targets(factory())}
        assert set(bench.PAPER[net]["layers"]) == names
        assert load_recipe(net).model == net


def test_published_rows_come_from_the_builtin_recipes_and_the_readme_quotes_them() -> None:
    """docs/results/lenet.json was written by the recipes as they are now, and README's row is its median."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    for result in json.loads((root / "docs" / "results" / "lenet.json").read_text()):
        recipe = load_recipe(result["net"])
        prune = next(s for s in recipe.stages if isinstance(s, PruneStage))
        share = next(s for s in recipe.stages if isinstance(s, ShareStage))
        runs = result["runs"]
        assert result["seeds"] == [r["seed"] for r in runs] == [0, 1, 2] and result["recipe"] == recipe.name
        for r in runs:
            assert r["max_steps"] is None and not r["holdout"], "a published row is a full run on the test set"
            for row in r["layers"]:
                name = row["layer"].removesuffix(".weight")
                assert row["kept_pct"] == pytest.approx(100 * (1 - prune.sparsity[name]), abs=0.05), row["layer"]
                assert row["bits"] == share.bits[name], row["layer"]
        m = result["median"]
        assert m["error"] == statistics.median(r["error"] for r in runs)
        assert m["ratio"] == statistics.median(r["ratio"] for r in runs)
        assert f"**{m['error']:.2f}%** | {m['file_bytes']:,.0f} | **{m['ratio']:.1f}x**" in readme, result["net"]
