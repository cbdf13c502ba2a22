"""Resumable compression: a run killed at any point continues from its checkpoint to the same result."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from deepshrink.compress import prune_, share_weights_
from deepshrink.compress.checkpoint import Checkpointer
from deepshrink.compress.schedules import gradual_prune
from deepshrink.compress.train import TrainConfig, fit, iterative_prune
from deepshrink.data.digits import load_digits
from deepshrink.errors import DeepShrinkError
from deepshrink.models import lenet_300_100


class Crash(Exception):
    """Stands for kill -9 inside a process: nothing after it runs."""


@contextmanager
def crash_at_step(n: int) -> Iterator[None]:
    """Raise Crash right after the ``n``-th optimizer step taken inside the block, whatever the loop."""
    count = 0

    def hook(*_: object) -> None:
        nonlocal count
        count += 1
        if count == n:
            raise Crash

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def fresh() -> nn.Module:
    """A digits LeNet-300-100 with dropout (so the random generators matter), pruned and weight-shared."""
    torch.manual_seed(0)
    model = lenet_300_100(in_features=64, dropout=0.3)
    prune_(model, 0.5)
    share_weights_(model, bits=4)
    return model


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa
    )


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits("train")


def test_fit_resumed_mid_epoch_computes_exactly_what_an_uninterrupted_fit_does(digits, tmp_path: Path, one_thread):
    cfg = TrainConfig(epochs=2.5, lr=0.05, batch_size=64, progress=False)
    reference = fresh()
    expected = fit(reference, digits, cfg)
    crashed = fresh()
    with crash_at_step(40), pytest.raises(Crash):  # in the second epoch; the last save was at step 35
        fit(crashed, digits, cfg, checkpoint=Checkpointer(tmp_path / "c", crashed, every=7))
    resumed = fresh()
    checkpoint = Checkpointer(tmp_path / "c", resumed, every=7, resume=True)
    assert "optimizer step 35" in checkpoint.describe()
    assert fit(resumed, digits, cfg, checkpoint=checkpoint) == expected
    assert same_state(resumed, reference)


def test_a_run_of_units_resumes_where_it_stopped(digits, tmp_path: Path, one_thread) -> None:
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=64, progress=False)

    def run(model: nn.Module, checkpoint: Checkpointer) -> list:
        reports = iterative_prune(model, [0.5, 0.7], digits, cfg, checkpoint=checkpoint, layers=["fc1.weight"])
        report = gradual_prune(model, 0.9, digits, cfg, every=5, layers=["fc2.weight"], checkpoint=checkpoint)
        checkpoint.unit("share", lambda: len(share_weights_(model, bits=3)))
        fit(model, digits, cfg, description="centroids", checkpoint=checkpoint)
        checkpoint.finish()
        return [reports, report]

    torch.manual_seed(0)
    reference = lenet_300_100(in_features=64, dropout=0.2)
    expected = run(reference, Checkpointer(tmp_path / "ref", reference, every=10))
    torch.manual_seed(0)
    crashed = lenet_300_100(in_features=64, dropout=0.2)
    with crash_at_step(60), pytest.raises(Crash):  # 23 steps a fit: inside the gradual pruning's, at its step 14
        run(crashed, Checkpointer(tmp_path / "c", crashed, every=10))
    torch.manual_seed(1)  # a different start: everything must come from the checkpoint
    resumed = lenet_300_100(in_features=64, dropout=0.2)
    checkpoint = Checkpointer(tmp_path / "c", resumed, every=10, resume=True)
    assert checkpoint.describe() == "5 steps of the run done; resuming inside a training run at optimizer step 10"
    assert run(resumed, checkpoint) == expected
    assert same_state(resumed, reference)
    assert [m.p for m in resumed.modules() if isinstance(m, nn.Dropout)] == [
        m.p for m in reference.modules() if isinstance(m, nn.Dropout)
    ]  # scaled by the pruning, and no state-dict entry: the checkpoint keeps them


def test_a_checkpoint_of_another_run_or_path_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    checkpoint = Checkpointer(tmp_path / "c", model, fingerprint="recipe A")
    checkpoint.unit("prune", lambda: 1)
    with pytest.raises(DeepShrinkError, match="belongs to another run"):
        Checkpointer(tmp_path / "c", model, resume=True, fingerprint="recipe B")
    replay = Checkpointer(tmp_path / "c", model, resume=True, fingerprint="recipe A")
    with pytest.raises(DeepShrinkError, match="step 0 is 'share' now but was 'prune'"):
        replay.unit("share", lambda: 1)
    with pytest.raises(DeepShrinkError, match="not JSON data"):
        Checkpointer(tmp_path / "d", model).unit("report", lambda: object())
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(DeepShrinkError, match="not a deepshrink checkpoint"):
        Checkpointer(tmp_path / "junk", model, resume=True)
    assert Checkpointer(tmp_path / "absent", model, resume=True).describe() == "starting from the beginning"
    assert "over the checkpoint there (pass resume=True, --resume" in Checkpointer(tmp_path / "c", model).describe()


def test_kill_9_during_a_recipe_then_resume_gives_the_same_file(tmp_path: Path, load_benchmark) -> None:
    """One trial of benchmarks/bench_resume.py (which runs the MNIST LeNet-300-100 recipe) on a digits recipe."""
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(
        "model: lenet-300-100\nmodel_kwargs: {in_features: 64, dropout: 0.2}\ndata: digits\nseed: 3\n"
        "stages:\n"
        "  - train: {epochs: 2, lr: 0.05}\n"
        "  - prune: {sparsity: 0.8, steps: 2, epochs: 1, lr: 0.01}\n"
        "  - prune: {sparsity: {fc2: 0.9}, schedule: gradual, every: 5, epochs: 1, lr: 0.01}\n"
        "  - share: {bits: 4, epochs: 1, lr: 0.005}\n"
    )
    folder = tmp_path / "runs"
    folder.mkdir()
    result = load_benchmark("bench_resume").trials(str(recipe), folder, 1, every=10, data="digits", data_dir=None)
    trial = result["trials"][0]
    assert trial["identical"] and trial["error"] == result["reference_error"], result
    assert 0 <= trial["redone_steps"] <= 10, result  # at most one checkpoint interval
    assert trial["files_after_kill"] in ([], ["trial0.dsz.ckpt"]), result  # no temporary file, no partial output
    assert not trial["checkpoint_left"]  # removed once the output is written
