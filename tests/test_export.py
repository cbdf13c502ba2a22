"""Exports and copies leave the live model as it was; the package's submodules are reachable by attribute."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.compress import prune_, sensitivity_scan, share_weights_, shrink
from deepshrink.compress.parametrization import compression_of
from deepshrink.fileformat.export import dense_state_dict, export_onnx, export_safetensors


def _compressed() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune_(net, 0.5)
    share_weights_(net, bits=4)
    return net


def _loaded(tmp_path: Path) -> nn.Module:
    deepshrink.save(_compressed(), tmp_path / "m.dsz")
    return deepshrink.load_into(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), tmp_path / "m.dsz")


EXPORTS = {
    "safetensors": lambda m, tmp: export_safetensors(m, tmp / "m.safetensors"),
    "dense_state_dict": lambda m, tmp: dense_state_dict(m),
    "onnx": lambda m, tmp: export_onnx(m, torch.zeros(1, 8), tmp / "m.onnx"),
}


@pytest.mark.parametrize("source", [_compressed, _loaded], ids=["compressed", "load_into"])
@pytest.mark.parametrize("export", EXPORTS.values(), ids=EXPORTS.keys())
def test_export_leaves_the_live_model_untouched(source, export, tmp_path: Path) -> None:
    model = source(tmp_path) if source is _loaded else source()
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(x)
    export(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(compression_of(model[i], "weight") is not None for i in (0, 2))
    share_weights_(model, bits=3)  # and it still takes the next stage


def test_a_copy_compressed_further_leaves_its_original_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune_(net, 0.5)
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = net(x)
    share_weights_(copy.deepcopy(net), bits=3)  # replaces the copy's Mask parametrizations
    sensitivity_scan(net, (x, torch.tensor([0, 1, 0, 1])), [0.6, 0.9], progress=False)  # prunes copies again
    shrink(net, x)  # bakes a copy's weights
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_submodules_are_reachable_from_import_deepshrink() -> None:
    code = (
        "import sys, deepshrink\n"
        "assert 'deepshrink.compress' not in sys.modules, 'import deepshrink must stay light'\n"
        "deepshrink.fileformat.export.export_safetensors, deepshrink.fileformat.info.size_breakdown\n"
        "deepshrink.compress.sensitivity.sensitivity_scan, deepshrink.engine.runner.decoded_model\n"
        "deepshrink.data.mnist.load_mnist, deepshrink.coding.huffman, deepshrink.hardware.report\n"
        "assert 'export' in dir(deepshrink.fileformat)\n"
        "for name in ('no_such_thing', 'export'):\n"
        "    try:\n        getattr(deepshrink, name)\n    except AttributeError as err:\n        print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "has no attribute 'no_such_thing'\n" in out.stdout
    assert "has no attribute 'export'; did you mean deepshrink.fileformat.export?" in out.stdout
