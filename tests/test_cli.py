"""The CLI is a thin layer: every command has --help; compress runs end to end on the bundled digits."""

import pytest
import torch

import deepshrink
from deepshrink.cli import build_parser, main
from deepshrink.data.digits import load_digits
from deepshrink.engine import from_file


def _commands():
    parser = build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: deepshrink " + command in capsys.readouterr().out


def test_compress_on_digits_writes_a_file_that_rebuilds_the_model(capsys, tmp_path):
    path = tmp_path / "digits.dsz"
    code = main(
        [
            "compress",
            "--model",
            "lenet-300-100",
            "--model-kwargs",
            '{"in_features": 64}',
            "--data",
            "digits",
            "--pretrain-epochs",
            "1",
            "--sparsity",
            "0.8",
            "--prune-steps",
            "2",
            "--bits",
            "fc=4",
            "--epochs",
            "0.2",
            "--lr",
            "0.05",
            "--out",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "fc1.weight" in out and "after 2: share" in out
    model = deepshrink.load(path)  # the factory and its kwargs were recorded
    assert model.fc1.weight.shape == (300, 64)
    assert float((model.fc1.weight != 0).float().mean()) == pytest.approx(0.2, abs=1e-3)


def test_compress_flags_follow_the_seed(tmp_path):
    def run(seed: str) -> bytes:
        out = tmp_path / f"seed{seed}.dsz"
        args = ["compress", "--model-kwargs", '{"in_features": 64}', "--data", "digits", "--pretrain-epochs", "1"]
        assert main(args + ["--max-steps", "3", "--seed", seed, "--out", str(out)]) == 0
        return out.read_bytes()

    first = run("3")
    assert run("3") == first and run("4") != first  # the initialisation and the training follow --seed


def test_array_dtype_rounds_the_plain_arrays_with_flags_or_a_recipe(tmp_path):
    from deepshrink.cli import _set_encode
    from deepshrink.recipes import load_recipe, parse_recipe

    out = tmp_path / "f16.dsz"
    args = ["compress", "--model-kwargs", '{"in_features": 64}', "--data", "digits", "--max-steps", "2"]
    assert main(args + ["--array-dtype", "float16", "--out", str(out)]) == 0
    stored = {e["name"]: e["dtype"] for e in deepshrink.read(out).header["tensors"] if e["kind"] == "array"}
    assert stored == {"fc1.bias": "float16", "fc2.bias": "float16", "fc3.bias": "float16"}
    assert main(args + ["--array-dtype", "float64"]) == 2
    recipe = load_recipe("digits-demo")  # ends in an encode stage: the flag changes that stage only
    _set_encode(recipe, {"array_dtype": "float16", "arithmetic": "int8"})
    assert recipe.stages[-1].array_dtype == "float16" and recipe.stages[-1].coder == "huffman"
    assert recipe.stages[-1].arithmetic == "int8"
    recipe = parse_recipe({"model": "lenet-300-100", "data": "digits", "stages": [{"train": {}}]})
    _set_encode(recipe, {"array_dtype": "float16"})
    assert recipe.stages[-1].array_dtype == "float16" and len(recipe.stages) == 2


def test_bad_input_gives_named_error(capsys):
    assert main(["compress", "--data", "digits", "--sparsity", "1.5"]) == 2
    assert "sparsity=1.5" in capsys.readouterr().err
    assert main(["compress", "--model", "nosuch", "--data", "digits"]) == 2
    assert "'nosuch'" in capsys.readouterr().err


def test_demo_compresses_the_bundled_digits(capsys, tmp_path):
    path = tmp_path / "demo.dsz"
    assert main(["demo", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bits per symbol" in out and "dense ->" in out
    model = deepshrink.load(path).eval()
    assert all(float((w != 0).float().mean()) <= 0.1 + 1e-3 for w in (model.fc1.weight, model.fc2.weight))
    # the end of the path, with no downloaded data: the file on the sparse engine
    images, labels = load_digits("test")
    with torch.no_grad():
        decoded = model(images)
    fast = from_file(path)(images)
    assert torch.allclose(fast, decoded, atol=1e-4)
    assert float((fast.argmax(1) == labels).float().mean()) > 0.9
