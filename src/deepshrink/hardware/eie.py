"""Cycle and energy model of EIE (Han et al., "EIE: Efficient Inference Engine on Compressed
Deep Neural Network", ISCA 2016), fed by :class:`~deepshrink.tensor.CompressedTensor`.

The rules (justified in ``docs/hardware.md``):

- Row ``i`` of the weight matrix belongs to PE ``i % n_pe``; each PE stores its slice of
  every column as (code, relative row index) entries; a zero run longer than
  ``2**index_bits - 1`` rows inside a slice costs a padding zero entry.
- Leading-non-zero detection broadcasts the non-zero input activations, one per cycle, in
  column order, into every PE's activation queue; the broadcast stalls while any queue is
  full. A queue entry is released when its PE has finished that column.
- A PE spends ``max(1, entries)`` cycles on a column: one multiply-accumulate per stored
  entry (padding included), and at least the one cycle in which it reads the column's two
  pointers (the pointer stage handles one column per cycle, overlapped with the ALU).

Example:
    >>> from deepshrink.hardware import EIEConfig, simulate_layer, synthetic_layer
    >>> r = simulate_layer(synthetic_layer(256, 256, 0.1), act_density=0.5, config=EIEConfig(n_pe=8))
    >>> r.active_columns, r.cycles > r.ideal_cycles > 0
    (128, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from deepshrink.errors import DeepShrinkError
from deepshrink.hardware.energy import EnergyTable, LayerEvents, layer_energy
from deepshrink.hardware.kernels import pe_column_entries, queue_schedule
from deepshrink.hardware.layers import synthetic_activations
from deepshrink.tensor import CompressedTensor

ActivationInput = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class EIEConfig:
    """Parameters of the simulated EIE; the defaults are the published design.

    Args:
        n_pe: processing elements. EIE: 64.
        clock_hz: clock. EIE: 800 MHz.
        fifo_depth: activation-queue entries per PE. EIE: 8 (deeper gave little; depth 1
            left about half the cycles idle).
        index_bits: relative row index width; longer zero runs need padding. EIE: 4.
        pointer_bits: column pointer width. EIE: 16.
        activation_bits: activation / accumulator width. EIE: 16-bit fixed point.
        sram_width_bits: sparse-matrix SRAM row width; entries are read a row at a time.
            EIE: 64 (eight 8-bit entries).
        matrix_sram_bytes: sparse-matrix SRAM per PE. EIE: 128 KB.
        pointer_sram_bytes: pointer SRAM per PE. EIE: 32 KB.
        energy: per-operation energies; default the 45 nm table (Horowitz, ISSCC 2014).

    Raises:
        DeepShrinkError: for a value out of range (named, with the allowed range).
    """

    n_pe: int = 64
    clock_hz: float = 800e6
    fifo_depth: int = 8
    index_bits: int = 4
    pointer_bits: int = 16
    activation_bits: int = 16
    sram_width_bits: int = 64
    matrix_sram_bytes: int = 128 * 1024
    pointer_sram_bytes: int = 32 * 1024
    energy: EnergyTable = field(default_factory=EnergyTable)

    def __post_init__(self) -> None:
        limits = {
            "n_pe": (1, 1 << 16),
            "fifo_depth": (1, 1 << 20),
            "index_bits": (1, 16),
            "pointer_bits": (1, 64),
            "activation_bits": (1, 64),
            "sram_width_bits": (1, 4096),
            "matrix_sram_bytes": (0, 1 << 40),
            "pointer_sram_bytes": (0, 1 << 40),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise DeepShrinkError(f"EIEConfig.{name}={value!r} must be an integer in {low}..{high}")
        if not isinstance(self.clock_hz, (int, float)) or not 0 < self.clock_hz < math.inf:
            raise DeepShrinkError(f"EIEConfig.clock_hz={self.clock_hz!r} must be a positive number (Hz)")
        if not isinstance(self.energy, EnergyTable):
            raise DeepShrinkError(f"EIEConfig.energy must be an EnergyTable, got {type(self.energy).__name__}")


@dataclass(frozen=True)
class PELayout:
    """How one matrix lies in the PEs' SRAMs (all arrays ``(n_pe, cols)`` int64).

    Args:
        kept: surviving weights in each PE's slice of each column.
        padding: padding zeros in each slice.
        start: index of each slice's first entry in its PE's sparse-matrix SRAM.
        entry_bits: bits of one stored entry (code + relative index).
    """

    kept: np.ndarray
    padding: np.ndarray
    start: np.ndarray
    entry_bits: int

    @property
    def entries(self) -> np.ndarray:
        return self.kept + self.padding


def pe_layout(ct: CompressedTensor, n_pe: int, index_bits: int) -> PELayout:
    """Lay the matrix view of ``ct`` out over ``n_pe`` PEs as EIE's interleaved CSC.

    Args:
        ct: the compressed weights; its matrix view is ``rows x cols``.
        n_pe: processing elements.
        index_bits: relative row index width.

    Returns:
        The per-PE, per-column entry counts and SRAM offsets.

    Examples:
        >>> ct = CompressedTensor.from_dense(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 3.0]]))
        >>> layout = pe_layout(ct, n_pe=1, index_bits=1)
        >>> layout.kept.tolist(), layout.padding.tolist()
        ([[2, 1]], [[1, 1]])
    """
    n_rows, n_cols = ct.matrix_shape
    rows, cols = ct.rows_cols()
    kept, padding = pe_column_entries(rows, cols, np.int64(n_pe), np.int64(n_cols), np.int64(index_bits))
    entries = kept + padding
    start = np.cumsum(entries, axis=1) - entries  # entries are stored column after column
    return PELayout(kept, padding, start, ct.bits + index_bits)


@dataclass
class LayerResult:
    """What one layer costs on the simulated EIE, summed over the simulated input vectors.

    Args:
        name: layer name.
        matrix_shape: ``(rows, cols)`` of the weight matrix (outputs x inputs).
        config: the simulated hardware.
        vectors: input vectors simulated (EIE runs batch 1: one after another).
        active_columns: non-zero input activations broadcast.
        cycles: cycles until the last PE finished.
        ideal_cycles: cycles with perfect load balance (busy cycles / PEs, per vector).
        broadcast_stalls: cycles the broadcast waited on a full queue.
        pe_busy_cycles: ``(n_pe,)`` cycles each PE spent working.
        macs: multiply-accumulates on surviving weights.
        padding_macs: multiply-accumulates on padding zeros.
        empty_slices: (PE, broadcast column) pairs with no entry (a pointer-read cycle each).
        events: energy-relevant event counts.
        energy_pj: energy breakdown in picojoules.
        matrix_bytes_per_pe: largest PE's sparse-matrix storage.
        pointer_bytes_per_pe: each PE's pointer storage.
    """

    name: str
    matrix_shape: tuple[int, int]
    config: EIEConfig
    vectors: int
    active_columns: int
    cycles: int
    ideal_cycles: int
    broadcast_stalls: int
    pe_busy_cycles: np.ndarray
    macs: int
    padding_macs: int
    empty_slices: int
    events: LayerEvents
    energy_pj: dict[str, float]
    matrix_bytes_per_pe: int
    pointer_bytes_per_pe: int

    @property
    def time_s(self) -> float:
        """Wall-clock time of all simulated vectors."""
        return self.cycles / self.config.clock_hz

    @property
    def time_per_vector_s(self) -> float:
        return self.time_s / max(self.vectors, 1)

    @property
    def load_efficiency(self) -> float:
        """Busy PE-cycles over available PE-cycles (1.0 = perfectly balanced)."""
        return float(self.pe_busy_cycles.sum()) / (self.config.n_pe * self.cycles) if self.cycles else 1.0

    @property
    def pe_utilisation(self) -> np.ndarray:
        """``(n_pe,)`` fraction of the cycles each PE was busy."""
        return self.pe_busy_cycles / self.cycles if self.cycles else np.ones(self.config.n_pe)

    @property
    def fits_on_chip(self) -> bool:
        return (
            self.matrix_bytes_per_pe <= self.config.matrix_sram_bytes
            and self.pointer_bytes_per_pe <= self.config.pointer_sram_bytes
        )

    @property
    def energy_total_pj(self) -> float:
        return float(sum(self.energy_pj.values()))

    @property
    def power_w(self) -> float:
        """Average power of the counted events over the simulated time."""
        return self.energy_total_pj * 1e-12 / self.time_s if self.cycles else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (figures per simulated vector where it matters)."""
        return {
            "name": self.name,
            "rows": self.matrix_shape[0],
            "cols": self.matrix_shape[1],
            "n_pe": self.config.n_pe,
            "fifo_depth": self.config.fifo_depth,
            "clock_hz": self.config.clock_hz,
            "vectors": self.vectors,
            "active_columns": self.active_columns,
            "cycles": self.cycles,
            "ideal_cycles": self.ideal_cycles,
            "time_per_vector_us": self.time_per_vector_s * 1e6,
            "load_efficiency": self.load_efficiency,
            "broadcast_stalls": self.broadcast_stalls,
            "macs": self.macs,
            "padding_macs": self.padding_macs,
            "empty_slices": self.empty_slices,
            "pe_utilisation_min": float(self.pe_utilisation.min()),
            "events": asdict(self.events),
            "energy_pj": self.energy_pj,
            "energy_per_vector_uj": self.energy_total_pj * 1e-6 / max(self.vectors, 1),
            "power_w": self.power_w,
            "fits_on_chip": self.fits_on_chip,
        }


def _activation_matrix(
    activations: ActivationInput | None, act_density: float | None, n_cols: int, seed: int
) -> np.ndarray:
    """Input activations as a ``(vectors, n_cols)`` array, from whichever form was given."""
    if activations is not None and act_density is not None:
        raise DeepShrinkError("give either activations or act_density, not both")
    if act_density is not None:
        return synthetic_activations(n_cols, act_density, seed)[None, :]
    if activations is None:
        return np.ones((1, n_cols), dtype=np.float32)  # no information: every input non-zero
    array = activations.detach().cpu().numpy() if isinstance(activations, torch.Tensor) else np.asarray(activations)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != n_cols:
        raise DeepShrinkError(
            f"activations of shape {tuple(np.shape(activations))} do not fit a matrix with {n_cols} columns; "
            f"give ({n_cols},) or (vectors, {n_cols})"
        )
    return array


def _sram_rows_read(entries: np.ndarray, start: np.ndarray, per_row: int) -> int:
    """SRAM rows touched reading each slice ``[start, start + entries)`` (non-empty slices only)."""
    first = start // per_row
    last = (start + entries - 1) // per_row
    return int(np.where(entries > 0, last - first + 1, 0).sum())


def _run_vector(
    layout: PELayout, active: np.ndarray, config: EIEConfig, per_row: int
) -> tuple[dict[str, int], np.ndarray]:
    """Counts of one matrix-vector product whose non-zero inputs are the columns ``active``."""
    slice_entries = layout.entries[:, active]  # (n_pe, n_active), in broadcast (column) order
    cost = np.maximum(slice_entries, 1)  # an empty slice still takes its pointer-read cycle
    finish, stalls = queue_schedule(np.ascontiguousarray(cost.T), np.int64(config.fifo_depth))
    counts = {
        "cycles": int(finish.max(initial=0)),
        "ideal": math.ceil(int(cost.sum()) / config.n_pe),
        "stalls": int(stalls),
        "active": len(active),
        "macs": int(layout.kept[:, active].sum()),
        "padding": int(layout.padding[:, active].sum()),
        "empty": int((slice_entries == 0).sum()),
        "sram_rows": _sram_rows_read(slice_entries, layout.start[:, active], per_row),
    }
    return counts, cost.sum(axis=1)


def simulate_layer(
    ct: CompressedTensor,
    activations: ActivationInput | None = None,
    *,
    act_density: float | None = None,
    config: EIEConfig | None = None,
    seed: int = 0,
    name: str = "",
) -> LayerResult:
    """Count the cycles and energy of ``y = W x`` on EIE for a compressed weight matrix.

    Args:
        ct: the compressed weights; the matrix view (``shape[0]`` rows, the rest flattened
            into columns) is multiplied. A convolution's matrix view gives the cost of one
            output position.
        activations: ``(cols,)`` or ``(vectors, cols)`` input activations; only which are
            non-zero matters. Several vectors run one after another (batch 1).
        act_density: instead of activations, the fraction of non-zero inputs; that many
            columns are drawn at random (``seed``).
        config: the hardware; default :class:`EIEConfig` (EIE as published).
        seed: random seed for ``act_density``.
        name: label for reports.

    Returns:
        A :class:`LayerResult`. With neither ``activations`` nor ``act_density``, every
        input is non-zero (dense input: the worst case).

    Raises:
        DeepShrinkError: for activations of the wrong width, both activation forms, or a
            code too wide for one SRAM row.

    Examples:
        >>> from deepshrink.hardware import synthetic_layer
        >>> ct = synthetic_layer(4096, 4096, 0.09)
        >>> r = simulate_layer(ct, act_density=0.353, name="Alex-7")
        >>> 11.0 < r.time_per_vector_s * 1e6 < 13.5
        True
    """
    config = config or EIEConfig()
    n_rows, n_cols = ct.matrix_shape
    layout = pe_layout(ct, config.n_pe, config.index_bits)
    per_row = config.sram_width_bits // layout.entry_bits
    if per_row < 1:
        raise DeepShrinkError(
            f"a {layout.entry_bits}-bit entry ({ct.bits}-bit code + {config.index_bits}-bit index) is wider "
            f"than the {config.sram_width_bits}-bit SRAM row; raise EIEConfig.sram_width_bits"
        )
    entries = layout.entries
    matrix_bits = entries.sum(axis=1) * layout.entry_bits  # (n_pe,)
    pointer_bits = (n_cols + 1) * config.pointer_bits
    # What does not fit in a PE's SRAM is streamed from DRAM on every run (spill model).
    spill_bits = int(
        np.maximum(matrix_bits - 8 * config.matrix_sram_bytes, 0).sum()
        + config.n_pe * max(pointer_bits - 8 * config.pointer_sram_bytes, 0)
    )

    totals = dict.fromkeys(("cycles", "ideal", "stalls", "active", "macs", "padding", "empty", "sram_rows"), 0)
    busy = np.zeros(config.n_pe, dtype=np.int64)
    acts = _activation_matrix(activations, act_density, n_cols, seed)
    for vector in acts:
        counts, pe_busy = _run_vector(layout, np.flatnonzero(vector), config, per_row)
        busy += pe_busy
        for key, value in counts.items():
            totals[key] += value

    n_vectors = len(acts)
    all_macs = totals["macs"] + totals["padding"]
    events = LayerEvents(
        matrix_sram_reads=totals["sram_rows"],
        pointer_reads=2 * config.n_pe * totals["active"],
        activation_reads=n_vectors * n_cols + all_macs,
        activation_writes=config.n_pe * totals["active"] + all_macs + n_vectors * n_rows,
        macs=all_macs,
        dram_bits=n_vectors * spill_bits,
    )
    energy = layer_energy(
        events,
        config.energy,
        sram_width_bits=config.sram_width_bits,
        pointer_bits=config.pointer_bits,
        activation_bits=config.activation_bits,
    )
    return LayerResult(
        name=name,
        matrix_shape=(n_rows, n_cols),
        config=config,
        vectors=n_vectors,
        active_columns=totals["active"],
        cycles=totals["cycles"],
        ideal_cycles=totals["ideal"],
        broadcast_stalls=totals["stalls"],
        pe_busy_cycles=busy,
        macs=totals["macs"],
        padding_macs=totals["padding"],
        empty_slices=totals["empty"],
        events=events,
        energy_pj=energy,
        matrix_bytes_per_pe=math.ceil(int(matrix_bits.max(initial=0)) / 8),
        pointer_bytes_per_pe=math.ceil(pointer_bits / 8),
    )


@dataclass
class NetworkResult:
    """Per-layer results of a whole network, with totals.

    Args:
        layers: one result per compressed matrix.
        samples: model inputs (e.g. images) the layers' vectors came from; a convolution
            contributes one vector per output position of each sample.
    """

    layers: list[LayerResult]
    samples: int = 1

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def time_s(self) -> float:
        return sum(layer.time_s for layer in self.layers)

    @property
    def energy_total_pj(self) -> float:
        return sum(layer.energy_total_pj for layer in self.layers)


def simulate_network(
    tensors: Mapping[str, CompressedTensor],
    activations: Mapping[str, ActivationInput] | None = None,
    *,
    act_density: float | Mapping[str, float] | None = None,
    config: EIEConfig | None = None,
    seed: int = 0,
) -> NetworkResult:
    """Simulate every compressed matrix of a network, layer after layer.

    Args:
        tensors: compressed weights by parameter name (``deepshrink.compressed_tensors``).
        activations: optional input activations per parameter name (see
            :func:`simulate_layer`); a name given here takes precedence over ``act_density``.
        act_density: one density for every layer, or one per parameter name (a layer
            with neither activations nor a density gets every input non-zero).
        config: the hardware.
        seed: random seed for densities.

    Returns:
        A :class:`NetworkResult`, layers in the order of ``tensors``.

    Raises:
        DeepShrinkError: if ``activations`` or ``act_density`` name a parameter that is
            not in ``tensors`` (a typo would otherwise be silently ignored).
    """
    activations = dict(activations or {})
    densities = dict(act_density) if isinstance(act_density, Mapping) else {}
    unknown = sorted((set(activations) | set(densities)) - set(tensors))
    if unknown:
        raise DeepShrinkError(f"no compressed tensor named {unknown}; known: {sorted(tensors)}")
    results = []
    for name, ct in tensors.items():
        density = densities.get(name) if isinstance(act_density, Mapping) else act_density
        if name in activations:
            density = None
        results.append(
            simulate_layer(ct, activations.get(name), act_density=density, config=config, seed=seed, name=name)
        )
    return NetworkResult(results)
