"""`deepshrink simulate`: synthetic layers, files, and real MNIST activations."""

from __future__ import annotations

import json

import torch

from deepshrink.cli import main
from deepshrink.hardware import simulate_layer, synthetic_layer


def test_synthetic_benchmark_layer_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "alex7.json"
    assert main(["simulate", "--synthetic", "Alex-7", "--json", str(out)]) == 0
    assert "Alex-7" in capsys.readouterr().out
    [row] = json.loads(out.read_text())
    assert (row["rows"], row["cols"], row["active_columns"]) == (4096, 4096, round(0.353 * 4096))
    assert 11.0 < row["time_per_vector_us"] < 13.5


def test_synthetic_size_matches_the_api(tmp_path):
    out = tmp_path / "r.json"
    argv = [
        "simulate",
        "--synthetic",
        "600x300",
        "--density",
        "0.1",
        "--act-density",
        "0.5",
        "--pes",
        "16",
        "--fifo",
        "4",
        "--seed",
        "3",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    [row] = json.loads(out.read_text())
    from deepshrink.hardware import EIEConfig

    api = simulate_layer(
        synthetic_layer(300, 600, 0.1, seed=3), act_density=0.5, seed=3, config=EIEConfig(n_pe=16, fifo_depth=4)
    )
    assert (row["rows"], row["cols"], row["cycles"]) == (300, 600, api.cycles)


def test_bad_arguments_exit_2_with_a_message(capsys):
    assert main(["simulate"]) == 2
    assert main(["simulate", "--synthetic", "600x300"]) == 2
    assert main(["simulate", "--synthetic", "Alex-7", "--fifo", "0"]) == 2
    err = capsys.readouterr().err
    assert "--density" in err and "argument --fifo: '0' is not an integer above 0" in err


def test_a_file_with_real_mnist_activations(tmp_path, capsys, data_root):
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_
    from deepshrink.fileformat.model_io import save
    from deepshrink.models import lenet_300_100

    torch.manual_seed(0)
    model = lenet_300_100()
    prune_(model, 0.9)
    share_weights_(model, bits=4)
    path = tmp_path / "lenet.dsz"
    save(model, path, factory="deepshrink.models:lenet_300_100")
    real, assumed = tmp_path / "real.json", tmp_path / "assumed.json"
    assert (
        main(
            [
                "simulate",
                str(path),
                "--data",
                "mnist",
                "--data-dir",
                str(data_root),
                "--images",
                "20",
                "--json",
                str(real),
            ]
        )
        == 0
    )
    assert main(["simulate", str(path), "--act-density", "1.0", "--json", str(assumed)]) == 0
    assert "fc1.weight" in capsys.readouterr().out
    real_rows, assumed_rows = json.loads(real.read_text()), json.loads(assumed.read_text())
    assert [r["name"] for r in real_rows] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert real_rows[0]["vectors"] == 20 and real_rows[0]["cols"] == 784
    # MNIST images are mostly background: far fewer cycles than an all-non-zero input
    assert real_rows[0]["cycles"] / 20 < 0.5 * assumed_rows[0]["cycles"]
