"""Sensitivity analysis on real MNIST (curves, proposals, the PNG, use from a recipe) and `deepshrink sensitivity` on digits."""

from __future__ import annotations

import pytest
import torch

from deepshrink.compress.prune import sparsity_report
from deepshrink.compress.sensitivity import Sensitivity, sensitivity_scan
from deepshrink.errors import DeepShrinkError
from deepshrink.recipes import parse_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _held_out(mnist_test, n=2000):
    return mnist_test[0][:n], mnist_test[1][:n]


def test_scan_on_mnist_finds_the_output_layer_most_sensitive(trained_lenet300, mnist_test, tmp_path):
    model = trained_lenet300
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    scan = sensitivity_scan(model, _held_out(mnist_test), [0.5, 0.9, 0.98], progress=False)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert list(scan.accuracy) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    fc1, fc3 = scan.accuracy["fc1.weight"], scan.accuracy["fc3.weight"]
    assert fc1[0] > scan.baseline - 0.01  # the big layer barely notices losing half its weights
    assert fc3[-1] < fc1[-1]  # 98% of the 1K-weight output layer hurts more than 98% of the 235K layer
    assert fc1[-1] < fc1[0]
    proposal = scan.propose(0.01)
    assert proposal["fc1.weight"] >= 0.5 and proposal["fc1.weight"] >= proposal["fc3.weight"]
    path = tmp_path / "sensitivity.png"
    scan.plot(str(path), max_drop=0.01)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_propose_stops_at_the_first_point_beyond_the_drop_and_checks_its_input():
    scan = Sensitivity(0.9, (0.5, 0.7, 0.9), {"a": [0.9, 0.85, 0.9], "b": [0.899, 0.898, 0.8]})
    assert scan.propose(0.01) == {"a": 0.5, "b": 0.7}  # a's recovery at 0.9 is noise, not a licence
    assert scan.propose(0.1) == {"a": 0.9, "b": 0.9}
    assert scan.propose(0.0) == {"a": 0.5, "b": 0.0}
    with pytest.raises(DeepShrinkError, match=r"max_drop=5 must be a number in \[0, 1\]"):
        scan.propose(5)
    with pytest.raises(DeepShrinkError, match="strictly increasing"):
        sensitivity_scan(
            torch.nn.Sequential(torch.nn.Linear(2, 2)), (torch.zeros(1, 2), torch.zeros(1).long()), [0.9, 0.5]
        )
    with pytest.raises(DeepShrinkError, match=r"sparsities\[0\]=1.0 must be a number in \[0, 1\)"):
        sensitivity_scan(torch.nn.Sequential(torch.nn.Linear(2, 2)), (torch.zeros(1, 2), torch.zeros(1).long()), [1.0])


def test_a_recipe_prunes_to_the_sparsities_the_scan_proposes(trained_lenet300, data_root, tmp_path):
    plot = tmp_path / "s.png"
    recipe = parse_recipe(
        {
            "model": "lenet-300-100",
            "data": "mnist",
            "batch_size": 128,
            "stages": [
                {
                    "prune": {
                        "sensitivity": {
                            "max_drop": 0.02,
                            "sparsities": [0.5, 0.8, 0.95],
                            "samples": 1500,
                            "plot": str(plot),
                        },
                        "steps": 1,
                        "epochs": 0.05,
                    }
                }
            ],
        }
    )
    result = run_recipe(recipe, model=trained_lenet300, data_dir=str(data_root))
    kept = {r.name: r.kept_fraction for r in sparsity_report(result["model"])}
    assert plot.is_file()
    assert kept["fc1.weight"] <= 0.5 + 1e-6  # fc1 takes at least 50% at a 2-point budget
    assert all(round(1 - k, 6) in (0.0, 0.5, 0.8, 0.95) for k in kept.values())  # only grid points
    assert result["accuracy"] > 0.90  # layers pruned together lose more than each alone; little retraining here
    with pytest.raises(DeepShrinkError, match=r"stages\[0\].prune: sensitivity: unknown key 'drop'"):
        parse_recipe({"model": "lenet-5", "stages": [{"prune": {"sensitivity": {"drop": 0.1}}}]})


@pytest.fixture(scope="module")
def digits_state_dict(tmp_path_factory):
    """LeNet-300-100 on the bundled 8x8 digits, four epochs (97% test accuracy), saved as a state dict."""
    from deepshrink.compress.train import TrainConfig, fit
    from deepshrink.data.digits import load_digits
    from deepshrink.models import lenet_300_100

    torch.manual_seed(0)
    model = lenet_300_100(in_features=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_thread, which module fixtures do not get
    try:
        fit(model, load_digits("train"), TrainConfig(epochs=4, lr=0.05, batch_size=32, progress=False))
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("digits") / "lenet.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_cli_scans_a_model_on_digits_into_a_table_a_png_and_json(digits_state_dict, tmp_path, capsys):
    import json

    from deepshrink.cli import main

    state_dict, _ = digits_state_dict
    plot, record = tmp_path / "sens.png", tmp_path / "sens.json"
    argv = ["sensitivity", "--model", "lenet-300-100", "--model-kwargs", '{"in_features": 64}', "--state-dict",
            str(state_dict), "--data", "digits", "--sparsities", "0.5", "0.9", "0.99", "--plot", str(plot),
            "--json", str(record), "--max-drop", "0.02"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fc1.weight", "fc2.weight", "fc3.weight")) and "99%" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scan = json.loads(record.read_text())
    assert scan["baseline"] > 0.9 and scan["sparsities"] == [0.5, 0.9, 0.99]
    # pruning 99% of a layer alone costs more than 50% of it; the output layer (1K weights) is the most sensitive
    assert all(acc[0] >= acc[2] for acc in scan["accuracy"].values())
    assert scan["accuracy"]["fc3.weight"][2] < scan["accuracy"]["fc1.weight"][2]
    assert set(scan["proposal"]) == {"fc1.weight", "fc2.weight", "fc3.weight"} and scan["max_drop"] == 0.02
    assert f"fc1.weight={scan['proposal']['fc1.weight']:g}" in out


def test_cli_scans_a_file_and_names_bad_input(digits_state_dict, tmp_path, capsys):
    import deepshrink
    from deepshrink.cli import main
    from deepshrink.compress import prune_, share_weights_

    _, model = digits_state_dict
    prune_(model, 0.5, progress=False)
    share_weights_(model, bits=5, progress=False)
    path = tmp_path / "digits.dsz"
    deepshrink.save(model, path, factory="deepshrink.models:lenet_300_100", factory_kwargs={"in_features": 64})
    assert main(["sensitivity", str(path), "--data", "digits", "--sparsities", "0.3", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "fc1.weight" in out and "95%" in out
    assert main(["sensitivity", "--data", "digits"]) == 2
    assert "give a FILE (.dsz) or --model" in capsys.readouterr().err
    assert main(["sensitivity", "--model", "lenet-300-100", "--data", "digits"]) == 2
    assert "--model needs --state-dict" in capsys.readouterr().err
    assert main(["sensitivity", str(path), "--data", "digits", "--sparsities", "0.9", "0.5"]) == 2
    assert "strictly increasing" in capsys.readouterr().err
