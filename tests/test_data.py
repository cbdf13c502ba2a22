import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepshrink import DeepShrinkError
from deepshrink.data.digits import load_digits
from deepshrink.data.mnist import load_mnist


def test_mnist_test_split_is_the_real_one(mnist_test):
    images, labels = mnist_test
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) == 1.0
    assert torch.bincount(labels).tolist()[:3] == [980, 1135, 1032]  # the well-known class counts


def test_uncompressed_idx_files_read_the_same(data_root, tmp_path, mnist_test):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data_root / "mnist" / f"{stem}.gz", "rb") as src, open(tmp_path / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    # the README's MD5 of the uncompressed test images
    assert (
        hashlib.md5((tmp_path / "t10k-images-idx3-ubyte").read_bytes()).hexdigest()
        == "2646ac647ad5339dbf082846283269ea"
    )
    images, labels = load_mnist(tmp_path, "test")
    assert torch.equal(images, mnist_test[0]) and torch.equal(labels, mnist_test[1])


def test_missing_or_bad_files_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(DeepShrinkError, match=r"t10k-images-idx3-ubyte\[\.gz\] not found"):
        load_mnist(tmp_path, "test")
    with pytest.raises(DeepShrinkError, match="does not exist"):
        load_mnist(tmp_path / "nowhere", "test")
    monkeypatch.delenv("DEEPSHRINK_DATA", raising=False)
    with pytest.raises(DeepShrinkError, match="DEEPSHRINK_DATA"):
        load_mnist(None, "test")
    with pytest.raises(DeepShrinkError, match="split='val'"):
        load_mnist(tmp_path, "val")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05")
    with pytest.raises(DeepShrinkError, match="IDX header says"):
        load_mnist(tmp_path, "test")


def test_bundled_digits_split_is_fixed_and_disjoint():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert len(train_y) + len(test_y) == 1797
    assert train_x.shape[1:] == (1, 8, 8) and float(train_x.max()) <= 1.0
    assert torch.equal(load_digits("test")[0], test_x)


@pytest.mark.parametrize("required", ["", "1"])
def test_real_data_tests_skip_saying_how_to_get_the_data_unless_required(tmp_path, required):
    """A fresh clone (no data) skips real-data tests with a reason; CI (DEEPSHRINK_REQUIRE_DATA=1) fails them."""
    env = {**os.environ, "DEEPSHRINK_DATA": str(tmp_path), "DEEPSHRINK_REQUIRE_DATA": required}
    test = f"{Path(__file__).resolve()}::test_mnist_test_split_is_the_real_one"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert "deepshrink data mnist --to DIR" in run.stdout and "$DEEPSHRINK_DATA" in run.stdout
    if required:
        assert run.returncode != 0 and ("1 error" in run.stdout or "1 failed" in run.stdout)
    else:
        assert run.returncode == 0 and "1 skipped" in run.stdout


def test_shipped_calibration_text_is_disjoint_from_the_benchmark_text():
    from deepshrink.data.text import HELD_SENTENCES, calibration_texts, read_texts

    def norm(text: str) -> str:
        return " ".join(text.lower().split()).rstrip(".!?")

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "text"
    calibration = calibration_texts()
    sentences = read_texts(root / "eval_sentences.txt")
    pairs = [line.split("\t") for line in read_texts(root / "eval_pairs.tsv")]
    assert len(calibration) == len({norm(t) for t in calibration}) == 1728
    shipped, passages = calibration[:1500], calibration[1500:]
    held = shipped[:HELD_SENTENCES]
    joined = [s for s in shipped if any(s in p for p in passages)]
    assert len(joined) == len(passages) * 6 == 1368 and not set(joined) & set(held)  # each sentence in one at most
    assert len(sentences) == 300 and len(pairs) == 300 and all(len(p) == 3 for p in pairs)
    assert sorted({p[2] for p in pairs}) == ["paraphrase", "related", "unrelated"]
    evaluated = {norm(t) for t in sentences} | {norm(t) for p in pairs for t in p[:2]}
    assert len(evaluated) == 900  # 300 sentences and 600 pair sentences, all different
    assert not evaluated & {norm(t) for t in calibration}


def test_a_data_root_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    with pytest.raises(DeepShrinkError, match=r"t10k-images-idx3-ubyte\[\.gz\] not found in .*data/mnist"):
        load_mnist("~/data", "test")
