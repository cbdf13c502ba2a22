"""Trained quantization by weight sharing (Deep Compression, section 3).

Each layer's surviving weights are clustered by 1-D k-means into ``2**bits``
shared values. The layer is then re-parametrised as
``weight = where(mask, codebook[codes], 0)`` with ``codebook`` a trainable
``nn.Parameter`` and ``codes`` a buffer: autograd of the gather gives each
centroid the *sum* of its members' gradients (the paper's rule), members stay
tied to their centroid, and pruned weights stay exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus
from torch import nn

from deepshrink.compress.int8 import computes_in_int8, install_int8_
from deepshrink.compress.parametrization import (
    Compression,
    compression_of,
    current_mask,
    register_compression,
    reparametrize_,
)
from deepshrink.compress.targets import FilterFn, Target, find_targets, resolve_per_layer
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import track
from deepshrink.tensor import MAX_CODE_BITS, CompressedTensor

INITS = ("linear", "density", "random", "kmeans++")
DEFAULT_BITS = {"conv": 8, "fc": 5}  # AlexNet's setting in Deep Compression


@register_compression
class SharedWeight(Compression):
    """Parametrization ``w -> where(mask, codebook[codes], 0)``; ignores ``w``."""

    state_keys = ("codebook", "codes", "mask", "_extra_state")
    ignores_input = True

    def __init__(self, codebook: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.codebook = nn.Parameter(codebook.to(torch.float32))
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shared = self.codebook[self.codes]
        return torch.where(self.mask, shared, torch.zeros((), dtype=shared.dtype, device=shared.device))

    def get_extra_state(self) -> dict:
        return {"bits": self.bits}  # not derivable: empty clusters are dropped

    def set_extra_state(self, state: dict) -> None:
        self.bits = int(state["bits"])

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> SharedWeight:
        return cls(state["codebook"], state["codes"], state["mask"], int(state["_extra_state"]["bits"]))

    def to_compressed(self, weight: torch.Tensor) -> CompressedTensor:
        flat_mask = self.mask.reshape(-1).cpu().numpy()
        return CompressedTensor(
            tuple(self.mask.shape),
            np.flatnonzero(flat_mask),
            self.codes.reshape(-1).cpu().numpy()[flat_mask],
            self.codebook.detach().cpu().numpy(),
            self.bits,
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, codebook={self.codebook.numel()}"


def nearest_code(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook entry nearest to each value (any order of entries; ties to the lower one).

    One ``bucketize`` against the midpoints of the sorted entries: half the time of
    comparing distances to both neighbours, and no value-sized temporaries (quantization-
    aware training calls this on every weight at every step).

    Examples:
        >>> nearest_code(torch.tensor([0.1, 0.9, -2.0, 0.5]), torch.tensor([1.0, 0.0])).tolist()
        [1, 0, 1, 1]
    """
    entries, order = torch.sort(codebook.detach())
    midpoints = (entries[1:] + entries[:-1]) / 2  # a value on a midpoint goes below it: the lower entry
    return order[torch.bucketize(values.detach().contiguous(), midpoints)]


@register_compression
class LatentSharedWeight(Compression):
    """Parametrization ``w -> where(mask, codebook[nearest(w)], 0)``: weight sharing that can re-assign codes.

    Quantization-aware training (the straight-through estimator): the model computes
    with shared values, the full-precision latent weight ``w`` receives the gradient as
    if it had been used directly, and each centroid the sum of its members' gradients.
    Training moves weights between clusters, which :class:`SharedWeight` (codes fixed)
    cannot. :func:`latent_sharing_` and :func:`fix_sharing_` convert between the two.
    """

    state_keys = ("codebook", "mask", "_extra_state")

    def __init__(self, codebook: torch.Tensor, mask: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.codebook = nn.Parameter(codebook.to(torch.float32))
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shared = self.codebook[nearest_code(weight, self.codebook)]
        straight = shared + (weight - weight.detach())  # the value of `shared`, the gradient of `weight`
        return torch.where(self.mask, straight, torch.zeros((), dtype=shared.dtype, device=shared.device))

    def get_extra_state(self) -> dict:
        return {"bits": self.bits}

    def set_extra_state(self, state: dict) -> None:
        self.bits = int(state["bits"])

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> LatentSharedWeight:
        return cls(state["codebook"], state["mask"], int(state["_extra_state"]["bits"]))

    def to_compressed(self, weight: torch.Tensor) -> CompressedTensor:
        return self.fixed(weight).to_compressed(weight)

    def fixed(self, weight: torch.Tensor) -> SharedWeight:
        """The :class:`SharedWeight` computing what this computes now (``weight``: its output)."""
        codes = nearest_code(weight.detach(), self.codebook).to(torch.int32)
        return SharedWeight(self.codebook.detach().clone(), codes, self.mask, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, codebook={self.codebook.numel()}, latent"


def latent_sharing_(model: nn.Module, skip: Collection[str] = ()) -> int:
    """Turn every :class:`SharedWeight` into a :class:`LatentSharedWeight` computing the same weight.

    The latent weight starts at the decoded weight, so each weight's nearest
    centroid is its own code (when two centroids are equal, the lower index: the
    value is the same). Build the optimizer after this call.

    Args:
        skip: names of modules whose weights keep their fixed codes.

    Returns:
        How many weights were converted.
    """
    return _convert_(
        model, SharedWeight, lambda c, w: LatentSharedWeight(c.codebook.detach().clone(), c.mask, c.bits), skip
    )


def fix_sharing_(model: nn.Module) -> int:
    """Turn every :class:`LatentSharedWeight` back into a :class:`SharedWeight` with the codes it computes with.

    Returns:
        How many weights were converted.
    """
    return _convert_(model, LatentSharedWeight, lambda c, w: c.fixed(w))


def _convert_(model: nn.Module, kind: type[Compression], convert: Callable, skip: Collection[str] = ()) -> int:
    """Replace each ``kind`` parametrization ``c`` by ``convert(c, weight it computes)``; how many were.

    Modules named in ``skip`` are left as they are.
    """
    done = 0
    for t in find_targets(model, warn_unsupported=False):
        comp = compression_of(t.module, t.param)
        if isinstance(comp, kind) and t.module_name not in skip:
            reparametrize_(t.module, t.param, convert(comp, t.weight.detach()).to(comp.mask.device))
            done += 1
    return done


@dataclass(frozen=True)
class LayerCodebook:
    """One row of the weight-sharing report."""

    name: str
    bits: int
    clusters: int
    kept: int
    mse: float  # mean squared error of the survivors against their centroids


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate a bit width in 1..16.

    Raises:
        DeepShrinkError: naming the value otherwise.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_CODE_BITS:
        raise DeepShrinkError(f"{name}={bits!r} must be an integer in 1..{MAX_CODE_BITS}")
    return int(bits)


def kmeans_1d(
    values: np.ndarray,
    k: int,
    init: str = "linear",
    seed: int = 0,
    max_iter: int = 2000,
    tol: float = 1e-7,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, optionally weighted.

    Written here rather than taken from scikit-learn because in one dimension
    the sorted values make each iteration O(k log n) (cluster borders by binary
    search, sums by a prefix sum) instead of O(n k): a 1.6 M-weight layer at
    k=256 clusters in well under a second, and exactly.

    Args:
        values: the weights to cluster, any order.
        k: number of clusters, >= 1.
        init: ``"linear"`` (evenly over [min, max], the paper's choice),
            ``"density"`` (evenly over the CDF), ``"random"`` (Forgy: k random
            weights) or ``"kmeans++"``.
        seed: for the random initialisations.
        max_iter: Lloyd iterations at most; each costs O(k log n), and 256
            clusters over a pruned layer need many to settle.
        weights: one non-negative weight per value: each centroid becomes the
            weighted mean of its members and ``"density"`` spaces the initial
            centroids over the weighted CDF. Calibrated weight sharing passes the
            sensitivity of each weight here (SqueezeLLM's Fisher-weighted k-means).

    Returns:
        ``(centroids, codes)``: sorted float32 centroids (fewer than ``k`` when
        there are fewer distinct values) and each value's centroid index.

    Raises:
        DeepShrinkError: unknown ``init`` or ``k < 1``.

    Examples:
        >>> c, codes = kmeans_1d(np.array([0.0, 0.1, 1.0, 1.1]), 2)
        >>> [round(float(v), 2) for v in c], codes.tolist()
        ([0.05, 1.05], [0, 0, 1, 1])
    """
    if init not in INITS:
        raise DeepShrinkError(f"init={init!r} must be one of {', '.join(INITS)}")
    if k < 1:
        raise DeepShrinkError(f"k={k} must be >= 1")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    if weights is None:
        weights = np.ones_like(values)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != values.shape or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise DeepShrinkError(f"weights must be {values.size} finite values >= 0 with a positive sum")
    order = np.argsort(values)  # equal values share a cluster whatever their order
    xs, ws = values[order], weights[order]
    mass = np.concatenate([[0.0], np.cumsum(ws)])
    moment = np.concatenate([[0.0], np.cumsum(ws * xs)])
    centroids = np.unique(_init_centroids(xs, mass, k, init, seed))
    for _ in range(max_iter):
        starts, ends = _cluster_bounds(xs, centroids)
        counts = mass[ends] - mass[starts]
        if not (counts > 0).all():
            centroids = _relocate_empty(xs, centroids, starts, ends, counts)
            continue
        new = (moment[ends] - moment[starts]) / counts
        shift = np.abs(new - centroids).max()
        centroids = new
        if shift <= tol * (xs[-1] - xs[0] + 1e-30):
            break
    starts, ends = _cluster_bounds(xs, centroids)
    live = ends > starts
    centroids, starts, ends = centroids[live], starts[live], ends[live]
    sorted_codes = np.repeat(np.arange(centroids.size), ends - starts)
    codes = np.empty_like(sorted_codes)
    codes[order] = sorted_codes
    return centroids.astype(np.float32), codes


def _cluster_bounds(xs: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) in sorted ``xs`` of each sorted centroid's cluster."""
    borders = np.searchsorted(xs, (centroids[1:] + centroids[:-1]) / 2)
    return np.concatenate([[0], borders]), np.concatenate([borders, [xs.size]])


def _relocate_empty(
    xs: np.ndarray, centroids: np.ndarray, starts: np.ndarray, ends: np.ndarray, mass: np.ndarray
) -> np.ndarray:
    """Move empty (or weightless) clusters onto the worst-fitted values, as scikit-learn does.

    Linear initialisation of a pruned layer puts centroids in the empty middle
    of its bimodal distribution; dropping them would waste codes.
    """
    empty = np.flatnonzero(mass <= 0)
    assigned = np.repeat(centroids, ends - starts)
    error = np.abs(xs - assigned)
    worst = np.unique(xs[np.argsort(error)[::-1][: 4 * empty.size]])[::-1]
    fresh = np.setdiff1d(worst, centroids)[: empty.size]
    return np.unique(np.concatenate([np.delete(centroids, empty), fresh]))


def _init_centroids(xs: np.ndarray, mass: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """Initial centroids for sorted ``xs`` whose weights have the running sum ``mass``."""
    rng = np.random.default_rng(seed)
    if init == "linear":
        return np.linspace(xs[0], xs[-1], k)
    if init == "density":
        # quantiles of the weighted CDF (plain quantiles when all weights are equal)
        return np.interp(np.linspace(0, 1, k) * mass[-1], mass[1:], xs)
    if init == "random":
        return rng.choice(xs, size=min(k, xs.size), replace=False)
    # k-means++ costs O(n k): run it on a sample, which changes the seeds, not the result's quality.
    sample = xs if xs.size <= 50_000 else rng.choice(xs, 50_000, replace=False)
    k = min(k, np.unique(sample).size)
    centers, _ = kmeans_plusplus(sample.reshape(-1, 1), k, random_state=seed)
    return centers.reshape(-1)


def share_weights_(
    model: nn.Module,
    bits: int | dict[str, int] | None = None,
    *,
    init: str = "linear",
    seed: int = 0,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> list[LayerCodebook]:
    """Replace each selected layer's surviving weights by ``2**bits`` shared values.

    Pruned layers keep their zero pattern; unpruned layers are shared whole.
    Build the optimizer *after* this call: the codebooks are new parameters.

    Args:
        model: any ``nn.Module`` (pruned or not).
        bits: bits per code (1..16), or ``{pattern: bits}``; by default 8 for
            conv and 5 for fully connected and recurrent layers.
        init: centroid initialisation, see :func:`kmeans_1d`.
        seed: makes ``"random"`` and ``"kmeans++"`` deterministic.
        layers, filter_fn: which weights; see ``find_targets``.
        progress: show a progress bar over the layers (see :mod:`deepshrink.progress`).

    Returns:
        One :class:`LayerCodebook` per layer.

    Raises:
        DeepShrinkError: bits out of range, unknown init or layer pattern.

    Examples:
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> [r.clusters for r in share_weights_(net, bits=2)]
        [4]
    """
    if init not in INITS:
        raise DeepShrinkError(f"init={init!r} must be one of {', '.join(INITS)}")
    report = []
    for t, b in track(bits_per_target(model, bits, layers, filter_fn), "sharing weights (k-means per layer)",
                      show=progress):  # fmt: skip
        mask = current_mask(t) & (t.weight.detach() != 0)
        weight = t.weight.detach()
        centroids, codes = kmeans_1d(weight[mask].cpu().numpy(), 1 << b, init, seed)
        full_codes = torch.zeros(weight.shape, dtype=torch.int32)
        full_codes[mask.cpu()] = torch.from_numpy(codes.astype(np.int32))
        codebook = torch.from_numpy(centroids)
        if codebook.numel() == 0:
            codebook = torch.zeros(1)  # an all-zero layer still needs a (unused) codebook entry
        shared = SharedWeight(codebook, full_codes, mask, b).to(weight.device)
        mse = float(((weight[mask] - shared(weight).detach()[mask]) ** 2).mean()) if mask.any() else 0.0
        reparametrize_(t.module, t.param, shared)
        report.append(LayerCodebook(t.name, b, codebook.numel(), int(mask.sum()), mse))
    return report


def bits_per_target(
    model: nn.Module,
    bits: int | dict[str, int] | None,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[tuple[Target, int]]:
    """The weights a sharing call touches, each with its checked bit width (default by kind: :data:`DEFAULT_BITS`).

    Raises:
        DeepShrinkError: no compressible weight, an unknown pattern, bits out of range (named with the layer).
    """
    targets = find_targets(model, layers, filter_fn)
    if not targets:
        raise DeepShrinkError(f"{type(model).__name__} has no compressible weight")
    per_layer = resolve_per_layer(bits, targets, "bits") if bits is not None else {}
    out = []
    for t in targets:
        b = per_layer.get(t.name)
        name = "bits" if not isinstance(bits, dict) else f"bits[{t.name}]"
        out.append((t, check_bits(DEFAULT_BITS[t.kind] if b is None else b, name)))
    return out


def compressed_tensors(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, CompressedTensor]:
    """Every compressed weight of ``model`` as a :class:`CompressedTensor`, by name.

    Weights without a deepshrink parametrization are left out (they are plain
    state). A pruned but unshared weight is stored losslessly. A layer declared int8
    (:func:`~deepshrink.compress.int8.compute_in_int8_`) gives a tensor declared so.
    """
    out = {}
    for t in track(find_targets(model, layers, warn_unsupported=False), "collecting compressed weights"):
        comp = compression_of(t.module, t.param)
        if isinstance(comp, Compression):
            out[t.name] = comp.to_compressed(t.weight.detach())
            if t.param == "weight" and computes_in_int8(t.module):
                out[t.name] = out[t.name].with_arithmetic("int8")
    return out


def load_compressed_(model: nn.Module, tensors: dict[str, CompressedTensor]) -> None:
    """Install weight sharing so ``model`` computes with exactly ``tensors``, in their arithmetic.

    Tensors declared int8 make their layers compute in int8 (:func:`~deepshrink.compress.int8.compute_in_int8_`).

    Raises:
        DeepShrinkError: a name is not a compressible weight of ``model``, a
            shape differs, or a tensor declared int8 is not an ``nn.Linear``'s.
    """
    targets = {t.name: t for t in find_targets(model, warn_unsupported=False)}
    for name, ct in track(tensors.items(), "installing weights"):
        if name not in targets:
            raise DeepShrinkError(
                f"{name!r} is not a compressible weight of {type(model).__name__}; it has: {', '.join(targets)}"
            )
        t = targets[name]
        if tuple(t.weight.shape) != ct.shape:
            raise DeepShrinkError(f"{name}: file holds shape {ct.shape}, model has {tuple(t.weight.shape)}")
        mask = torch.zeros(ct.numel, dtype=torch.bool)
        mask[torch.from_numpy(ct.positions)] = True
        codes = torch.zeros(ct.numel, dtype=torch.int32)
        codes[torch.from_numpy(ct.positions)] = torch.from_numpy(ct.codes.astype(np.int32))
        shared = SharedWeight(
            torch.from_numpy(ct.codebook.copy()), codes.reshape(ct.shape), mask.reshape(ct.shape), ct.bits
        )
        reparametrize_(t.module, t.param, shared.to(t.weight.device))
    install_int8_(model, tensors)


def distinct_nonzero(weight: torch.Tensor) -> int:
    """Number of distinct non-zero values in ``weight`` (an invariant tests check)."""
    w = weight.detach().reshape(-1)
    return int(torch.unique(w[w != 0]).numel())
