"""Saving and loading real compressed models: bit-identical reload, accounting, info, export, options."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.fileformat.info import size_breakdown
from deepshrink.fileformat.model_io import load, load_into, read, save, split_model
from deepshrink.models import lenet_5, lenet_300_100
from deepshrink.tensor import CompressedTensor

# Kept fractions of Deep Compression's LeNets (docs/references.md): 8/9/26% and 66/12/8/19%.
LENET300_SPARSITY = {"fc1.*": 0.92, "fc2.*": 0.91, "fc3.*": 0.74}
LENET5_SPARSITY = {"conv1.*": 0.34, "conv2.*": 0.88, "fc1.*": 0.92, "fc2.*": 0.81}


@pytest.fixture
def lenet300(trained_lenet300: nn.Module) -> nn.Module:
    """LeNet-300-100 trained on MNIST, pruned to the paper's per-layer density, 6-bit shared."""
    prune_(trained_lenet300, sparsity=LENET300_SPARSITY)
    share_weights_(trained_lenet300, bits=6)
    return trained_lenet300.eval()


@pytest.fixture(scope="module")
def lenet5() -> nn.Module:
    """LeNet-5 at the paper's densities, 8-bit conv / 5-bit fc codes (initial weights: only the structure matters)."""
    torch.manual_seed(0)
    model = lenet_5()
    prune_(model, sparsity=LENET5_SPARSITY)
    share_weights_(model)
    return model.eval()


def assert_same_tensors(a: dict[str, CompressedTensor], b: dict[str, CompressedTensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.bits == y.bits, name
        assert np.array_equal(x.positions, y.positions), name
        assert np.array_equal(x.codes, y.codes), name
        assert x.codebook.tobytes() == y.codebook.tobytes(), name  # bit for bit, -0.0 and NaN included


@pytest.mark.parametrize("coder", ["none", "huffman", "ans"])
@pytest.mark.parametrize("layout", ["auto", "relative", "bitmap", "holes"])
def test_lenet300_reloads_bit_identical(lenet300, mnist_test, tmp_path: Path, coder: str, layout: str) -> None:
    path = tmp_path / "m.dsz"
    size = save(lenet300, path, coder=coder, layout=layout, factory="deepshrink.models:lenet_300_100")
    assert size == path.stat().st_size
    tensors, arrays = split_model(lenet300)
    contents = read(path)
    assert_same_tensors(tensors, contents.tensors)
    assert contents.arrays.keys() == arrays.keys()
    assert all(torch.equal(arrays[k], contents.arrays[k]) for k in arrays)
    reloaded = load(path)
    images = mnist_test[0][:512]
    with torch.no_grad():
        assert torch.equal(lenet300(images), reloaded.eval()(images))
    assert_same_tensors(tensors, split_model(reloaded)[0])


def test_lenet5_conv_layers_reload_and_pick_layouts(lenet5, mnist_test, tmp_path: Path) -> None:
    path = tmp_path / "l5.dsz"
    save(lenet5, path, coder="huffman", factory="deepshrink.models:lenet_5")
    header = read(path).header
    layouts = {e["name"]: e["index"] for e in header["tensors"] if e["kind"] == "compressed"}
    assert layouts["conv1.weight"]["ib"] == 8 and layouts["fc1.weight"]["ib"] == 5  # the paper's defaults
    sizes = {t.name: t for t in size_breakdown(path).tensors}
    # conv1 keeps 66%: a bitmap (at most 1 bit a position) beats 8-bit relative indices.
    assert layouts["conv1.weight"]["layout"] == "bitmap"
    assert sizes["conv1.weight"].index_bytes * 8 < sizes["conv1.weight"].fixed_index_bits
    with torch.no_grad():
        assert torch.equal(lenet5(mnist_test[0][:256]), load(path).eval()(mnist_test[0][:256]))


def test_per_tensor_index_bits_and_fp16_codebook(lenet5, tmp_path: Path) -> None:
    path = tmp_path / "l5.dsz"
    save(lenet5, path, layout="relative", index_bits={"fc1.weight": 3}, codebook_dtype="float16")
    contents = read(path)
    ib = {e["name"]: e["index"]["ib"] for e in contents.header["tensors"] if e["kind"] == "compressed"}
    assert ib == {"conv1.weight": 8, "conv2.weight": 8, "fc1.weight": 3, "fc2.weight": 5}
    original = split_model(lenet5)[0]
    for name, ct in contents.tensors.items():
        assert np.array_equal(ct.codebook, original[name].codebook.astype(np.float16).astype(np.float32))
        assert np.array_equal(ct.positions, original[name].positions)


def test_entropy_coding_shrinks_the_real_model(lenet300, tmp_path: Path) -> None:
    sizes = {c: save(lenet300, tmp_path / f"{c}.dsz", coder=c, layout="relative") for c in ("none", "huffman", "ans")}
    assert sizes["huffman"] < 0.95 * sizes["none"]
    assert sizes["ans"] < sizes["none"]
    report = size_breakdown(tmp_path / "none.dsz")
    fc1 = report.tensors[0]
    assert fc1.codes_bytes == -(-fc1.fixed_code_bits // 8)  # fixed width: exactly bits x kept, padded to a byte


def test_breakdown_adds_up_to_the_file(lenet300, tmp_path: Path) -> None:
    path = tmp_path / "m.dsz"
    save(lenet300, path, coder="ans")
    report = size_breakdown(path)
    parts = sum(t.total_bytes for t in report.tensors) + report.array_bytes + report.overhead_bytes
    assert parts == report.total_bytes == path.stat().st_size
    assert report.array_names == ["fc1.bias", "fc2.bias", "fc3.bias"]
    assert report.dense_bytes == 4 * sum(p.numel() for p in lenet_300_100().parameters())
    for t in report.tensors:
        ct = read(path).tensors[t.name]
        assert (t.nnz, t.numel) == (ct.nnz, ct.numel)
        assert t.fixed_index_bits == ct.fixed_width_bits(t.index_bits)["index"]
    assert 0 < report.overhead_bytes < 0.1 * report.total_bytes


def test_info_cli_prints_the_table(lenet300, tmp_path: Path, capsys, monkeypatch) -> None:
    from deepshrink import cli
    from deepshrink.cli import main

    monkeypatch.setattr(cli.console, "width", 200)  # one line per row, so the test can read them
    path = tmp_path / "m.dsz"
    save(lenet300, path)
    assert main(["info", str(path), "--json", str(tmp_path / "info.json")]) == 0
    out = capsys.readouterr().out
    assert "header + framing" in out and f"{path.stat().st_size:,}" in out
    assert "huffman" in out and "ans" in out
    data = json.loads((tmp_path / "info.json").read_text())
    assert data["total_bytes"] == path.stat().st_size and len(data["tensors"]) == 3
    assert main(["info", str(tmp_path / "missing.dsz")]) == 2


def test_user_architecture_with_load_into(mnist_test, tmp_path: Path) -> None:
    class Tower(nn.Module):  # a custom, nested model with a norm buffer
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.BatchNorm1d(64), nn.ReLU())
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    torch.manual_seed(1)
    model = Tower().eval()
    model.body[2].running_mean.uniform_(-0.1, 0.1)
    prune_(model, sparsity=0.8)
    share_weights_(model, bits=4)
    save(model, tmp_path / "t.dsz")
    contents = load(tmp_path / "t.dsz")  # no factory: tensors and arrays come back
    assert set(contents.tensors) == {"body.1.weight", "head.weight"}
    assert "body.2.running_mean" in contents.arrays
    fresh = load_into(Tower().eval(), tmp_path / "t.dsz")
    with torch.no_grad():
        assert torch.equal(model(mnist_test[0][:64]), fresh(mnist_test[0][:64]))
    with pytest.raises(DeepShrinkError, match="not a compressible weight|does not fit"):
        load_into(lenet_300_100(), tmp_path / "t.dsz")


def test_factories_are_not_imported_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "lin.dsz"
    save(nn.Linear(2, 3), path, factory="torch.nn:Linear", factory_kwargs={"in_features": 2, "out_features": 3})
    with pytest.raises(DeepShrinkError, match="trust_factory=True"):
        load(path)
    assert isinstance(load(path, trust_factory=True), nn.Linear)
    assert isinstance(load(path, model=nn.Linear(2, 3)), nn.Linear)
    assert "this" not in sys.modules  # importing `this` prints; it must never happen on load
    save(nn.Linear(2, 3), path, factory="this:x")
    with pytest.raises(DeepShrinkError, match="trust_factory"):
        load(path)
    assert "this" not in sys.modules
    save(nn.Linear(2, 3), path, factory="deepshrink.models:LeNetDoesNotExist")
    with pytest.raises(DeepShrinkError, match="not one of deepshrink.models"):
        load(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coder": "zip"}, "coder='zip' must be one of 'none', 'huffman', 'ans'"),
        ({"layout": "csr"}, "layout='csr' must be one of"),
        ({"codebook_dtype": "int8"}, "codebook_dtype='int8' must be one of float32, float16"),
        ({"index_bits": 0}, "index_bits=0 must be an integer in 1..16"),
        ({"index_bits": {"fc1.weight": 17}}, "index_bits=17"),
        ({"index_bits": {"fc1": 4}}, "index_bits names ['fc1'], which are not compressed tensors"),
        ({"factory": "os.system"}, "must look like 'package.module:function'"),
        ({"metadata": {"x": object()}}, "plain JSON"),
    ],
)
def test_bad_options_name_the_allowed_values(lenet5, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DeepShrinkError, match=re.escape(message)):
        save(lenet5, tmp_path / "x.dsz", **kwargs)
    assert not (tmp_path / "x.dsz").exists()


def test_plain_dtypes_roundtrip(tmp_path: Path) -> None:
    arrays = {
        "f32": torch.randn(3, 2), "f16": torch.randn(4).half(), "bf16": torch.randn(5).bfloat16(),
        "f64": torch.randn(2).double(), "i64": torch.arange(-3, 3), "u8": torch.arange(7, dtype=torch.uint8),
        "b": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }  # fmt: skip
    save(arrays, tmp_path / "a.dsz")
    back = read(tmp_path / "a.dsz").arrays
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    with pytest.raises(DeepShrinkError, match="complex64 cannot be stored"):
        save({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.dsz")


def _layernorm_net() -> nn.Module:
    """Linear, LayerNorm (weight and bias), Linear: the plain arrays of a transformer block in miniature."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    with torch.no_grad():
        net[1].weight.normal_(1.0, 0.1)
        net[1].bias.normal_(0.0, 0.1)
    net.register_buffer("steps", torch.tensor([3, 1], dtype=torch.int64))
    prune_(net, 0.5)
    share_weights_(net, bits=4)
    return net.eval()


def test_float16_arrays_read_back_as_float32_rounded(tmp_path: Path) -> None:
    net = _layernorm_net()
    exact, half = tmp_path / "f32.dsz", tmp_path / "f16.dsz"
    save(net, exact)
    save(net, half, array_dtype="float16")
    _, arrays = split_model(net)
    back = read(half).arrays
    for name, value in arrays.items():
        expected = value.half().to(value.dtype) if value.is_floating_point() else value
        assert back[name].dtype == value.dtype and torch.equal(back[name], expected), name
    assert not torch.equal(back["1.weight"], net[1].weight.detach())  # really rounded
    floats = sum(v.numel() for v in arrays.values() if v.is_floating_point())
    report = size_breakdown(half)
    assert size_breakdown(exact).array_bytes - report.array_bytes == 2 * floats  # every float at 2 bytes, not 4
    assert report.array_bytes == 2 * floats + 8 * 2  # the int64 buffer as it is
    assert sorted(report.array_dtypes) == sorted(["float16"] * (len(arrays) - 1) + ["int64"])
    assert report.total_bytes == os.path.getsize(half)
    assert report.array_dense_bytes == size_breakdown(exact).array_dense_bytes  # the same fp32 baseline
    rounded = load_into(_layernorm_net(), half)
    reference = _layernorm_net()
    with torch.no_grad():
        for p in (reference[0].bias, reference[1].weight, reference[1].bias, reference[2].bias):
            p.copy_(p.half().float())
        x = torch.randn(5, 16)
        assert torch.equal(rounded(x), reference(x))


def test_float16_arrays_refuse_nothing_valid_and_keep_the_nonfinite_checks(tmp_path: Path) -> None:
    path = tmp_path / "a.dsz"
    arrays = {
        "big": torch.tensor([1.0, 1e6]), "tiny": torch.tensor([1e-9, -3.0]), "f64": torch.tensor([0.1], dtype=torch.float64),
        "f16": torch.tensor([0.5]).half(), "bf16": torch.tensor([0.3]).bfloat16(), "i8": torch.tensor([-1], dtype=torch.int8),
    }  # fmt: skip
    save(arrays, path, array_dtype="float16")
    back, stored = read(path).arrays, {e["name"]: e["dtype"] for e in read(path).header["tensors"]}
    assert torch.equal(back["big"], arrays["big"]) and stored["big"] == "float32"  # 1e6 overflows float16: kept exact
    assert torch.equal(back["tiny"], arrays["tiny"].half().float()) and back["tiny"][0] == 0  # underflow is rounding
    assert back["f64"].dtype == torch.float64 and back["f64"].item() == torch.tensor(0.1).half().item()
    for name in ("f16", "bf16", "i8"):
        assert back[name].dtype == arrays[name].dtype and torch.equal(back[name], arrays[name]), name
    with pytest.raises(DeepShrinkError, match="b: the array holds NaN or infinity"):
        save({"b": torch.tensor([1.0, float("nan")])}, path, array_dtype="float16")
    save({"b": torch.tensor([1.0, float("inf")])}, path, array_dtype="float16", allow_nonfinite=True)
    with pytest.raises(FileFormatError, match="'b': the array holds NaN or infinity"):
        read(path)
    assert read(path, allow_nonfinite=True).arrays["b"].tolist() == [1.0, float("inf")]
    with pytest.raises(DeepShrinkError, match="array_dtype='int8' must be one of float32, float16"):
        save(arrays, path, array_dtype="int8")


def test_empty_and_all_zero_tensors_roundtrip(tmp_path: Path) -> None:
    tensors = {
        "zero": CompressedTensor((4, 5), np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(1, np.float32), 1),
        "empty": CompressedTensor((0, 3), np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32), 2),
        "full": CompressedTensor.from_dense(torch.tensor([[1.0, -1.0, 1.0]])),
        "far": CompressedTensor((100_000,), np.array([0, 99_999]), np.array([0, 1]), np.array([1, 2], np.float32), 1),
    }
    for coder in ("none", "huffman", "ans"):
        save(tensors, tmp_path / "z.dsz", coder=coder)
        assert_same_tensors(tensors, read(tmp_path / "z.dsz").tensors)


@pytest.mark.parametrize("layout", ["auto", "holes"])
def test_a_tensor_kept_whole_stores_no_index(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    prune_(net[2], 0.01, progress=False)  # 5 of 512 weights go
    share_weights_(net, bits=4, progress=False)
    path = tmp_path / "whole.dsz"
    save(net, path, coder="ans", layout=layout)
    index = {e["name"]: e["index"] for e in read(path).header["tensors"] if e["kind"] == "compressed"}
    assert index["0.weight"]["layout"] == "holes" and index["0.weight"]["n"] == 0
    assert {t.name: t.index_bytes for t in size_breakdown(path).tensors}["0.weight"] == 0
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.equal(net(x), load_into(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), path)(x))


def test_save_is_atomic(lenet5, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.dsz"
    save(lenet5, path)
    before = path.read_bytes()

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(lenet5, path, coder="ans")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.dsz"]  # no temporary file left behind


def test_export_safetensors_and_onnx(lenet5, mnist_test, tmp_path: Path) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator
    from safetensors.torch import load_file

    from deepshrink.cli import main

    path = tmp_path / "l5.dsz"
    save(lenet5, path, factory="deepshrink.models:lenet_5")
    assert main(["export", str(path), str(tmp_path / "l5.safetensors")]) == 0
    dense = load_file(tmp_path / "l5.safetensors")
    for name, ct in read(path).tensors.items():
        assert torch.equal(dense[name], ct.to_dense())
    assert torch.equal(dense["fc2.bias"], lenet5.fc2.bias.detach())
    assert main(["export", str(path), str(tmp_path / "l5.onnx"), "--input-shape", "1,1,28,28"]) == 0
    graph = onnx.load(tmp_path / "l5.onnx")
    onnx.checker.check_model(graph)
    images = mnist_test[0][:8]
    (got,) = ReferenceEvaluator(graph).run(None, {"input": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, lenet5(images).numpy(), rtol=1e-4, atol=1e-4)
    assert main(["export", str(path), str(tmp_path / "l5.pt")]) == 2


# -- the reader's limits: budget, NaN and infinity, models a file's factory builds -----------------------------


def test_budget_refuses_a_file_before_decoding_and_a_caller_can_raise_it(lenet5, tmp_path: Path) -> None:
    from deepshrink.fileformat.codec import read_limits

    path = tmp_path / "l5.dsz"
    save(lenet5, path)
    with pytest.raises(FileFormatError, match="max_elements=1,000"):
        read(path, max_elements=1000)
    with read_limits(max_elements=1000), pytest.raises(FileFormatError, match="max_elements=1,000"):
        load(path)  # the limit of the innermost read_limits applies to reads made anywhere inside
    assert_same_tensors(read(path, max_elements=10**6).tensors, split_model(lenet5)[0])
    with pytest.raises(DeepShrinkError, match="max_elements=-1 must be a non-negative integer"):
        read(path, max_elements=-1)


def test_nan_and_infinity_are_refused_at_save_and_load_unless_allowed(lenet5, tmp_path: Path) -> None:
    import copy

    broken = copy.deepcopy(lenet5)
    with torch.no_grad():
        broken.fc2.parametrizations.weight[0].codebook[3] = float("nan")
    path = tmp_path / "nan.dsz"
    with pytest.raises(DeepShrinkError, match="fc2.weight: the codebook holds NaN or infinity"):
        save(broken, path)
    assert not path.exists()
    save(broken, path, allow_nonfinite=True)
    with pytest.raises(FileFormatError, match="'fc2.weight': the codebook holds NaN"):
        read(path)
    assert np.isnan(read(path, allow_nonfinite=True).tensors["fc2.weight"].codebook[3])
    with pytest.raises(DeepShrinkError, match="b: the array holds NaN or infinity"):
        save({"b": torch.tensor([1.0, float("-inf")])}, path)


def test_a_file_whose_kwargs_lie_builds_nothing_big(lenet5, tmp_path: Path) -> None:
    from deepshrink.fileformat.codec import decode_file, encode_file

    tensors, arrays = split_model(lenet5)
    for kwargs, match in [
        ({"in_channels": 3000}, "does not fit the model its factory 'deepshrink.models:lenet_5' builds"),
        ({"num_classes": 10**9}, "does not fit the model"),
        ({"num_classes": "10"}, "num_classes='10' must be int"),
        ({"dropout": 5}, "dropout=5 must be a number in"),
        ({"width": 5}, "rejects kwargs"),
    ]:
        data = encode_file(tensors, arrays, model={"factory": "deepshrink.models:lenet_5", "kwargs": kwargs})
        (tmp_path / "lie.dsz").write_bytes(data)
        with pytest.raises(FileFormatError, match=match):
            load(tmp_path / "lie.dsz")
    contents = decode_file(encode_file(tensors, arrays, model={"factory": "deepshrink.models:lenet_5", "kwargs": {}}))
    from deepshrink.fileformat.model_io import model_from_file

    with pytest.raises(FileFormatError, match="building the model needs the file's tensors dense: 431,080 elements"):
        model_from_file(contents, max_elements=400_000)
    rebuilt = model_from_file(contents)
    assert torch.equal(rebuilt.conv2.weight, lenet5.conv2.weight)
