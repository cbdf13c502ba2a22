"""Data sets, each read from a directory the caller names; :mod:`.download` fetches MNIST and FSDD into one."""

from deepshrink.data.common import data_dir
from deepshrink.lazy import lazy_submodules

__all__ = ["data_dir"]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
