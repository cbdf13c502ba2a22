"""The one family of errors deepshrink raises on bad input.

Every error subclasses ``ValueError`` so that callers who already catch
``ValueError`` for bad arguments keep working, and ``DeepShrinkError`` so that
a caller can catch everything from this library at once.
"""

from __future__ import annotations


class DeepShrinkError(ValueError):
    """Base class of every error deepshrink raises on bad input."""


class UnsupportedLayerError(DeepShrinkError):
    """A layer the user asked to compress has no handler (named in the message)."""


class FileFormatError(DeepShrinkError):
    """A compressed-model file is truncated, corrupted, or of an unknown version."""
