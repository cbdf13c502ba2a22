"""The LeNet benchmark's short variant on real MNIST: the script keeps working end to end.

A few hundred optimizer steps of the real LeNet-300-100 recipe (train, gradual pruning,
weight sharing, ANS encoding), then every figure the script reports is checked against
the file it wrote: its size, the ratio, the per-layer bytes, and the error of the model
loaded back from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import evaluate
from deepshrink.fileformat.info import size_breakdown
from deepshrink.fileformat.model_io import load
from deepshrink.models import lenet_5, lenet_300_100
from deepshrink.recipes import load_recipe
from deepshrink.recipes.schema import PruneStage


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_root, load_benchmark):
    """One short run of the script on LeNet-300-100, published to a temporary folder."""
    bench = load_benchmark("bench_lenet")
    out, published = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("published")
    results = bench.main(
        [
            "--nets",
            "lenet-300-100",
            "--max-steps",
            "120",
            "--data-dir",
            str(data_root),
            "--out-dir",
            str(out),
            "--publish",
            str(published),
        ]
    )
    return bench, results[0], out, published


def test_ratio_and_sizes_are_those_of_the_written_file(short_run):
    _, r, out, _ = short_run
    path = Path(r["file"])
    assert path.parent == out and path.stat().st_size == r["file_bytes"]
    fp32_bytes = 4 * sum(p.numel() for p in lenet_300_100().parameters())  # weights and biases
    assert r["dense_bytes"] == fp32_bytes
    assert r["ratio"] == pytest.approx(fp32_bytes / r["file_bytes"])
    layer_bytes = sum(row["bytes"] for row in r["layers"])
    assert layer_bytes + r["bias_bytes"] + r["header_bytes"] == r["file_bytes"]
    assert r["paper_style_bytes"] == layer_bytes + r["bias_bytes"] < r["file_bytes"]
    report = size_breakdown(path)
    assert [row["bytes"] for row in r["layers"]] == [t.total_bytes for t in report.tensors]


def test_kept_fractions_follow_the_recipe(short_run):
    _, r, _, _ = short_run
    prune = next(s for s in load_recipe("lenet-300-100").stages if isinstance(s, PruneStage))
    for row in r["layers"]:
        target = 100 * (1 - prune.sparsity[row["layer"].removesuffix(".weight")])
        assert row["kept_pct"] == pytest.approx(target, abs=0.05), row["layer"]


def test_error_is_that_of_the_reloaded_file(short_run, mnist_test):
    _, r, _, _ = short_run
    model = load(r["file"])
    error = 100 * (1 - evaluate(model, mnist_test))
    assert error == pytest.approx(r["error"], abs=1e-9)
    assert error < 15, "a few hundred steps on real MNIST should already beat chance by far"
    for t in find_targets(model):  # the reloaded model computes with shared weights only
        nonzero = t.weight[t.weight != 0]
        assert torch.unique(nonzero).numel() <= 2 ** max(row["bits"] for row in r["layers"])


def test_outputs_are_written_and_other_nets_kept(short_run):
    bench, r, out, published = short_run
    for folder in (out, published):
        assert json.loads((folder / "lenet.json").read_text()) == [json.loads(json.dumps(r))]
    other = {"net": "lenet-5", "error": 0.7}
    merged = bench.merge_results(published / "lenet.json", [other])
    assert [row["net"] for row in merged] == ["lenet-300-100", "lenet-5"] and merged[1] is other
    assert bench.merge_results(published / "lenet.json", [r | {"error": 9.9}])[0]["error"] == 9.9
    text = (published / "lenet.md").read_text()
    assert f"{r['file_bytes']:,}" in text and f"{r['ratio']:.1f}x" in text
    assert set(r["timings"]) >= {"0: train", "encode + write", "read + load", "evaluate reloaded", "total"}


def test_paper_layers_name_real_weights_of_both_nets(load_benchmark):
    bench = load_benchmark("bench_lenet")
    for net, factory in (("lenet-300-100", lenet_300_100), ("lenet-5", lenet_5)):
        names = {t.name for t in find_targets(factory())}
        assert set(bench.PAPER[net]["layers"]) == names
        assert load_recipe(net).model == net
