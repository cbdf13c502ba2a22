"""Layers declared int8: the PyTorch model, the file and the engine compute the same int8 products, bit for bit."""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deepshrink.arithmetic import int8_matmul_reference, int8_weights
from deepshrink.compress.int8 import compute_in_float32_, compute_in_int8_, computes_in_int8
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import compressed_tensors, share_weights_
from deepshrink.engine import compile_model, from_file, matrix
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.fileformat.codec import MAGIC, PRELUDE, EncodeOptions, decode_file, encode_file
from deepshrink.fileformat.model_io import load_into, read, save
from deepshrink.recipes import parse_recipe, run_recipe
from deepshrink.recipes.schema import DistillStage, EncodeStage
from deepshrink.tensor import CompressedTensor

simd = pytest.mark.skipif(matrix._simd is None, reason="the engine's int8 kernels need the SIMD extension")


def mlp(widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=len(layers) % 4 == 0), nn.GELU()]
    return nn.Sequential(*layers[:-1]).eval()


def compressed_mlp(widths: tuple[int, ...], sparsity: float, bits: int, seed: int = 0) -> nn.Sequential:
    model = mlp(widths, seed)
    if sparsity:
        prune_(model, sparsity, progress=False)
    share_weights_(model, bits=bits, progress=False)
    return model


def test_a_declared_tensor_says_so_and_unknown_arithmetics_are_refused() -> None:
    t = CompressedTensor.from_dense(torch.tensor([[0.0, 0.5], [0.5, -1.0]]))
    assert t.arithmetic == "float32" and t.with_arithmetic("int8").arithmetic == "int8"
    assert torch.equal(t.with_arithmetic("int8").to_dense(), t.to_dense())
    with pytest.raises(DeepShrinkError, match="arithmetic='int4' is not one of float32, int8"):
        t.with_arithmetic("int4")


def test_declared_layers_output_their_int8_product_and_undeclared_ones_float32() -> None:
    model = compressed_mlp((24, 40, 16), 0.5, 4)
    x = torch.randn(9, 24)
    with torch.no_grad():
        before = model(x)
        assert compute_in_int8_(model, ["2.weight"]) == ["2.weight"]
        hidden = model[1](model[0](x))
        weights, scale, outliers = int8_weights(compressed_tensors(model)["2.weight"])
        expected = int8_matmul_reference(hidden.numpy(), weights, scale, np.zeros(16, np.float32), outliers)
        assert torch.equal(model(x), torch.from_numpy(expected))
        assert 0 < float((model(x) - before).abs().max()) < 0.05  # int8 rounding: changed, not broken
        assert computes_in_int8(model[2]) and not computes_in_int8(model[0])
        assert {n: t.arithmetic for n, t in compressed_tensors(model).items()} == {"0.weight": "float32",
                                                                                   "2.weight": "int8"}  # fmt: skip
        compute_in_float32_(model)
        assert torch.equal(model(x), before) and not computes_in_int8(model[2])


@simd
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(1, 90), min_size=2, max_size=4), sparsity=st.sampled_from([0.0, 0.5, 0.9]),
       bits=st.integers(1, 8), batch=st.integers(1, 40), seed=st.integers(0, 2**16))  # fmt: skip
def test_file_decoded_model_and_engine_agree_bit_for_bit(tmp_path, widths, sparsity, bits, batch, seed) -> None:
    """Any widths, pruned or whole, 1-8 bits (the table kernels and the plain int8 ones), every batch size."""
    model = compressed_mlp(tuple(widths), sparsity, bits, seed)
    compute_in_int8_(model)
    path = tmp_path / f"m{seed}.dsz"
    save(model, path, progress=False)
    assert all(t.arithmetic == "int8" for t in read(path, progress=False).tensors.values())
    decoded = load_into(mlp(tuple(widths), seed + 1), path, progress=False)
    engine = from_file(path, mlp(tuple(widths), seed + 2))
    x = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(decoded(x), expected)
        assert torch.equal(engine(x), expected)
        assert torch.equal(engine(x[:1]), expected[:1])  # a token's result whatever its batch


@simd
def test_the_engine_overrides_the_declaration_only_when_told(tmp_path) -> None:
    model = compressed_mlp((30, 20), 0.5, 4)
    float32 = compile_model(model)
    compute_in_int8_(model)
    path = tmp_path / "m.dsz"
    save(model, path, progress=False)
    x = torch.randn(5, 30)
    with torch.no_grad():
        as_float = from_file(path, mlp((30, 20)), arithmetic="float32")(x)
        torch.testing.assert_close(as_float, float32(x), rtol=0, atol=1e-6)
        assert not torch.equal(as_float, model(x))


def test_only_layers_the_int8_kernels_run_are_declared_and_never_trained() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 8),
                          nn.Linear(8, 3), nn.Embedding(5, 3))  # fmt: skip
    share_weights_(model, bits=3, layers=["0", "1", "3", "5"], progress=False)
    # the grouped convolution and the embedding stay float32, and the plain Linear
    assert compute_in_int8_(model) == ["0.weight", "3.weight"]
    for name, layer in (("1.weight", "Conv2d"), ("5.weight", "Embedding")):
        with pytest.raises(DeepShrinkError, match=rf"{name} \({layer}\): only nn.Linear and nn.Conv1d / nn.Conv2d"):
            compute_in_int8_(model, [name])
    with pytest.raises(DeepShrinkError, match="4.weight is not compressed"):
        compute_in_int8_(model, ["4.weight"])
    with pytest.raises(DeepShrinkError, match="has no compressed layer that can compute in int8"):
        compute_in_int8_(nn.Sequential(nn.Linear(3, 3)))
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(DeepShrinkError, match=r"computes no gradient: call model.eval\(\)"):
        model[:5].train()(x)
    with torch.no_grad():
        model[:5].train()(x)  # no gradient wanted: runs


def test_a_file_declaring_int8_where_no_layer_computes_it_is_refused(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2))
    share_weights_(model, bits=2, progress=False)
    tensors = {"0.weight": compressed_tensors(model)["0.weight"].with_arithmetic("int8"), "0.bias": model[0].bias}
    path = tmp_path / "conv.dsz"
    save(tensors, path, progress=False)
    with pytest.raises(DeepShrinkError, match=r"0.weight \(Conv2d\): only nn.Linear and nn.Conv1d / nn.Conv2d"):
        load_into(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), path, progress=False)
    with pytest.raises(DeepShrinkError, match=r"0.weight \(Conv2d\): only nn.Linear and nn.Conv1d / nn.Conv2d"):
        compile_model(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), read(path, progress=False).tensors)


@simd
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(channels=st.integers(1, 20), out=st.integers(1, 20), kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.integers(1, 3), dilation=st.integers(1, 2), padding=st.sampled_from([0, 1, 2, "same", "valid"]),
       one_d=st.booleans(), sparsity=st.sampled_from([0.0, 0.7]), bits=st.integers(1, 8), batch=st.integers(1, 4),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_convolutions_declared_int8_agree_bit_for_bit(tmp_path, channels, out, kernel, stride, dilation, padding,
                                                      one_d, sparsity, bits, batch, seed) -> None:  # fmt: skip
    """Conv1d and Conv2d of any geometry: each output position's patch is a token, in PyTorch and on the engine."""
    if padding == "same":
        stride = 1  # PyTorch's rule
    conv = nn.Conv1d if one_d else nn.Conv2d
    size = kernel[1] if one_d else kernel

    def model() -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(conv(channels, out, size, stride=stride, padding=padding, dilation=dilation)).eval()

    compressed = model()
    if sparsity:
        prune_(compressed, sparsity, progress=False)
    share_weights_(compressed, bits=bits, progress=False)
    compute_in_int8_(compressed)
    path = tmp_path / f"c{seed}.dsz"
    save(compressed, path, progress=False)
    shape = (batch, channels, 13) if one_d else (batch, channels, 13, 11)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
    with torch.no_grad():
        expected = compressed(x)
        assert torch.equal(load_into(model(), path, progress=False)(x), expected)
        engine = from_file(path, model())
        assert torch.equal(engine(x), expected)
        if not one_d:
            assert torch.equal(engine(x.contiguous(memory_format=torch.channels_last)), expected)


def test_an_unknown_arithmetic_in_a_file_is_named() -> None:
    tensor = CompressedTensor.from_dense(torch.tensor([[0.0, 0.5], [0.5, -1.0]])).with_arithmetic("int8")
    data = encode_file({"w": tensor}, {}, EncodeOptions(), deflate_header=False)
    _, version, flags, length, _ = PRELUDE.unpack_from(data)
    header = data[PRELUDE.size : PRELUDE.size + length]
    assert decode_file(data).tensors["w"].arithmetic == "int8" and header.count(b'"arithmetic":"int8"') == 1
    forged = header.replace(b'"arithmetic":"int8"', b'"arithmetic":"int4"')  # the checksum made right again
    data = PRELUDE.pack(MAGIC, version, flags, length, zlib.crc32(forged)) + forged + data[PRELUDE.size + length :]
    with pytest.raises(FileFormatError, match="tensor 'w': arithmetic='int4' is not one of float32, int8"):
        decode_file(data)


def test_recipe_encode_declares_int8_and_scores_the_model_so(tmp_path) -> None:
    with pytest.raises(DeepShrinkError, match="encode: arithmetic 'int4' is not one of float32, int8"):
        EncodeStage(arithmetic="int4")
    with pytest.raises(DeepShrinkError, match="int8_inputs='yes' must be true or false"):
        DistillStage(int8_inputs="yes")
    recipe = parse_recipe({"model": "lenet-300-100", "model_kwargs": {"in_features": 64}, "data": "digits",
                           "seed": 0, "stages": [{"train": {"epochs": 3, "lr": 0.05}},
                                                 {"share": {"bits": 4, "epochs": 0}},
                                                 {"encode": {"coder": "ans", "arithmetic": "int8"}}]})  # fmt: skip
    out = tmp_path / "digits.dsz"
    result = run_recipe(recipe, out=str(out))
    assert [r["stage"] for r in result["stages"]] == ["0: train", "1: share", "encode: int8"]
    assert result["accuracy"] == result["stages"][-1]["accuracy"] > result["stages"][1]["accuracy"] - 0.05
    assert {t.arithmetic for t in read(out, progress=False).tensors.values()} == {"int8"}


def test_compress_declares_int8_from_the_command_line_and_info_marks_it(tmp_path, capsys) -> None:
    from deepshrink import cli

    out = tmp_path / "demo.dsz"
    args = ["compress", "--recipe", "digits-demo", "--max-steps", "4", "--arithmetic", "int8", "--out", str(out)]
    assert cli.main(args) == 0
    assert "in int8: accuracy" in capsys.readouterr().out
    declared = {n for n, t in read(out, progress=False).tensors.items() if t.arithmetic == "int8"}
    assert declared and declared == set(read(out, progress=False).tensors)  # digits-demo: Linear layers only
    assert cli.main(["info", str(out), "--wide"]) == 0
    assert f"{sorted(declared)[0]} (int8)" in capsys.readouterr().out  # --wide: names whole
    assert cli.main(["compress", "--recipe", "digits-demo", "--arithmetic", "int4"]) == 2


@simd
def test_lenet300_declared_int8_on_real_mnist(trained_lenet300, mnist_test, tmp_path) -> None:
    """Real data: declared int8 costs LeNet-300-100 (90% pruned, 4 bits) little accuracy, and the engine computes
    the declared model's logits exactly, image by image and in batches."""
    from deepshrink.compress.train import evaluate
    from deepshrink.models import lenet_300_100

    model = trained_lenet300.eval()
    prune_(model, 0.9, progress=False)
    share_weights_(model, bits=4, progress=False)
    images, labels = mnist_test
    images, labels = images[:2000], labels[:2000]
    before = evaluate(model, (images, labels), progress=False)
    compute_in_int8_(model)
    declared = evaluate(model, (images, labels), progress=False)
    assert abs(declared - before) < 0.005, (before, declared)
    path = tmp_path / "lenet300.dsz"
    save(model, path, factory="deepshrink.models:lenet_300_100", progress=False)
    engine = from_file(path)
    assert isinstance(engine, nn.Module) and type(lenet_300_100()) is type(engine)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(engine(images), expected)
        assert torch.equal(torch.cat([engine(images[i : i + 1]) for i in range(64)]), expected[:64])


def test_exports_warn_that_the_declaration_is_not_carried(tmp_path) -> None:
    pytest.importorskip("onnx", reason="needs onnx: pip install 'deepshrink[test]'")
    from deepshrink.fileformat.export import export_file, export_onnx

    model = compressed_mlp((6, 5, 3), 0.0, 3)
    compute_in_int8_(model)
    with pytest.warns(UserWarning, match="exported computing in float32"):
        export_onnx(model, torch.randn(2, 6), tmp_path / "m.onnx")
    assert computes_in_int8(model[0])  # the model itself keeps its declaration
    save(model, tmp_path / "m.dsz", progress=False)
    with pytest.warns(UserWarning, match="declares layers int8; .safetensors holds their decoded float32 weights"):
        export_file(tmp_path / "m.dsz", tmp_path / "m.safetensors")


def test_fake_int8_rounds_as_the_products_do_and_passes_the_gradient() -> None:
    from deepshrink.arithmetic import quantize_int8
    from deepshrink.compress.int8 import fake_int8

    x = (torch.randn(6, 37) * torch.tensor([1e-3, 1.0, 1e3, 1.0, 1.0, 1.0])[:, None]).requires_grad_()
    with torch.no_grad():
        x[3] = 0.0  # an all-zero token stays zero
    y = fake_int8(x)
    q, scale = quantize_int8(x.detach().numpy())
    torch.testing.assert_close(y.detach(), torch.from_numpy(q * scale[:, None]).float(), rtol=1e-6, atol=0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_distillation_with_int8_inputs_brings_the_declared_model_closer_to_the_teacher() -> None:
    from deepshrink.compress.distill import DistillConfig, distill, relative_error
    from deepshrink.data.digits import load_digits

    torch.manual_seed(0)
    images = load_digits("train")[0][:512].reshape(512, -1)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    student = copy.deepcopy(teacher)
    share_weights_(student, bits=3, progress=False)
    batches = [images[i : i + 32] for i in range(0, 512, 32)]
    cfg = DistillConfig(steps=40, lr=3e-3, int8_inputs=True, progress=False)
    compute_in_int8_(student)
    with torch.no_grad():
        before = relative_error(student(images), teacher(images)).item()
    compute_in_float32_(student)
    distill(student, teacher, batches, cfg)
    assert not any(m._forward_pre_hooks for m in student.modules())  # the rounding is gone after training
    compute_in_int8_(student)
    with torch.no_grad():
        after = relative_error(student(images), teacher(images)).item()
    assert after < 0.8 * before
