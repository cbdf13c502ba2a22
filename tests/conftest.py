"""Shared fixtures: the real data sets, a quickly trained LeNet-300-100, and a tiny BERT folder.

The data root is ``$DEEPSHRINK_DATA`` if set, else ``../shared/data`` beside the
repository (where CI puts it). A test whose data set is missing is skipped with
a reason saying how to provide it; ``DEEPSHRINK_REQUIRE_DATA=1`` (set by
``.ci/run``) turns those skips into failures, so CI cannot pass without them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DEEPSHRINK_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
REQUIRE_DATA = os.environ.get("DEEPSHRINK_REQUIRE_DATA", "") not in ("", "0")
HOW_TO_GET = {
    "mnist": "`deepshrink data mnist --to DIR` fetches it",
    "fsdd": "`deepshrink data fsdd --to DIR` fetches it",
    "tinyshakespeare": "tinyshakespeare/input.txt is Karpathy's char-rnn corpus",
}


def require_data(name: str) -> Path:
    """The data root if it holds the data set ``name``; else skip (or fail, under DEEPSHRINK_REQUIRE_DATA=1)."""
    if not (DATA_ROOT / name).is_dir():
        message = (
            f"real data set {name}/ not found under {DATA_ROOT}: set $DEEPSHRINK_DATA to a folder holding "
            f"{name}/ ({HOW_TO_GET[name]}), or put it in ../shared/data beside the repository"
        )
        if REQUIRE_DATA:
            pytest.fail(f"DEEPSHRINK_REQUIRE_DATA is set and the {message}")
        pytest.skip(message)
    return DATA_ROOT


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root, holding MNIST (skips otherwise)."""
    return require_data("mnist")


@pytest.fixture(scope="session")
def fsdd_root() -> Path:
    """The data root, holding FSDD's recordings (skips otherwise)."""
    return require_data("fsdd")


@pytest.fixture(scope="session")
def text_root() -> Path:
    """The data root, holding tinyshakespeare (skips otherwise)."""
    return require_data("tinyshakespeare")


@pytest.fixture(scope="session")
def mnist_train(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from deepshrink.data.mnist import load_mnist

    return load_mnist(data_root, "train")


@pytest.fixture(scope="session")
def mnist_test(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from deepshrink.data.mnist import load_mnist

    return load_mnist(data_root, "test")


@pytest.fixture(scope="session")
def _trained_lenet300(mnist_train) -> torch.nn.Module:
    from deepshrink.compress.train import TrainConfig, fit
    from deepshrink.models import lenet_300_100

    torch.manual_seed(0)
    model = lenet_300_100()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread: a busy machine makes 2 threads far slower
    fit(model, mnist_train, TrainConfig(epochs=1, lr=0.05, batch_size=128, progress=False))
    torch.set_num_threads(threads)
    return model


@pytest.fixture
def trained_lenet300(_trained_lenet300) -> torch.nn.Module:
    """LeNet-300-100 after one epoch on real MNIST (about 97% test accuracy); a fresh copy per test."""
    return copy.deepcopy(_trained_lenet300)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: on a busy 2-core machine, two OpenMP threads
    spinning against other processes made small-model training steps ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as when it is run (its neighbour ``common.py`` importable)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    if name not in sys.modules:  # dataclasses look their module up there while it is being run
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    """``load_benchmark(name)`` imports ``benchmarks/<name>.py`` as when it is run."""
    return _load_benchmark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``crafted_case`` runs once per crafted file of ``benchmarks/bench_fuzz.py``."""
    if "crafted_case" in metafunc.fixturenames:
        metafunc.parametrize("crafted_case", list(_load_benchmark("bench_fuzz").CASES))


TINY_BERT_WORDS = ("the a cat dog bird sat ran flew on under over mat tree house big small red blue green old new "
                   "happy sad quickly slowly and or but is was were has had will can see saw eat ate run play "
                   "park river road car bus train day night rain sun").split()  # fmt: skip


def _tiny_config_and_tokenizer(family: str, vocab: Path, size: int) -> tuple[object, object]:
    """A two-layer encoder of ``family`` (hidden 32) and its WordPiece tokenizer over ``vocab``."""
    import transformers

    if family == "bert":
        config = transformers.BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        return config, transformers.BertTokenizerFast(vocab_file=str(vocab))
    if family == "distilbert":  # no token_type_ids, its own layer names
        config = transformers.DistilBertConfig(vocab_size=size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=64)  # fmt: skip
        return config, transformers.DistilBertTokenizerFast(vocab_file=str(vocab))
    if family == "electra":  # embeddings narrower than the encoder, projected up by a Linear
        config = transformers.ElectraConfig(vocab_size=size, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        return config, transformers.ElectraTokenizerFast(vocab_file=str(vocab))
    raise ValueError(f"no tiny {family!r}")


def _write_tiny_bert(folder: Path, sentence_transformers: bool = True, family: str = "bert") -> Path:
    """A randomly initialised BERT (vocabulary of 62, hidden 32, two layers; or a DistilBERT or ELECTRA
    ``family`` of that size) with its WordPiece tokenizer, saved in the Hugging Face layout, with
    sentence-transformers' files around it (mean pooling, normalized) when asked."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *TINY_BERT_WORDS, "##s", "##ed", "##ing", "##ly"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config, tokenizer = _tiny_config_and_tokenizer(family, folder / "vocab.txt", len(vocab))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    with torch.no_grad():  # BERT's initialisation (std 0.02) makes every sentence alike; spread them apart
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    if sentence_transformers:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]  # fmt: skip
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                      "pooling_mode_mean_tokens": True}))  # fmt: skip
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    return folder


@pytest.fixture(scope="session")
def write_tiny_bert() -> Callable[..., Path]:
    """``write_tiny_bert(folder, sentence_transformers=True, family="bert")`` writes a tiny model folder (skips
    without transformers)."""
    pytest.importorskip("transformers", reason="needs transformers: pip install 'deepshrink[hf]'")
    return _write_tiny_bert
