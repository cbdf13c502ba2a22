"""FSDD loader: official split on the real recordings, features against a per-frame reference, cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from deepshrink.data import fsdd
from deepshrink.data.fsdd import FeatureConfig, features, fixed_length, load_fsdd, mel_filterbank, split_features
from deepshrink.errors import DeepShrinkError


@pytest.fixture(scope="module")
def recordings(fsdd_root: Path) -> Path:
    folder = fsdd_root / "fsdd" / "recordings"
    if not folder.is_dir():
        pytest.fail(f"FSDD not found at {folder}")
    return folder


def reference_features(signal: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Frame by frame with explicit loops: the obvious implementation."""
    x = signal.astype(np.float64) / 32768.0
    x = x[: config.n_samples]
    x = np.concatenate([np.zeros(config.n_samples - len(x)), x])
    n = np.arange(config.n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / config.n_fft)
    freqs = np.arange(config.n_fft // 2 + 1) * fsdd.SAMPLE_RATE / config.n_fft
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, mel(4000), config.n_mels + 2)]
    out = []
    for t in range(config.n_frames):
        frame = x[t * config.hop : t * config.hop + config.n_fft] * window
        spectrum = np.abs(np.fft.rfft(frame)) ** 2
        energies = []
        for m in range(config.n_mels):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            weights = [max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid))) for f in freqs]
            energies.append(np.log(np.dot(weights, spectrum) + 1e-6))
        out.append(energies)
    return np.array(out)


def test_official_split(recordings: Path) -> None:
    train = fsdd._recordings(recordings, "train")
    test = fsdd._recordings(recordings, "test")
    assert len(train) == 2700 and len(test) == 300
    takes = lambda files: {int(re.fullmatch(r"\d_\w+_(\d+)\.wav", p.name)[1]) for p, _ in files}  # noqa: E731
    assert takes(test) == set(range(5)) and takes(train) == set(range(5, 50))
    assert np.bincount([d for _, d in test]).tolist() == [30] * 10


def test_test_split_features_and_cache(recordings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = split_features(recordings, "test", cache=tmp_path)
    assert x.shape == (300, 41, 40) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.bincount(y).tolist() == [30] * 10
    stored = list(tmp_path.glob("fsdd-test-*.npz"))
    assert len(stored) == 1 and not list(tmp_path.glob("*.tmp"))
    # A second call is served from the cache: computing anything would fail now.
    monkeypatch.setattr(fsdd, "features", lambda *a, **k: pytest.fail("features recomputed despite the cache"))
    x2, y2 = split_features(recordings, "test", cache=tmp_path)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # Other settings are another cache entry, not a stale hit.
    monkeypatch.undo()
    x3, _ = split_features(recordings, "test", FeatureConfig(kind="mfcc"), cache=tmp_path)
    assert x3.shape == (300, 41, 13) and len(list(tmp_path.glob("fsdd-test-*.npz"))) == 2


def test_features_match_per_frame_reference(recordings: Path) -> None:
    signal = fsdd._read_wav(recordings / "7_jackson_3.wav")
    config = FeatureConfig(seconds=0.3)
    got = features(signal, config)
    assert got.shape == (config.n_frames, 40)
    np.testing.assert_allclose(got, reference_features(signal, config), atol=2e-3)


def test_mfcc_is_orthonormal_dct_of_log_mel() -> None:
    rng = np.random.default_rng(0)
    signal = (rng.standard_normal(4000) * 3000).astype(np.int16)
    log_mel = features(signal, FeatureConfig(seconds=0.5)).astype(np.float64)
    mfcc = features(signal, FeatureConfig(kind="mfcc", seconds=0.5, n_mfcc=13))
    n = np.arange(40)
    basis = np.array([np.cos(np.pi * k * (2 * n + 1) / 80) * np.sqrt((1 if k else 0.5) * 2 / 40) for k in range(13)])
    np.testing.assert_allclose(mfcc, log_mel @ basis.T, rtol=1e-4, atol=1e-3)


def test_sine_energy_lands_in_its_mel_band() -> None:
    t = np.arange(8000) / fsdd.SAMPLE_RATE
    feats = features((np.sin(2 * np.pi * 1000 * t) * 0.5).astype(np.float32))
    centres = fsdd.mel_to_hz(np.linspace(0, fsdd.hz_to_mel(4000), 42))[1:-1]
    assert abs(centres[feats.mean(axis=0).argmax()] - 1000) < 80


def test_filterbank_triangles_partition_unity() -> None:
    fb = mel_filterbank(20, 512).astype(np.float64)
    freqs = np.linspace(0, 4000, 257)
    centres = fsdd.mel_to_hz(np.linspace(0, fsdd.hz_to_mel(4000), 22))
    inside = (freqs >= centres[1]) & (freqs <= centres[-2])
    np.testing.assert_allclose(fb.sum(axis=0)[inside], 1.0, atol=1e-5)
    assert (fb >= 0).all() and fb.max() <= 1.0


def test_fixed_length_pads_in_front_and_truncates() -> None:
    assert fixed_length(np.array([1, 2], dtype=np.int16), 4).tolist() == [0, 0, 1, 2]
    assert fixed_length(np.arange(6.0), 4).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert features(np.zeros(0, dtype=np.float32)).shape == (41, 40)  # an empty recording is silence


def test_load_fsdd_standardises_with_train_statistics(recordings: Path, tmp_path: Path) -> None:
    x, y = load_fsdd(recordings, "train", cache=tmp_path)  # a fresh cache: never write to the user's home
    xt, yt = load_fsdd(recordings, "test", cache=tmp_path)
    assert x.shape == (2700, 41, 40) and xt.shape == (300, 41, 40)
    np.testing.assert_allclose(x.mean(dim=(0, 1)).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(dim=(0, 1)).numpy(), 1, atol=1e-2)
    assert abs(float(xt.mean())) < 0.3  # test standardised by train statistics, not its own


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "spectrogram"}, "kind='spectrogram' must be one of logmel, mfcc"),
        ({"seconds": 0}, "seconds=0 must be"),
        ({"hop": 0}, "hop=0 must be a positive integer"),
        ({"n_fft": 4096, "seconds": 0.1}, "fewer samples than n_fft"),
        ({"kind": "mfcc", "n_mfcc": 50}, "n_mfcc=50 must be <= n_mels=40"),
    ],
)
def test_bad_feature_config(kwargs: dict, message: str) -> None:
    with pytest.raises(DeepShrinkError, match=re.escape(message)):
        FeatureConfig(**kwargs)


def test_bad_split_and_folders(recordings: Path, tmp_path: Path) -> None:
    with pytest.raises(DeepShrinkError, match="split='valid' must be 'train' or 'test'"):
        split_features(recordings, "valid", cache=False)
    with pytest.raises(DeepShrinkError, match="does not exist"):
        split_features(tmp_path / "nowhere", cache=False)
    with pytest.raises(DeepShrinkError, match="no FSDD recordings"):
        split_features(tmp_path, "test", cache=False)
    (tmp_path / "3_bob_1.wav").write_bytes(b"not a wav")
    with pytest.raises(DeepShrinkError, match="not a readable WAV"):
        split_features(tmp_path, "test", cache=False)


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSHRINK_CACHE", str(tmp_path))
    assert fsdd.cache_dir() == tmp_path
    assert fsdd.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("DEEPSHRINK_CACHE")
    assert fsdd.cache_dir() == Path.home() / ".cache" / "deepshrink"
