"""Where data sets live: an explicit directory, else ``$DEEPSHRINK_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

from deepshrink.errors import DeepShrinkError

ENV_VAR = "DEEPSHRINK_DATA"


def data_dir(path: str | os.PathLike | None = None, subdir: str = "") -> Path:
    """Resolve the data root (``path``, else ``$DEEPSHRINK_DATA``) joined with ``subdir``.

    Raises:
        DeepShrinkError: neither is set, or the directory does not exist.
    """
    root = path if path is not None else os.environ.get(ENV_VAR)
    if root is None:
        raise DeepShrinkError(
            f"no data directory: pass one (--data-dir / data_dir=) or set ${ENV_VAR} "
            f"to the folder holding {subdir or 'the data sets'}/"
        )
    full = Path(root).expanduser() / subdir  # "~/data" in Python as on the command line
    if not full.is_dir():
        raise DeepShrinkError(f"data directory {full} does not exist")
    return full
