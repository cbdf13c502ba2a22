"""Fine-tuning that keeps masks and codebooks, on one process or under torchrun.

The guarantees (pruned weights stay zero, shared weights stay tied) live in the
parametrizations, not here: this loop is a convenience with a progress bar, an
optional learning-rate schedule and the paper's dropout adjustment. When
``torch.distributed`` is initialised (``torchrun``), the model is wrapped in
``DistributedDataParallel`` and the data sharded with ``DistributedSampler``;
masks and codes are buffers, which DDP broadcasts from rank 0, so ranks agree.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)

from deepshrink.compress.checkpoint import NO_CHECKPOINT, Checkpointer, NoCheckpoint, set_rng_state
from deepshrink.compress.parametrization import current_mask
from deepshrink.compress.prune import LayerSparsity, prune_, reports_from_json, reports_to_json
from deepshrink.compress.targets import find_targets
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import progress_bar, track

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = (None, "cosine", "step")


@dataclass
class TrainConfig:
    """Settings of :func:`fit`; checked on creation.

    Defaults follow Deep Compression's LeNet retraining: SGD with momentum and
    L2 regularisation (best after retraining).
    """

    epochs: float = 1.0  # fractions allowed: 0.25 runs a quarter of an epoch
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    batch_size: int = 64
    schedule: str | None = None  # None, "cosine", or "step" (x0.1 at 50% and 75%)
    max_steps: int | None = None  # stop early: tests and quick runs
    seed: int = 0
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to each training batch's inputs
    progress: bool = True
    history: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DeepShrinkError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise DeepShrinkError(f"schedule={self.schedule!r} must be one of None, 'cosine', 'step'")
        for name in ("epochs", "lr", "batch_size"):
            if not getattr(self, name) > 0:
                raise DeepShrinkError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.momentum < 0 or self.weight_decay < 0:
            raise DeepShrinkError("momentum and weight_decay must be >= 0")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` lives; a model of buffers only (the engine's) counts too."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _as_dataset(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> Dataset:
    return TensorDataset(*data) if isinstance(data, tuple) else data


class _ResumableSampler(Sampler[int]):
    """A sampler whose next pass can skip its first indices: a resumed run picks up mid-epoch, loading nothing twice.

    The wrapped sampler still draws its whole order (its random numbers are
    consumed as in an uninterrupted run), then the first ``skip`` indices are
    dropped; ``skip`` applies to one pass only.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.skip = sampler, 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


def make_loader(
    data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A DataLoader that shards across ranks when running under torchrun, and can resume mid-epoch.

    Its sampler is a :class:`_ResumableSampler` (``loader.sampler.skip``,
    ``loader.sampler.set_epoch``); the shuffle order is drawn from
    ``loader.generator`` (None under torchrun: ``DistributedSampler`` orders
    by seed and epoch), as ``DataLoader(shuffle=True, generator=...)`` draws it.
    """
    dataset = _as_dataset(data)
    if _distributed():
        sampler = _ResumableSampler(DistributedSampler(dataset, shuffle=shuffle, seed=seed))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    generator = torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=_ResumableSampler(order), generator=generator)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lr_factor(schedule: str | None, progress: float) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0
    return 1.0


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms while training on the CPU (``fit``, ``distill``), the caller's setting
    restored after.

    A codebook's gradient sums the gradients of all its members (a gather's backward,
    ``index_put_`` with accumulation); on the CPU torch adds them in parallel in no fixed
    order, so two runs of the same recipe on all-MiniLM-L6-v2 wrote files a few bytes apart.
    The deterministic path costs nothing measurable there (20 steps: 11.3 s against 13.8 s,
    within the machine's noise). Not on CUDA, where it needs cuBLAS settings made before the
    process starts.
    """
    if device.type != "cpu":
        yield
        return
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 1000, progress: bool = True
) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (all of it, on this process); ``progress`` shows a bar over batches."""
    was_training = model.training
    model.eval()
    device = _device(model)
    correct = total = 0
    for x, y in track(DataLoader(_as_dataset(data), batch_size=batch_size), "evaluating", show=progress):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def fit(
    model: nn.Module,
    train_data: Dataset | tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    description: str = "fine-tune",
    on_step: Callable[[int, int], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> list[dict]:
    """Train ``model`` in place; masks and codebooks hold by construction.

    Build this call's optimizer over the parameters that exist now, so call it
    after pruning or weight sharing, never before.

    ``on_step(step, total_steps)`` runs after each optimizer step (``step``
    counts from 1): gradual pruning tightens masks there, in place. It must
    keep no state of its own that a resumed run would need.

    ``checkpoint``: this call is one unit of that run
    (:class:`~deepshrink.compress.checkpoint.Checkpointer`): it saves every
    ``checkpoint.every`` steps (model, optimizer, random generators, position in
    the data, history) and, when the run resumes inside it, continues from the
    last save, computing exactly what an uninterrupted run computes.

    Returns:
        One ``{"step", "loss", "accuracy"}`` record per logged step (training
        batch accuracy, averaged over the last logging window).
    """
    ckpt = checkpoint or NO_CHECKPOINT
    return ckpt.unit(
        f"fit: {description}", lambda: _fit(model, train_data, config, loss_fn, description, on_step, ckpt)
    )


def _fit(
    model: nn.Module,
    train_data: Dataset | tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    description: str,
    on_step: Callable[[int, int], None] | None,
    checkpoint: Checkpointer | NoCheckpoint,
) -> list[dict]:
    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    loader = make_loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed)
    total_steps = max(1, int(cfg.epochs * len(loader)))
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    net = DistributedDataParallel(model) if _distributed() and not isinstance(model, DistributedDataParallel) else model
    optimizer = _optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    device = _device(model)
    show = cfg.progress and (not _distributed() or dist.get_rank() == 0)
    step, epoch, batch, history, window = 0, 0, 0, [], []
    resumed = checkpoint.loop_state()
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        step, epoch, batch = resumed["step"], resumed["epoch"], resumed["batch"]
        history, window = resumed["history"], [tuple(w) for w in resumed["window"]]
    model.train()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
        TimeRemainingColumn(),
    ]
    with progress_bar(*columns, show=show) as bar, deterministic_on_cpu(device):
        task = bar.add_task(description, total=total_steps, completed=step, loss=float("nan"), acc=float("nan"))
        while step < total_steps:
            loader.sampler.set_epoch(epoch)
            if resumed is not None:  # the epoch the run stopped in: its order again, the batches done skipped
                if loader.generator is not None:
                    loader.generator.set_state(resumed["generator"])
                loader.sampler.skip = batch * cfg.batch_size
            generator_state = loader.generator.get_state() if loader.generator is not None else None
            batches = iter(loader)
            if resumed is not None:
                set_rng_state(resumed["rng"])  # after iter(), which draws a seed, as at the save
                resumed = None
            for x, y in batches:
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr * _lr_factor(cfg.schedule, step / total_steps)
                x, y = x.to(device), y.to(device)
                if cfg.augment is not None:
                    x = cfg.augment(x)
                out = net(x)
                loss = loss_fn(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if on_step is not None:
                    on_step(step + 1, total_steps)
                window.append((loss.item(), (out.argmax(1) == y).float().mean().item()))
                step += 1
                batch += 1
                if step % 50 == 0 or step == total_steps:
                    loss_avg = sum(w[0] for w in window) / len(window)
                    acc_avg = sum(w[1] for w in window) / len(window)
                    history.append({"step": step, "loss": loss_avg, "accuracy": acc_avg})
                    bar.update(task, completed=step, loss=loss_avg, acc=acc_avg)
                    window = []
                if checkpoint.due(step):
                    state = {"epoch": epoch, "batch": batch, "generator": generator_state, "history": history,
                             "optimizer": optimizer.state_dict(), "window": window}  # fmt: skip
                    checkpoint.save_loop(step, state)
                if step >= total_steps:
                    break
            epoch, batch = epoch + 1, 0
    return history


def scale_dropout_(model: nn.Module) -> dict[str, float]:
    """Deep Compression's retraining dropout, ``Dr = Do * sqrt(kept / original)``.

    Each ``nn.Dropout`` is scaled by the kept fraction of the first compressible
    layer after it (the connections it drops). The original rate is remembered,
    so calling this after every pruning round is safe.

    Returns:
        The new rate of each dropout module, by name.
    """
    order = list(model.named_modules())
    targets = {t.module_name: t for t in find_targets(model, warn_unsupported=False)}
    rates = {}
    for i, (name, module) in enumerate(order):
        if not isinstance(module, nn.Dropout):
            continue
        after = next((targets[n] for n, _ in order[i + 1 :] if n in targets), None)
        if after is None:
            continue
        p0 = module.__dict__.setdefault("_deepshrink_p0", module.p)
        mask = current_mask(after)
        module.p = p0 * math.sqrt(float(mask.float().mean()))
        rates[name] = module.p
    return rates


def iterative_prune(
    model: nn.Module,
    steps: Sequence[float],
    train_data: Dataset | tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig | None = None,
    prune_fn: Callable[..., list[LayerSparsity]] = prune_,
    *,
    checkpoint: Checkpointer | None = None,
    **prune_kwargs: object,
) -> list[list[LayerSparsity]]:
    """Prune to each sparsity in ``steps`` in turn, fine-tuning after each.

    ``prune_kwargs`` go to ``prune_fn`` (by default :func:`deepshrink.compress.prune.prune_`:
    ``scope``, ``layers``...; :func:`deepshrink.compress.groups.prune_groups_` takes
    ``granularity``); a step may be a ``{pattern: sparsity}`` mapping. With a
    ``checkpoint``, each pruning and each fine-tuning is a unit of that run.

    Returns:
        The pruning report of each round.
    """
    if not steps:
        raise DeepShrinkError("steps must list at least one sparsity")
    ckpt = checkpoint or NO_CHECKPOINT
    reports = []
    for i, s in enumerate(steps):
        round_ = f"prune round {i + 1}/{len(steps)}"
        prune = functools.partial(_prune_round, model, prune_fn, s, prune_kwargs)
        reports.append(ckpt.unit(round_, prune, encode=reports_to_json, decode=reports_from_json))
        fit(model, train_data, config, description=round_, checkpoint=checkpoint)
    return reports


def _prune_round(model: nn.Module, prune_fn: Callable, sparsity: object, kwargs: dict) -> list[LayerSparsity]:
    reports = prune_fn(model, sparsity, **kwargs)
    scale_dropout_(model)
    return reports
