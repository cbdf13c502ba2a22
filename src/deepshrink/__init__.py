"""deepshrink: Deep Compression and EIE-style inference for PyTorch models."""

from deepshrink.errors import DeepShrinkError, FileFormatError, UnsupportedLayerError
from deepshrink.fileformat.model_io import load, load_into, read, save
from deepshrink.lazy import lazy_submodules
from deepshrink.tensor import CompressedTensor

__all__ = [
    "CompressedTensor",
    "DeepShrinkError",
    "FileFormatError",
    "UnsupportedLayerError",
    "load",
    "load_into",
    "read",
    "save",
]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
