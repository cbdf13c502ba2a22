"""Bad input to the command line: one line on stderr naming the problem, exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deepshrink
from deepshrink.cli import main
from deepshrink.compress import prune_, share_weights_
from deepshrink.models import lenet_300_100

# (arguments, a phrase the message must hold); {d} is a folder with x.dsz (a digits LeNet), bad.yaml, nonsense.pt
CASES = [
    ("compress --data digits --bits 4,5", "argument --bits: '4,5' is not N or LAYER=N pairs"),
    ("compress --data digits --bits fc=x", "argument --bits: 'fc=x' is not N"),
    ("compress --data digits --bits fc", "argument --bits: 'fc' is not N"),
    ("compress --data digits --bits 40", "bits=40 must be an integer >= 1 and <= 16"),
    ("compress --data digits --model-kwargs {bad", "argument --model-kwargs: '{bad' is not JSON"),
    ("compress --data digits --model-kwargs [1]", "is not a JSON object"),
    ('compress --data digits --model-kwargs {"in_feature":64}', "rejects kwargs"),
    ("compress --data digits --state-dict /nonexistent.pt", "cannot read state dict '/nonexistent.pt': No such file"),
    ("compress --data digits --state-dict {d}/nonsense.pt", "is not a state dict saved with torch.save"),
    ("compress --recipe {d}/bad.yaml", "'/etc/passwd' is not a state dict saved with torch.save"),
    ("compress --data digits --max-steps 1", "LeNet300100 cannot take the inputs of data set 'digits'"),
    ("compress --data digits --max-steps 0", "argument --max-steps: '0' is not an integer above 0"),
    ("compress --data digits --sparsity 1.5", "sparsity=1.5 must be a number in [0, 1)"),
    ("compress --data digits --max-steps 1 --out {d}/missing/o.dsz", "folder '{d}/missing' does not exist"),
    ("compress --recipe /nonexistent.yaml", "neither a file nor a built-in recipe"),
    ("compress --data digits --resume", "--resume needs --checkpoint PATH, or --out FILE"),
    ("compress --data digits --checkpoint-every -1", "argument --checkpoint-every: '-1' is not an integer >= 0"),
    ("compress --recipe digits-demo --checkpoint /etc/passwd --resume", "cannot resume from '/etc/passwd'"),
    ("demo --out {d}/missing/demo.dsz", "folder '{d}/missing' does not exist"),
    ("export {d}/x.dsz {d}/o.onnx --input-shape 1,a", "argument --input-shape: '1,a' is not positive integers"),
    ("export {d}/x.dsz {d}/o.onnx", "ONNX export needs an example input shape"),
    ("export {d}/x.dsz {d}/missing/o.safetensors", "folder '{d}/missing' does not exist"),
    ("export {d}/x.dsz {d}/o.zip", "must end in .safetensors or .onnx"),
    ("export {d}/x.dsz {d}/o.safetensors --max-elements 100", "max_elements=100"),
    ("info /nonexistent.dsz", "cannot read '/nonexistent.dsz': No such file"),
    ("info /etc/passwd", "not a deepshrink file: magic b'root:x:0'"),
    ("info {d}", "cannot read"),
    ("info {d}/x.dsz --json {d}/missing/x.json", "folder '{d}/missing' does not exist"),
    ("run {d}/x.dsz --data digits --batch-size 0", "argument --batch-size: '0' is not an integer above 0"),
    ("run {d}/x.dsz --data digits --images 0", "argument --images: '0' is not an integer above 0"),
    ("run {d}/x.dsz --input /etc/passwd", "cannot read inputs from /etc/passwd"),
    ("run {d}/x.dsz --data digits --output {d}/missing/out.npy", "folder '{d}/missing' does not exist"),
    ("bench {d}/x.dsz --data digits --batch-sizes 0", "argument --batch-sizes: '0' is not an integer above 0"),
    ("simulate {d}/x.dsz --pes 0", "argument --pes: '0' is not an integer above 0"),
    ("simulate --synthetic 10x10 --density 2", "density=2.0 must be a number in [0, 1]"),
    ("simulate {d}/x.dsz --json {d}/missing/s.json", "folder '{d}/missing' does not exist"),
    ("balance {d}/x.dsz --pes 0", "argument --pes: '0' is not an integer above 0"),
    ("balance {d}/x.dsz --max-elements 0", "argument --max-elements: '0' is not an integer above 0"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = lenet_300_100(in_features=64)
    prune_(model, 0.8)
    share_weights_(model, bits=4)
    deepshrink.save(
        model, folder / "x.dsz", factory="deepshrink.models:lenet_300_100", factory_kwargs={"in_features": 64}
    )
    recipe = "model: lenet-300-100\nmodel_kwargs: {in_features: 64}\ndata: digits\nstate_dict: /etc/passwd\n"
    (folder / "bad.yaml").write_text(recipe + "stages:\n  - train: {epochs: 0.1}\n")
    (folder / "nonsense.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    return folder


@pytest.mark.parametrize(("command", "message"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_on_stderr_with_status_2(command: str, message: str, folder: Path, capsys) -> None:
    argv = [arg.replace("{d}", str(folder)) for arg in command.split()]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message.replace("{d}", str(folder)) in err
