"""The inference engine: EIE's sparse, weight-shared kernels in software (numba).

Compute straight from :class:`~deepshrink.tensor.CompressedTensor` s: codes and
codebook, never a dense weight.
"""

from deepshrink.engine.compile import compile_model, engine_layers, from_file
from deepshrink.engine.layers import SparseConv1d, SparseConv2d, SparseEmbedding, SparseLinear
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.lazy import lazy_submodules

__all__ = [
    "SparseConv1d",
    "SparseConv2d",
    "SparseEmbedding",
    "SparseLinear",
    "SparseMatrix",
    "compile_model",
    "engine_layers",
    "from_file",
]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
