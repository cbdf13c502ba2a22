"""The engine on whole CNNs (ResNet-18, MobileNetV2) against dense PyTorch, side by side.

``python benchmarks/bench_cnn.py [--repeats 5] [--batches 1 8] [--sparsity 0.5 0.7] [--publish]``

Each model is built with torchvision's layout (written out here: torchvision's wheels do not
load beside the CPU build of torch these machines use), initialised at random (seeded; no
weights are downloaded: speed does not depend on what the weights learned), magnitude-pruned
layer by layer to ``--sparsity`` and shared at 4 bits, as Deep Compression does, BatchNorm's
statistics then set from random images (activations keep their scale through the depth). Timed, each
on ``--size`` images (224 x 224), every library with ``--threads`` threads, blocks interleaved:

- torch fp32: the decoded model (dense weights), NCHW and channels-last (oneDNN's faster
  layout on most CPUs; the better of the two is the baseline),
- the engine in float32 (``compile_model``): direct sparse convolutions or products of their
  patches (each layer's choice), outputs the decoded model's,
- the engine in int8 (``arithmetic="int8"``): each output position's patch a token, VNNI
  products; grouped (depthwise) convolutions stay in float32.

Difference = largest absolute difference of the logits from the decoded model's, over the
largest logit. Writes ``results/cnn.{json,md}`` (``--publish``: ``docs/results/cnn.md``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import warnings

import torch
from torch import nn

from deepshrink.compress.parametrization import bake_
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.engine import compile_model
from deepshrink.engine.runner import median_seconds
from deepshrink.progress import track

from common import add_output, add_threads, start_run, write_results


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 (11.7 M parameters, 1.8 G multiply-adds per image)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)] + ([nn.ReLU6()] if relu else [])


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, cout, 1, relu=False)
        self.block, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


def mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 (3.5 M parameters, 0.3 G multiply-adds per image; depthwise 3 x 3 convolutions)."""
    layers, cin = _conv_bn(3, 32, 3, 2), 32
    for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                          (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
        for i in range(repeats):
            layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += _conv_bn(cin, 1280, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000))


MODELS = {"ResNet-18": resnet18, "MobileNetV2": mobilenet_v2}
ENGINES = ("engine", "engine int8")


def run(name: str, sparsity: float, batches: list[int], repeats: int, size: int = 224) -> list[dict]:
    """One model at one sparsity: its rows, one per batch size."""
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    prune_(net, sparsity)
    share_weights_(net, bits=4)
    _calibrate_batchnorm(net, size)
    decoded = bake_(copy.deepcopy(net)).eval()
    nhwc = copy.deepcopy(decoded).to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # depthwise convolutions stay in float32 in int8, with a warning each
        engine, engine8 = compile_model(net), compile_model(net, arithmetic="int8")
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        runs = {"torch fp32": (decoded, x), "torch fp32 channels-last": (nhwc, x_nhwc)}
        for engine_name, model in (("engine", engine), ("engine int8", engine8)):
            runs |= {f"{engine_name} NCHW": (model, x), f"{engine_name} channels-last": (model, x_nhwc)}
        fns = {name: functools.partial(model, inputs) for name, (model, inputs) in runs.items()}
        with torch.inference_mode():
            reference = decoded(x)
            scale = float(reference.abs().max())
            errors = {k: float((fns[f"{k} NCHW"]() - reference).abs().max()) / scale for k in ENGINES}
            seconds = median_seconds(fns, repeats, block_seconds=0.0)
        ms = {k: v * 1e3 for k, v in seconds.items()}
        best = min(ms["torch fp32"], ms["torch fp32 channels-last"])
        # the engine's output has its input's format: each engine column is the faster of the two
        formats = {k: min(("NCHW", "channels-last"), key=lambda f, k=k: ms[f"{k} {f}"]) for k in ENGINES}
        ms |= {k: ms[f"{k} {formats[k]}"] for k in ENGINES}
        rows.append({"model": name, "sparsity": sparsity, "batch": batch, "ms": ms, "errors": errors,
                     "formats": formats, "x torch": {k: best / ms[k] for k in ENGINES}})  # fmt: skip
    return rows


def _calibrate_batchnorm(net: nn.Module, size: int) -> None:
    """BatchNorm's statistics from two batches of random images, as one recalibrates them after pruning.

    Left at their defaults, the activations of a random pruned network shrink layer by layer
    (MobileNetV2's logits were its classifier's bias alone): nothing left to compare.
    """
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    net.train()
    with torch.no_grad():
        for seed in range(2):
            net(torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(100 + seed)))
    net.eval()


def markdown(result: dict) -> str:
    out = [
        "# The engine on whole CNNs against dense PyTorch",
        "",
        f"`python benchmarks/bench_cnn.py {' '.join(result['argv'])}`, {result['date']}. Machine: {result['cpu']}, "
        f"{result['threads']} threads for every library; load average {result['load'][0]} when it started and "
        f"{result['load'][1]} when it ended (a shared machine). Models built with torchvision's layout, random "
        "weights (seeded), each layer magnitude-pruned to the sparsity and shared at 4 bits, BatchNorm's statistics "
        f"then set from random images; {result['size']} x {result['size']} images. "
        f"Milliseconds per forward, median of {result['repeats']} interleaved runs. `x torch` = the faster torch "
        "layout's time / the engine's. Difference = largest difference of the logits from the decoded model's / "
        "largest logit. MobileNetV2's depthwise convolutions run in float32 in the int8 column. The engine's "
        "output has its input's memory format (as `nn.Conv2d`'s); each engine column is the faster of NCHW and "
        "channels-last images, (CL) marking the latter.",
        "",
        "| model | sparsity | batch | torch fp32 ms | torch channels-last ms | engine ms | engine int8 ms | "
        "engine x torch | int8 x torch | difference: engine / int8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms, x, e = r["ms"], r["x torch"], r["errors"]
        f = {k: " (CL)" if v == "channels-last" else "" for k, v in r["formats"].items()}
        out.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['batch']} | {ms['torch fp32']:,.1f} | "
                   f"{ms['torch fp32 channels-last']:,.1f} | {ms['engine']:,.1f}{f['engine']} | "
                   f"{ms['engine int8']:,.1f}{f['engine int8']} | "
                   f"{x['engine']:.2f} | {x['engine int8']:.2f} | {e['engine']:.1e} / {e['engine int8']:.1e} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per library (the median is reported)")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    add_threads(parser)
    add_output(parser, publish=True)
    args = parser.parse_args(argv)
    result = start_run(args, argv)
    result.update(repeats=args.repeats, size=args.size, load=[" ".join(f"{v:.2f}" for v in os.getloadavg())], rows=[])
    settings = [(m, s) for m in args.models for s in args.sparsity]
    for model, sparsity in track(settings, "models"):
        result["rows"] += run(model, sparsity, args.batches, args.repeats, args.size)
    result["load"].append(" ".join(f"{v:.2f}" for v in os.getloadavg()))
    write_results(args, "cnn", result, markdown)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
