"""Small file utilities: atomic writes, and reads that fail with a DeepShrinkError."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from deepshrink.errors import DeepShrinkError


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk, then rename.

    An interrupted write leaves any old file at ``path`` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file, with a DeepShrinkError (not an OSError) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DeepShrinkError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
