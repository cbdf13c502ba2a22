"""The Free Spoken Digit Dataset: WAV files to log-mel or MFCC sequences, cached on disk.

FSDD holds 3,000 mono 8 kHz recordings named ``{digit}_{speaker}_{take}.wav``
(6 speakers x 10 digits x 50 takes). The official split puts takes 0-4 of every
speaker and digit in the test set and takes 5-49 in the training set.

Every utterance becomes a fixed-length sequence so that a batch needs no
padding logic and the batch-1 engine sees exactly what the model was trained on:
the first ``seconds`` of audio, with shorter recordings padded with silence *in
front*, so that the last LSTM step falls right after the spoken digit. Features
are computed with NumPy only (framing, Hann window, power spectrum, triangular
mel filters on the HTK mel scale, log, and a DCT-II for MFCCs).

Computed features are cached as ``.npz`` under :func:`cache_dir` (keyed by the
settings and the files' names and sizes), written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.io.wavfile
import torch

from deepshrink.atomic import write_atomic
from deepshrink.data.common import data_dir
from deepshrink.errors import DeepShrinkError

SAMPLE_RATE = 8000  # FSDD is recorded at 8 kHz
TEST_TAKES = range(0, 5)  # official split: takes 0-4 test, 5-49 train
CACHE_ENV_VAR = "DEEPSHRINK_CACHE"
KINDS = ("logmel", "mfcc")
SPLITS = ("train", "test")
_NAME = re.compile(r"(\d)_([A-Za-z]+)_(\d+)\.wav")
_LOG_FLOOR = 1e-6  # keeps log() finite on the digital silence used for padding


@dataclass(frozen=True)
class FeatureConfig:
    """How a recording becomes a ``(frames, features)`` sequence; checked on creation.

    The defaults give 41 frames of 40 log-mel energies per utterance.
    """

    kind: str = "logmel"  # "logmel" or "mfcc"
    seconds: float = 1.0  # fixed length: 99% of FSDD recordings are shorter than 0.92 s
    n_fft: int = 256  # 32 ms window at 8 kHz (a power of two for the FFT)
    hop: int = 192  # 24 ms hop: 41 steps per second keep LSTM training and inference cheap
    n_mels: int = 40
    n_mfcc: int = 13  # used when kind == "mfcc"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DeepShrinkError(f"kind={self.kind!r} must be one of {', '.join(KINDS)}")
        if not isinstance(self.seconds, (int, float)) or not 0 < self.seconds <= 10:
            raise DeepShrinkError(f"seconds={self.seconds!r} must be a number in (0, 10]")
        for name in ("n_fft", "hop", "n_mels", "n_mfcc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeepShrinkError(f"{name}={value!r} must be a positive integer")
        if self.n_samples < self.n_fft:
            raise DeepShrinkError(f"seconds={self.seconds} holds fewer samples than n_fft={self.n_fft}")
        if self.kind == "mfcc" and self.n_mfcc > self.n_mels:
            raise DeepShrinkError(f"n_mfcc={self.n_mfcc} must be <= n_mels={self.n_mels}")

    @property
    def n_samples(self) -> int:
        return round(self.seconds * SAMPLE_RATE)

    @property
    def n_frames(self) -> int:
        return 1 + (self.n_samples - self.n_fft) // self.hop

    @property
    def n_features(self) -> int:
        return self.n_mfcc if self.kind == "mfcc" else self.n_mels


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where features are cached: ``path``, else ``$DEEPSHRINK_CACHE``, else ``~/.cache/deepshrink``."""
    root = path if path is not None else os.environ.get(CACHE_ENV_VAR)
    return Path(root) if root is not None else Path.home() / ".cache" / "deepshrink"


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale from 0 Hz to Nyquist.

    Returns:
        ``(n_mels, n_fft // 2 + 1)`` float32; filter ``m`` rises from centre
        ``m - 1`` to a peak of 1 at centre ``m`` and falls to centre ``m + 1``.

    Examples:
        >>> fb = mel_filterbank(4, 16)
        >>> fb.shape, bool(0.9 < fb.max() <= 1.0)
        ((4, 9), True)
    """
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)


def fixed_length(signal: np.ndarray, n_samples: int) -> np.ndarray:
    """The first ``n_samples`` of ``signal``, padded with zeros in front when shorter.

    Examples:
        >>> fixed_length(np.array([1.0, 2.0]), 4).tolist(), fixed_length(np.arange(5.0), 3).tolist()
        ([0.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    """
    signal = signal[:n_samples]
    return np.concatenate([np.zeros(n_samples - len(signal), dtype=signal.dtype), signal])


def features(signal: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Log-mel or MFCC sequence of one 8 kHz recording.

    Args:
        signal: ``(samples,)`` audio, float in [-1, 1] (or int16, scaled here).
        config: the feature settings.

    Returns:
        ``(config.n_frames, config.n_features)`` float32.

    Examples:
        >>> features(np.zeros(8000, dtype=np.float32)).shape
        (41, 40)
    """
    x = np.asarray(signal)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    x = fixed_length(x, config.n_samples)
    frames = np.lib.stride_tricks.sliding_window_view(x, config.n_fft)[:: config.hop]  # (T, n_fft)
    window = np.hanning(config.n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, n_fft // 2 + 1)
    log_mel = np.log(power @ mel_filterbank(config.n_mels, config.n_fft).T + _LOG_FLOOR)  # (T, n_mels)
    if config.kind == "mfcc":
        return scipy.fft.dct(log_mel, type=2, norm="ortho", axis=1)[:, : config.n_mfcc].astype(np.float32)
    return log_mel.astype(np.float32)


def _recordings(folder: Path, split: str) -> list[tuple[Path, int]]:
    """``(path, digit)`` of every recording of ``split``, in a stable order."""
    found = []
    for path in sorted(folder.glob("*.wav")):
        match = _NAME.fullmatch(path.name)
        if match is None:
            continue
        is_test = int(match[3]) in TEST_TAKES
        if is_test == (split == "test"):
            found.append((path, int(match[1])))
    if not found:
        raise DeepShrinkError(f"no FSDD recordings named {{digit}}_{{speaker}}_{{take}}.wav in {folder}")
    return found


def _recordings_folder(root: str | os.PathLike | None) -> Path:
    folder = data_dir(root)
    for sub in ("fsdd/recordings", "recordings"):
        if (folder / sub).is_dir():
            return folder / sub
    return folder


def _cache_key(files: list[tuple[Path, int]], config: FeatureConfig) -> str:
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for path, _ in files:
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def _read_wav(path: Path) -> np.ndarray:
    try:
        rate, signal = scipy.io.wavfile.read(path)
    except ValueError as err:
        raise DeepShrinkError(f"{path}: not a readable WAV file ({err})") from err
    if rate != SAMPLE_RATE or signal.ndim != 1:
        raise DeepShrinkError(f"{path}: expected mono {SAMPLE_RATE} Hz audio, got {rate} Hz, shape {signal.shape}")
    return signal


def split_features(
    root: str | os.PathLike | None = None,
    split: str = "train",
    config: FeatureConfig = FeatureConfig(),
    cache: str | os.PathLike | None | bool = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Un-normalised features and labels of one split, from the cache when present.

    Args:
        root: the ``recordings`` folder, or a data root holding ``fsdd/recordings``;
            default ``$DEEPSHRINK_DATA``.
        split: ``"train"`` (takes 5-49, 2,700 recordings) or ``"test"`` (takes 0-4, 300).
        config: feature settings.
        cache: cache folder, ``None`` or ``True`` for the default (see
            :func:`cache_dir`), or ``False`` to compute afresh and write nothing.

    Returns:
        ``(features (N, frames, n_features) float32, labels (N,) int64)``.

    Raises:
        DeepShrinkError: unknown split, missing folder or recordings, a bad WAV file.
    """
    if split not in SPLITS:
        raise DeepShrinkError(f"split={split!r} must be 'train' or 'test'")
    files = _recordings(_recordings_folder(root), split)
    path = None
    if cache is not False:
        path = cache_dir(None if isinstance(cache, bool) else cache) / f"fsdd-{split}-{_cache_key(files, config)}.npz"
        if path.is_file():
            with np.load(path) as stored:
                return stored["x"], stored["y"]
    x = np.stack([features(_read_wav(p), config) for p, _ in files])
    y = np.array([digit for _, digit in files], dtype=np.int64)
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=y)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())
    return x, y


def load_fsdd(
    root: str | os.PathLike | None = None,
    split: str = "train",
    config: FeatureConfig = FeatureConfig(),
    cache: str | os.PathLike | None | bool = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised FSDD features and labels as tensors, ready for an LSTM.

    Each feature is shifted and scaled by the mean and standard deviation of
    the *training* split (for both splits, so the test set leaks nothing).

    Args:
        root, split, config, cache: see :func:`split_features`.

    Returns:
        ``(x (N, frames, n_features) float32, y (N,) int64)``; by default
        ``(2700, 41, 40)`` for train and ``(300, 41, 40)`` for test.

    Raises:
        DeepShrinkError: see :func:`split_features`.
    """
    train_x, train_y = split_features(root, "train", config, cache)
    x, y = (train_x, train_y) if split == "train" else split_features(root, split, config, cache)
    mean = train_x.mean(axis=(0, 1))
    std = train_x.std(axis=(0, 1)) + 1e-6
    return torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(y)
