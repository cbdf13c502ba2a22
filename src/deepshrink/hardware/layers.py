"""Synthetic layers: random sparse matrices and activations, and EIE's benchmark layers.

Real compressed models come from the pipeline; these stand in when the question is
"what would a layer of this size and sparsity cost on EIE", as in the EIE paper's
benchmark table (restated in ``docs/references.md``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

EIE_WEIGHT_BITS = 4  # EIE's 4-bit index into a 16-entry codebook (Han et al., ISCA 2016)


@dataclass(frozen=True)
class BenchmarkLayer:
    """One layer of EIE's benchmark table.

    Args:
        name: as the paper names it (``"Alex-7"``).
        inputs: input length (matrix columns).
        outputs: output length (matrix rows).
        weight_density: fraction of weights kept.
        act_density: fraction of non-zero input activations.
    """

    name: str
    inputs: int
    outputs: int
    weight_density: float
    act_density: float


# EIE (Han et al., ISCA 2016), benchmark table; sizes written "inputs x outputs" there.
EIE_BENCHMARK_LAYERS: tuple[BenchmarkLayer, ...] = (
    BenchmarkLayer("Alex-6", 9216, 4096, 0.09, 0.351),
    BenchmarkLayer("Alex-7", 4096, 4096, 0.09, 0.353),
    BenchmarkLayer("Alex-8", 4096, 1000, 0.25, 0.375),
    BenchmarkLayer("VGG-6", 25088, 4096, 0.04, 0.183),
    BenchmarkLayer("VGG-7", 4096, 4096, 0.04, 0.375),
    BenchmarkLayer("VGG-8", 4096, 1000, 0.23, 0.411),
    BenchmarkLayer("NT-We", 4096, 600, 0.10, 1.0),
    BenchmarkLayer("NT-Wd", 600, 8791, 0.11, 1.0),
    BenchmarkLayer("NT-LSTM", 1201, 2400, 0.10, 1.0),
)


def benchmark_layer(name: str) -> BenchmarkLayer:
    """Look up an EIE benchmark layer by name (case-insensitive).

    Raises:
        DeepShrinkError: for an unknown name; the message lists the known ones.

    Examples:
        >>> benchmark_layer("alex-7").inputs
        4096
    """
    for layer in EIE_BENCHMARK_LAYERS:
        if layer.name.lower() == name.lower():
            return layer
    known = ", ".join(layer.name for layer in EIE_BENCHMARK_LAYERS)
    raise DeepShrinkError(f"unknown EIE benchmark layer {name!r}; known layers: {known}")


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"INPUTSxOUTPUTS"`` (EIE's way of writing a layer size) into ``(inputs, outputs)``.

    Raises:
        DeepShrinkError: if the text is not two positive integers joined by ``x``.

    Examples:
        >>> parse_size("9216x4096")
        (9216, 4096)
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise DeepShrinkError(f"layer size {text!r} must be INPUTSxOUTPUTS with positive integers, e.g. 4096x4096")
    return int(match[1]), int(match[2])


def _check_fraction(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DeepShrinkError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def synthetic_layer(
    outputs: int, inputs: int, density: float, bits: int = EIE_WEIGHT_BITS, seed: int = 0, block: int = 1
) -> CompressedTensor:
    """A random ``(outputs, inputs)`` weight matrix, each weight (or block) kept with probability ``density``.

    Kept positions are a Bernoulli process, drawn as geometric gaps so that memory scales
    with the kept weights, not with the matrix. Codes are uniform over a ``2**bits``
    linear codebook that has no zero.

    Args:
        outputs: matrix rows.
        inputs: matrix columns.
        density: probability that a weight is kept, in [0, 1].
        bits: code width.
        seed: random seed.
        block: keep ``block x 1`` blocks (``block`` consecutive rows of one column,
            aligned) instead of single weights: vector sparsity at the same density.

    Returns:
        A :class:`CompressedTensor` of shape ``(outputs, inputs)``.

    Raises:
        DeepShrinkError: for a non-positive size or a density outside [0, 1].

    Examples:
        >>> t = synthetic_layer(100, 200, 0.1)
        >>> t.shape, 0.08 < t.density < 0.12
        ((100, 200), True)
        >>> rows, cols = synthetic_layer(64, 50, 0.2, block=16).rows_cols()
        >>> per_block = np.bincount(rows // 16 * 50 + cols)
        >>> set(per_block[per_block > 0].tolist())  # whole 16 x 1 blocks
        {16}
    """
    if outputs <= 0 or inputs <= 0 or block <= 0:
        raise DeepShrinkError(f"layer size {outputs}x{inputs} and block {block} must be positive")
    density = _check_fraction(density, "density")
    rng = np.random.default_rng(seed)
    numel = -(-outputs // block) * inputs  # one draw per block
    positions = np.empty(0, dtype=np.int64)
    if density > 0:
        # Draw a few more gaps than the expected count, then top up in the rare short case.
        last = -1
        chunks = []
        while last < numel:
            gaps = rng.geometric(density, int(numel * density * 1.02 + 6 * math.sqrt(numel) + 16))
            chunk = last + np.cumsum(gaps)
            chunks.append(chunk)
            last = int(chunk[-1])
        positions = np.concatenate(chunks)
        positions = positions[positions < numel]
    if block > 1:  # block (b, j) is rows b * block .. b * block + block - 1 of column j
        rows = (positions // inputs * block)[:, None] + np.arange(block)
        cols = np.broadcast_to((positions % inputs)[:, None], rows.shape)
        keep = rows < outputs
        positions = np.sort(rows[keep] * inputs + cols[keep])
    levels = 1 << bits
    codebook = np.linspace(-1.0, 1.0, levels + 1, dtype=np.float32)
    codebook = codebook[codebook != 0][:levels]  # a linear codebook without zero
    codes = rng.integers(0, len(codebook), size=len(positions))
    return CompressedTensor((outputs, inputs), positions, codes, codebook, bits)


def synthetic_activations(inputs: int, density: float, seed: int = 0) -> np.ndarray:
    """An ``(inputs,)`` float32 activation vector with exactly ``round(density * inputs)`` non-zeros.

    Raises:
        DeepShrinkError: for a density outside [0, 1].

    Examples:
        >>> int((synthetic_activations(1000, 0.353) != 0).sum())
        353
    """
    density = _check_fraction(density, "act_density")
    rng = np.random.default_rng(seed)
    activations = np.zeros(inputs, dtype=np.float32)
    active = rng.choice(inputs, size=round(density * inputs), replace=False)
    activations[active] = rng.uniform(0.1, 1.0, size=len(active)).astype(np.float32)
    return activations
