"""Energy of a simulated layer from the events the cycle model counted.

The default per-operation energies are the 45 nm figures of Horowitz, "Computing's
energy problem (and what we can do about it)", ISSCC 2014, as quoted by the EIE paper
(Han et al., ISCA 2016) and in ``docs/references.md``. Every figure is configurable: pass
your own :class:`EnergyTable` (for example with your process's numbers) to
:class:`~deepshrink.hardware.eie.EIEConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from deepshrink.errors import DeepShrinkError

WORD_BITS = 32  # the table's figures are per 32-bit access


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation, in picojoules.

    Memory figures are per 32-bit access and scale linearly with the access width (a
    64-bit sparse-matrix SRAM row costs two 32-bit reads).

    Args:
        sram_read_32bit_pj: 32-bit read from a 32 KB SRAM; Horowitz 2014, 45 nm: 5 pJ.
            Used for the sparse-matrix and pointer SRAMs.
        activation_access_32bit_pj: 32-bit read or write of the activation registers and
            queues. The table has no register-file figure, so the default costs them as the
            32 KB SRAM (5 pJ), an upper bound for EIE's 2 KB register files.
        int_mult_pj: 32-bit integer multiply; Horowitz 2014, 45 nm: 3.1 pJ.
        int_add_pj: 32-bit integer add; Horowitz 2014, 45 nm: 0.1 pJ. A MAC is a multiply
            and an add; EIE's 16-bit fixed-point MAC costs less, so the default is high.
        dram_read_32bit_pj: 32-bit DRAM read; Horowitz 2014, 45 nm: 640 pJ.

    Raises:
        DeepShrinkError: if a figure is negative or not finite.

    Examples:
        >>> EnergyTable().mac_pj
        3.2
        >>> EnergyTable(dram_read_32bit_pj=320.0).dram_read_32bit_pj
        320.0
    """

    sram_read_32bit_pj: float = 5.0
    activation_access_32bit_pj: float = 5.0
    int_mult_pj: float = 3.1
    int_add_pj: float = 0.1
    dram_read_32bit_pj: float = 640.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DeepShrinkError(f"EnergyTable.{name}={value!r} must be a finite number >= 0 (picojoules)")

    @property
    def mac_pj(self) -> float:
        """One multiply-accumulate: a multiply and an add."""
        return round(self.int_mult_pj + self.int_add_pj, 12)


@dataclass(frozen=True)
class LayerEvents:
    """Events of one simulated layer run that cost energy.

    Args:
        matrix_sram_reads: reads of the sparse-matrix SRAM rows (``width_bits`` each).
        pointer_reads: column-pointer reads (two per PE per broadcast activation).
        activation_reads: input activations scanned by leading-non-zero detection, plus
            one accumulator read per multiply-accumulate.
        activation_writes: broadcast writes into every PE's queue, one accumulator write
            per multiply-accumulate, and the output activations.
        macs: multiply-accumulates, padding zeros included (they take an ALU cycle).
        dram_bits: bits read from DRAM: what does not fit in each PE's SRAMs, every run.
    """

    matrix_sram_reads: int
    pointer_reads: int
    activation_reads: int
    activation_writes: int
    macs: int
    dram_bits: int


def layer_energy(
    events: LayerEvents, table: EnergyTable, *, sram_width_bits: int, pointer_bits: int, activation_bits: int
) -> dict[str, float]:
    """Energy breakdown of one layer run, in picojoules.

    Args:
        events: what the cycle model counted.
        table: per-operation energies.
        sram_width_bits: width of one sparse-matrix SRAM read.
        pointer_bits: width of one column pointer.
        activation_bits: width of one activation.

    Returns:
        ``{"matrix_sram", "pointer_sram", "activations", "mac", "dram"}`` in pJ.

    Examples:
        >>> e = LayerEvents(matrix_sram_reads=1, pointer_reads=2, activation_reads=0,
        ...                 activation_writes=0, macs=10, dram_bits=32)
        >>> layer_energy(e, EnergyTable(), sram_width_bits=64, pointer_bits=16, activation_bits=16)
        {'matrix_sram': 10.0, 'pointer_sram': 5.0, 'activations': 0.0, 'mac': 32.0, 'dram': 640.0}
    """
    activation_accesses = events.activation_reads + events.activation_writes
    return {
        "matrix_sram": events.matrix_sram_reads * sram_width_bits / WORD_BITS * table.sram_read_32bit_pj,
        "pointer_sram": events.pointer_reads * pointer_bits / WORD_BITS * table.sram_read_32bit_pj,
        "activations": activation_accesses * activation_bits / WORD_BITS * table.activation_access_32bit_pj,
        "mac": events.macs * table.mac_pj,
        "dram": events.dram_bits / WORD_BITS * table.dram_read_32bit_pj,
    }
