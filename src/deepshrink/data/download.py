"""Fetching MNIST and FSDD from their canonical sources, verified by SHA-256 (``deepshrink data``).

Nothing is kept unless it verifies, and nothing half-written is left behind.

- **MNIST**: the four gzipped IDX files of LeCun, Cortes and Burges, from their
  site or the two mirrors PyTorch and TensorFlow use. Mirrors have been seen to
  serve the same data gzipped anew (other ``.gz`` bytes), so the check is on what
  matters: the SHA-256 of each *decompressed* file, whose well-known MD5s
  (``6bbc9ace...`` for the training images) the pinned data also has. The
  decompressed size is checked first, so a bad archive cannot inflate without bound.
- **FSDD**: the ``recordings/`` folder of Jakobovski et al.'s GitHub repository
  at the commit of release v1.0.10 (3,000 WAV files), taken from GitHub's archive
  of that commit. Archives are generated on demand and their compressed bytes
  are not promised to stay the same, so the check is on the recordings: one
  SHA-256 over the sorted lines ``"<file name> <SHA-256 of the file>\\n"``
  (:func:`recordings_digest`), which changes if any byte of any file, a name, or
  the set of files does.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from deepshrink.atomic import write_atomic
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import progress_bar

T = TypeVar("T")
DATASETS = ("mnist", "fsdd")
TIMEOUT_S = 60


@dataclass(frozen=True)
class MnistFile:
    """One of MNIST's four files: its name and what it holds once decompressed."""

    name: str
    raw_bytes: int
    raw_sha256: str


MNIST_MIRRORS = (
    "http://yann.lecun.com/exdb/mnist/",  # the original site
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
)
MNIST_FILES = (
    MnistFile(
        "train-images-idx3-ubyte.gz", 47_040_016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    MnistFile("train-labels-idx1-ubyte.gz", 60_008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    MnistFile(
        "t10k-images-idx3-ubyte.gz", 7_840_016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    MnistFile("t10k-labels-idx1-ubyte.gz", 10_008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
)
MNIST_MAX_GZ_BYTES = 20_000_000  # the largest archive is 9.9 MB; anything far bigger is not MNIST

FSDD_COMMIT = "d6938f9bf1545aa66d8489fc9f1385a7abd64282"  # tag v1.0.10
FSDD_ARCHIVES = (f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.tar.gz",)
FSDD_RECORDINGS = 3000
FSDD_DIGEST = "dbd573d7cafe79c4b49f65718115e1304e24e067fa39eff18a660dc6cb9c360f"
FSDD_MAX_ARCHIVE_BYTES = 200_000_000
FSDD_MAX_WAV_BYTES = 1_000_000  # the largest recording is 37 KB
_WAV_NAME = re.compile(r"\d_[A-Za-z]+_\d+\.wav")


def _as_url(location: str) -> str:
    """A mirror as a URL ending in ``/``: an ``http(s)``/``file`` URL, or a local folder."""
    url = location if "://" in location else Path(location).resolve().as_uri()
    return url if url.endswith("/") else url + "/"


def _fetch(url: str, max_bytes: int, label: str, progress: bool) -> bytes:
    """The body at ``url``, read in blocks under a progress bar; at most ``max_bytes``.

    Raises:
        OSError: the network or the file is unreachable (``urllib.error.URLError`` included).
        DeepShrinkError: the body is larger than ``max_bytes``.
    """
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        buffer = io.BytesIO()
        with progress_bar(show=progress) as bar:
            task = bar.add_task(label, total=int(length) if length else None)
            while block := response.read(1 << 20):
                buffer.write(block)
                if buffer.tell() > max_bytes:
                    raise DeepShrinkError(f"larger than {max_bytes:,} bytes, so not the expected file")
                bar.advance(task, len(block))
    return buffer.getvalue()


def _first_verified(urls: list[str], label: str, max_bytes: int, check: Callable[[bytes], T], progress: bool) -> T:
    """``check(body)`` of the first of ``urls`` whose body passes it (``check`` raises DeepShrinkError otherwise).

    Raises:
        DeepShrinkError: one line naming the sources and what went wrong with each.
    """
    unreachable: dict[str, list[str]] = {}  # reason -> sources, so that "offline" reads as one reason
    rejected = []
    for url in urls:
        try:
            return check(_fetch(url, max_bytes, label, progress))
        except OSError as err:  # urllib.error.URLError, timeouts, a missing local file
            reason = getattr(err, "reason", None) or err
            reason = getattr(reason, "strerror", None) or str(reason)
            unreachable.setdefault(reason, []).append(urllib.parse.urlsplit(url).netloc or url)
        except DeepShrinkError as err:
            rejected.append(f"{url}: {err}")
    failures = "; ".join(rejected + [f"{', '.join(where)}: {why}" for why, where in unreachable.items()])
    if rejected:
        raise DeepShrinkError(f"no source gave a verified {label} ({failures})")
    raise DeepShrinkError(f"cannot download {label}, no source reachable ({failures}); check the network "
                          "connection, or pass --mirror with a folder or URL that holds the files")  # fmt: skip


def _gunzip_checked(data: bytes, file: MnistFile) -> bytes:
    """``data`` if it is ``file`` gzipped (size and SHA-256 after decompression).

    Raises:
        DeepShrinkError: naming what differs.
    """
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            raw = stream.read(file.raw_bytes + 1)
    except (OSError, EOFError) as err:
        raise DeepShrinkError(f"not a gzip file ({err})") from err
    if len(raw) != file.raw_bytes:
        more = "+" if len(raw) > file.raw_bytes else ""
        raise DeepShrinkError(f"decompresses to {len(raw):,}{more} bytes, expected {file.raw_bytes:,}")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != file.raw_sha256:
        raise DeepShrinkError(f"SHA-256 after decompression is {digest}, expected {file.raw_sha256}")
    return data


def _verifies(check: Callable[[T], object], data: T) -> bool:
    """Whether ``check`` accepts ``data`` (a file already in place)."""
    try:
        check(data)
    except DeepShrinkError:
        return False
    return True


def fetch_mnist(to: str | os.PathLike, mirrors: tuple[str, ...] = MNIST_MIRRORS, progress: bool = True) -> Path:
    """Put the four verified MNIST files in ``<to>/mnist`` (the layout :func:`~deepshrink.data.mnist.load_mnist` reads).

    A file already there that verifies is kept; any other is fetched, from each
    mirror in turn until one serves a file that verifies.

    Args:
        to: the data root.
        mirrors: base URLs (``http(s)://``, ``file://``) or local folders holding the files.
        progress: show a progress bar while downloading.

    Returns:
        The ``mnist`` folder.

    Raises:
        DeepShrinkError: no mirror could be reached (one line, naming each source
            and why), or none served a file that verifies.
    """
    folder = Path(to) / "mnist"
    for file in MNIST_FILES:
        path = folder / file.name
        check = functools.partial(_gunzip_checked, file=file)
        if path.is_file() and _verifies(check, path.read_bytes()):
            continue
        urls = [_as_url(base) + file.name for base in mirrors]
        data = _first_verified(urls, file.name, MNIST_MAX_GZ_BYTES, check, progress)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    return folder


def recordings_digest(files: dict[str, bytes]) -> str:
    """One SHA-256 over a set of files: of the sorted lines ``"<name> <SHA-256 of its bytes>\\n"``.

    Examples:
        >>> recordings_digest({"b.wav": b"", "a.wav": b"x"}) == recordings_digest({"a.wav": b"x", "b.wav": b""})
        True
    """
    lines = "".join(f"{name} {hashlib.sha256(files[name]).hexdigest()}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _folder_recordings(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.wav") if _WAV_NAME.fullmatch(p.name)}


def _archive_recordings(data: bytes) -> dict[str, bytes]:
    """The ``*/recordings/<digit>_<speaker>_<take>.wav`` regular files of a gzipped tar archive, by name.

    Raises:
        DeepShrinkError: the archive cannot be read, or a recording is implausibly large.
    """
    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive:
                parts = member.name.split("/")
                if not (member.isfile() and len(parts) >= 2 and parts[-2] == "recordings"):
                    continue
                if not _WAV_NAME.fullmatch(parts[-1]):
                    continue
                if member.size > FSDD_MAX_WAV_BYTES:
                    raise DeepShrinkError(f"{member.name} holds {member.size:,} bytes: not an FSDD recording")
                found[parts[-1]] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DeepShrinkError(f"not a readable .tar.gz archive ({err})") from err
    return found


def _check_recordings(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` if they are FSDD v1.0.10's recordings.

    Raises:
        DeepShrinkError: naming what differs (the count or the digest).
    """
    if len(files) != FSDD_RECORDINGS:
        raise DeepShrinkError(f"{len(files)} recordings, expected {FSDD_RECORDINGS}")
    digest = recordings_digest(files)
    if digest != FSDD_DIGEST:
        raise DeepShrinkError(f"recordings digest {digest}, expected {FSDD_DIGEST}")
    return files


def _install_folder(files: dict[str, bytes], folder: Path) -> None:
    """Write ``files`` into ``folder``, replacing it whole: filled beside it first, then renamed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fetch_fsdd(to: str | os.PathLike, archives: tuple[str, ...] = FSDD_ARCHIVES, progress: bool = True) -> Path:
    """Put FSDD v1.0.10's 3,000 verified recordings in ``<to>/fsdd/recordings`` (where :mod:`~deepshrink.data.fsdd` reads).

    A folder already there that verifies is kept; otherwise the archive is
    fetched (each URL in turn), its recordings checked, and only then written.

    Args:
        to: the data root.
        archives: URLs (``http(s)://``, ``file://``) or paths of ``.tar.gz`` archives of the repository.
        progress: show a progress bar while downloading.

    Returns:
        The ``recordings`` folder.

    Raises:
        DeepShrinkError: no archive could be reached (one line, naming each source
            and why), or none held the recordings that verify.
    """
    folder = Path(to) / "fsdd" / "recordings"
    if folder.is_dir() and _verifies(_check_recordings, _folder_recordings(folder)):
        return folder
    urls = [location if "://" in location else Path(location).resolve().as_uri() for location in archives]
    files = _first_verified(
        urls,
        "the FSDD archive",
        FSDD_MAX_ARCHIVE_BYTES,
        lambda data: _check_recordings(_archive_recordings(data)),
        progress,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    _install_folder(files, folder)
    return folder


def fetch(name: str, to: str | os.PathLike, sources: tuple[str, ...] | None = None, progress: bool = True) -> Path:
    """Fetch one of :data:`DATASETS` into the data root ``to``; ``sources`` replaces its default mirrors or archives.

    Raises:
        DeepShrinkError: an unknown name, or see :func:`fetch_mnist` / :func:`fetch_fsdd`.
    """
    if name == "mnist":
        return fetch_mnist(to, sources or MNIST_MIRRORS, progress)
    if name == "fsdd":
        return fetch_fsdd(to, sources or FSDD_ARCHIVES, progress)
    raise DeepShrinkError(f"data set {name!r} must be one of {', '.join(DATASETS)}")
