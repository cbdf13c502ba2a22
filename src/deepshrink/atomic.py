"""Small file utilities: atomic writes, and reads that fail with a DeepShrinkError.

:func:`write_atomic` never leaves a half-written file at its destination, and
tries hard to leave nothing else either:

- On Linux the data goes to an *unnamed* file (``O_TMPFILE``) in the target's
  folder, which the kernel frees if the process dies (even ``kill -9``); it gets
  a name only once complete, for the instant before the rename. Where the
  file system has no ``O_TMPFILE`` a named ``.NAME.tmp-XXXX`` file is used.
- Every temporary file is locked (``flock``) while its writer lives, and the
  next write to the same path removes those whose lock is free: the debris of
  a writer that was killed between naming and renaming.
- A replaced file keeps its permission bits; a new one gets ``0o666`` less the
  umask, as ``open()`` would give it. After the rename the folder is fsynced,
  so the new name survives a power cut too.

:func:`atomic_folder` does the same for a whole folder (a model with its config
and tokenizer files): it is filled under a locked temporary name and renamed
into place once complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from deepshrink.errors import DeepShrinkError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no clean-up of others' debris either
    fcntl = None

_TMP_MARK = ".tmp-"  # temporary names: ".<name>.tmp-<random>"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{secrets.token_hex(6)}")


def _lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting; True if this process now holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left for ``path``.

    A live writer holds the lock of its temporary file; the kernel drops the
    lock when the writer dies, however it dies, so an unlocked one is debris.

    Returns:
        The files removed.
    """
    path = Path(path)
    removed = []
    if fcntl is None or not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{_glob_escape(path.name)}{_TMP_MARK}*"):
        try:
            fd = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            if _lock(fd) and os.fstat(fd).st_nlink:
                if candidate.is_dir():  # a folder of atomic_folder
                    shutil.rmtree(candidate, ignore_errors=True)
                else:
                    candidate.unlink(missing_ok=True)
                removed.append(candidate)
        finally:
            os.close(fd)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _open_temporary(path: Path) -> tuple[int, Path | None]:
    """A locked file for ``path``'s new contents: unnamed where the OS allows, else named.

    Returns:
        ``(fd, name)``; ``name`` is None for an unnamed file.
    """
    if hasattr(os, "O_TMPFILE") and Path("/proc/self/fd").is_dir():
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
        except OSError:
            pass  # the file system has no O_TMPFILE (NFS, some FUSE): fall back to a named file
        else:
            _lock(fd)
            return fd, None
    while True:
        name = _temp_name(path)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if _lock(fd) and os.fstat(fd).st_nlink:  # a cleaner may have taken it before our lock
            return fd, name
        os.close(fd)


def _give_name(fd: int, path: Path) -> Path:
    """Link the unnamed file ``fd`` into ``path``'s folder under a temporary name."""
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        while True:
            name = _temp_name(path)
            try:
                # dst_dir_fd makes Python call linkat(AT_SYMLINK_FOLLOW), which links the open file itself.
                os.link(f"/proc/self/fd/{fd}", name.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return name
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on some systems (Windows); nothing to sync there
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once: readers see the old file or the new one, never a mix.

    An interrupted write (an exception, Ctrl-C, ``kill -9``, a full disk) leaves
    any old file at ``path`` untouched and no temporary file behind (see the
    module notes for the one instant where a killed writer can leave one, and
    how the next write removes it).

    Raises:
        DeepShrinkError: the file cannot be written (naming the path and the
            reason, e.g. a folder that does not exist).

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> write_atomic(target, b"new"); target.read_bytes()
        b'new'
    """
    path = Path(path)
    name = None
    try:
        remove_stale_temporaries(path)
        fd, name = _open_temporary(path)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
            try:
                os.fchmod(fd, os.stat(path).st_mode & 0o7777)  # keep a replaced file's permissions
            except FileNotFoundError:
                pass  # a new file: the umask applied at creation
            os.fsync(fd)
            if name is None:
                name = _give_name(fd, path)
            os.replace(name, path)
            name = None
        finally:
            os.close(fd)  # drops the lock after the rename, so no cleaner ever sees a finished file
        _fsync_dir(path.parent)
    except OSError as err:
        raise DeepShrinkError(f"cannot write {str(path)!r}: {_reason(err, path)}") from err
    finally:
        if name is not None:
            Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder to fill in a ``with`` block, which then takes the place of ``path``.

    The folder is a locked ``.NAME.tmp-XXXX`` sibling of ``path``; when the
    block ends without an error it is fsynced and renamed to ``path`` (an old
    ``path`` is first renamed aside, then deleted), otherwise it is deleted.
    Readers see the old folder or the new one, never a mix; only in the
    instant between the two renames is there none. A writer killed mid-way
    (even by ``kill -9``) leaves its temporary folder unlocked, and the next
    write to ``path`` removes it.

    Raises:
        DeepShrinkError: the folder cannot be made or renamed (naming the path
            and the reason, e.g. a parent folder that does not exist).

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with atomic_folder(target) as folder:
        ...     _ = (folder / "a.txt").write_text("a")
        >>> sorted(p.name for p in target.iterdir())
        ['a.txt']
    """
    path = Path(path)
    try:
        remove_stale_temporaries(path)
        temporary = _temp_name(path)
        os.mkdir(temporary)
    except OSError as err:
        raise DeepShrinkError(f"cannot write folder {str(path)!r}: {_reason(err, path, folder=True)}") from err
    fd = os.open(temporary, os.O_RDONLY)
    _lock(fd)
    try:
        yield temporary
        _replace_folder(temporary, path)
    finally:
        os.close(fd)
        shutil.rmtree(temporary, ignore_errors=True)  # gone already when the rename was made


def _replace_folder(temporary: Path, path: Path) -> None:
    """fsync what ``temporary`` holds, then rename it to ``path`` (an old ``path`` renamed aside, then deleted)."""
    try:
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(temporary)
        old = None
        if path.exists():
            old = _temp_name(path)
            os.rename(path, old)  # unlocked: if the writer is killed now, the next write removes it
        os.rename(temporary, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise DeepShrinkError(f"cannot write folder {str(path)!r}: {_reason(err, path, folder=True)}") from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _reason(err: OSError, path: Path, folder: bool = False) -> str:
    reason = err.strerror or str(err)
    if isinstance(err, FileNotFoundError) and not path.parent.is_dir():
        return f"folder {str(path.parent)!r} does not exist; create it first"
    if not folder and (isinstance(err, IsADirectoryError) or path.is_dir()):
        return f"{reason}: it is a folder; give a file name"
    return reason


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file, with a DeepShrinkError (not an OSError) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DeepShrinkError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
