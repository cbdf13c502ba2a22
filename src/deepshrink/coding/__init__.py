"""Entropy coding of the index and code streams: relative indices, canonical Huffman, ANS."""

from deepshrink.lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
