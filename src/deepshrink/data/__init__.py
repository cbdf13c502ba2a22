"""Data sets, each read from a directory the caller names (never downloaded)."""

from deepshrink.data.common import data_dir

__all__ = ["data_dir"]
