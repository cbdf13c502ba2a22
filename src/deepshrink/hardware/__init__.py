"""EIE hardware simulator: cycles, load balance and energy of compressed layers."""

from deepshrink.hardware.eie import (
    EIEConfig,
    LayerResult,
    NetworkResult,
    PELayout,
    pe_layout,
    simulate_layer,
    simulate_network,
)
from deepshrink.hardware.energy import EnergyTable, LayerEvents, layer_energy
from deepshrink.hardware.layers import (
    EIE_BENCHMARK_LAYERS,
    BenchmarkLayer,
    benchmark_layer,
    synthetic_activations,
    synthetic_layer,
)
from deepshrink.lazy import lazy_submodules

__all__ = [
    "EIE_BENCHMARK_LAYERS",
    "BenchmarkLayer",
    "EIEConfig",
    "EnergyTable",
    "LayerEvents",
    "LayerResult",
    "NetworkResult",
    "PELayout",
    "benchmark_layer",
    "layer_energy",
    "pe_layout",
    "simulate_layer",
    "simulate_network",
    "synthetic_activations",
    "synthetic_layer",
]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
