"""`deepshrink data`: the SHA-256 checks on local copies of the canonical files, bad copies, the offline path."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import urllib.error
from pathlib import Path

import pytest

from deepshrink.cli import main
from deepshrink.data import download
from deepshrink.data.download import FSDD_COMMIT, MNIST_FILES, fetch_fsdd, fetch_mnist, recordings_digest
from deepshrink.data.mnist import load_mnist
from deepshrink.errors import DeepShrinkError


def _tar_gz(files: dict[str, bytes], path: Path) -> Path:
    """A .tar.gz laid out as GitHub's archive of the FSDD repository."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"free-spoken-digit-dataset-{FSDD_COMMIT}/recordings/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_mnist_from_a_local_copy_verifies_loads_and_repairs(data_root: Path, tmp_path: Path) -> None:
    copy = data_root / "mnist"
    for file in MNIST_FILES:  # the pinned sums are those of the well-known decompressed files
        with gzip.open(copy / file.name) as f:
            assert hashlib.sha256(f.read()).hexdigest() == file.raw_sha256
    junk = tmp_path / "junk"
    junk.mkdir()
    for file in MNIST_FILES:
        (junk / file.name).write_bytes(gzip.compress(b"not mnist"))
    root = tmp_path / "data"
    folder = fetch_mnist(root, (str(junk), copy.as_uri()), progress=False)  # the bad mirror first
    assert folder == root / "mnist"
    assert len(load_mnist(root, "test")[1]) == 10_000
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"damaged"))
    fetch_mnist(root, (str(copy),), progress=False)  # a damaged file is fetched again
    assert (folder / "t10k-labels-idx1-ubyte.gz").read_bytes() == (copy / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_mnist_files_that_do_not_verify_are_refused_and_not_kept(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 47_040_016))  # right size only
    with pytest.raises(DeepShrinkError, match=r"SHA-256 after decompression is [0-9a-f]{64}, expected ba891046"):
        fetch_mnist(tmp_path / "data", (str(mirror),), progress=False)
    (mirror / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes")
    with pytest.raises(DeepShrinkError, match="no source gave a verified train-images-idx3-ubyte.gz.*not a gzip file"):
        fetch_mnist(tmp_path / "data", (str(mirror),), progress=False)
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_fsdd_archive_is_checked_by_its_recordings(fsdd_root: Path, tmp_path: Path) -> None:
    recordings = {p.name: p.read_bytes() for p in (fsdd_root / "fsdd" / "recordings").glob("*.wav")}
    archive = _tar_gz(recordings, tmp_path / "fsdd.tar.gz")
    folder = fetch_fsdd(tmp_path / "data", (str(archive),), progress=False)
    assert folder == tmp_path / "data" / "fsdd" / "recordings"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == recordings


def test_fsdd_archives_that_do_not_verify_are_refused(tmp_path: Path) -> None:
    few = _tar_gz({"0_george_0.wav": b"RIFF", "1_george_0.wav": b"RIFF"}, tmp_path / "few.tar.gz")
    with pytest.raises(DeepShrinkError, match="2 recordings, expected 3000"):
        fetch_fsdd(tmp_path / "data", (str(few),), progress=False)
    speakers = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
    fake = {f"{d}_{s}_{t}.wav": b"RIFF" for d in range(10) for s in speakers for t in range(50)}
    wrong = _tar_gz(fake, tmp_path / "wrong.tar.gz")
    with pytest.raises(DeepShrinkError, match="recordings digest [0-9a-f]{64}, expected dbd573d7"):
        fetch_fsdd(tmp_path / "data", (str(wrong),), progress=False)
    (tmp_path / "notgz.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DeepShrinkError, match="not a readable .tar.gz archive"):
        fetch_fsdd(tmp_path / "data", (str(tmp_path / "notgz.tar.gz"),), progress=False)
    assert not (tmp_path / "data").exists()


def test_the_digest_covers_names_and_contents() -> None:
    files = {"0_a_0.wav": b"one", "1_a_0.wav": b"two"}
    assert recordings_digest(files) != recordings_digest({"0_a_0.wav": b"one", "1_a_1.wav": b"two"})
    assert recordings_digest(files) != recordings_digest({"0_a_0.wav": b"one", "1_a_0.wav": b"twO"})
    assert recordings_digest(files) != recordings_digest({"0_a_0.wav": b"one"})


@pytest.mark.parametrize("name", ["mnist", "fsdd"])
def test_offline_gives_one_clear_line(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    assert main(["data", name, "--to", str(tmp_path / "data")]) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and out.startswith("error: cannot download")
    assert "no source reachable" in out and "Temporary failure in name resolution" in out and "--mirror" in out
    assert not (tmp_path / "data").exists()


def test_cli_data_fills_the_data_root_from_a_mirror(data_root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("DEEPSHRINK_DATA", raising=False)
    assert main(["data", "mnist"]) == 2
    assert "give --to DIR" in capsys.readouterr().err
    mirror = tmp_path / "mirror"
    shutil.copytree(data_root / "mnist", mirror)
    assert main(["data", "mnist", "--to", str(tmp_path / "data"), "--mirror", str(mirror)]) == 0
    assert "mnist: verified in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(f.name for f in MNIST_FILES)
