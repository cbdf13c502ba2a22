"""Fine-tuning without labels: the compressed model learns to compute what the original computed.

After one-shot compression of a pretrained model there are no labels to retrain
on, but there is the original: a *teacher* run on the same unlabelled inputs gives
the targets (knowledge distillation; Hinton et al. 2015). The loss compares the
student's outputs (and optionally the outputs of named inner modules) with the
teacher's, relative to the teacher's size, padding left out.

Masks and codebooks hold as in any training loop (they live in the
parametrizations). With ``quantization_aware`` the shared layers train their
latent full-precision weights through the straight-through estimator, so a weight
may move to another centroid (:class:`~deepshrink.compress.quantize.LatentSharedWeight`);
they are fixed again at the end. Under ``torchrun`` the student is wrapped in
``DistributedDataParallel`` and each rank takes its own share of the batches.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepshrink.compress.calibrate import Batch, batch_to, call_model
from deepshrink.compress.checkpoint import NO_CHECKPOINT, Checkpointer, NoCheckpoint, set_rng_state
from deepshrink.compress.int8 import train_with_int8_inputs
from deepshrink.compress.quantize import fix_sharing_, latent_sharing_
from deepshrink.compress.train import deterministic_on_cpu
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import progress_bar

OutputFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class DistillConfig:
    """Settings of :func:`distill`; checked on creation.

    Attributes:
        steps: optimizer steps (one batch each, per rank).
        lr: Adam's learning rate for everything trainable (latent weights, codebooks,
            biases, normalisation); a cosine schedule takes it to zero.
        quantization_aware: train shared layers' latent weights (codes may change);
            off, only centroids and unshared parameters train (Deep Compression's rule).
        hidden: glob patterns of module names whose outputs are matched too.
        hidden_weight: the weight of those terms against the output's.
        frozen: glob patterns of module names that do not train: their parameters
            (codebooks, codes, biases) stay as they are. A large embedding table is
            the usual one: each step would rebuild and update all of it for the few
            rows a batch uses.
        int8_inputs: train with each compressed Linear's input rounded to int8 per token
            (:func:`~deepshrink.compress.int8.train_with_int8_inputs`): for a model that will
            be declared int8 afterwards.
        seed: the order of the batches.
        log_every: steps between loss records.
    """

    steps: int = 200
    lr: float = 2e-5
    quantization_aware: bool = True
    hidden: tuple[str, ...] = ()
    hidden_weight: float = 0.1
    frozen: tuple[str, ...] = ()
    int8_inputs: bool = False
    seed: int = 0
    log_every: int = 25
    progress: bool = True
    history: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise DeepShrinkError(f"steps={self.steps!r} must be an integer >= 1")
        if not self.lr > 0:
            raise DeepShrinkError(f"lr={self.lr!r} must be > 0")
        if not self.hidden_weight >= 0:
            raise DeepShrinkError(f"hidden_weight={self.hidden_weight!r} must be >= 0")
        self.hidden = tuple(self.hidden)
        self.frozen = tuple(self.frozen)


def model_output(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The tensor a model returns for ``batch``: itself, the first of a tuple, or ``last_hidden_state``."""
    out = call_model(model, batch)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DeepShrinkError(f"cannot find a tensor in the model's output ({type(out).__name__}); pass outputs=")


def relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum |s - t|^2 / sum |t|^2`` over the positions ``mask`` marks (``[batch, sequence]``), all if ``None``.

    Examples:
        >>> relative_error(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])).item()
        1.0
    """
    if student.shape != teacher.shape:
        raise DeepShrinkError(f"student output {tuple(student.shape)} differs from teacher's {tuple(teacher.shape)}")
    if mask is not None and student.dim() >= 3 and student.shape[:2] == mask.shape:
        student, teacher = student[mask], teacher[mask]
    return ((student - teacher) ** 2).sum() / (teacher**2).sum().clamp(min=1e-12)


@torch.no_grad()
def output_cosine(
    model: nn.Module, batches: Sequence[Batch], reference: Sequence[torch.Tensor], outputs: OutputFn = model_output
) -> float:
    """Mean cosine similarity of ``model``'s outputs to ``reference`` (one tensor per batch).

    One cosine per sample (``[batch, features]`` outputs) or per real position
    (``[batch, sequence, features]``, padding left out), averaged.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch, ref in zip(batches, reference, strict=True):
        batch = batch_to(batch, device)
        out, ref = outputs(model, batch), ref.to(device)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if isinstance(mask, torch.Tensor) and out.dim() >= 3 and out.shape[:2] == mask.shape:
            out, ref = out[mask.bool()], ref[mask.bool()]
        cos = torch.nn.functional.cosine_similarity(out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1))
        total, count = total + float(cos.sum()), count + cos.numel()
    model.train(was_training)
    return total / max(count, 1)


def _matching(model: nn.Module, patterns: tuple[str, ...], what: str) -> dict[str, nn.Module]:
    """The modules whose names match any of ``patterns``, by name.

    Raises:
        DeepShrinkError: a pattern matches no module.
    """
    modules = {n: m for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in modules)]
    if missing:
        raise DeepShrinkError(f"{what} pattern(s) {', '.join(map(repr, missing))} match no module")
    return modules


class _Taps:
    """Forward hooks keeping the outputs of the modules matching ``patterns``, by name."""

    def __init__(self, model: nn.Module, patterns: tuple[str, ...]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._keep(n)) for n, m in _matching(model, patterns, "hidden").items()]

    def _keep(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    config: DistillConfig | None = None,
    *,
    outputs: OutputFn = model_output,
    checkpoint: Checkpointer | None = None,
) -> list[dict]:
    """Train ``student`` (compressed) to reproduce ``teacher`` (the original) on unlabelled ``batches``.

    Build nothing before: this call makes its own optimizer over what is trainable
    now. The teacher is not changed (no gradient, eval mode).

    Args:
        student: the compressed model (masks, shared weights), trained in place.
        teacher: the model it was compressed from, on the same device.
        batches: unlabelled inputs as :func:`~deepshrink.compress.calibrate.calibrate`
            takes them; visited in a seeded random order, epoch after epoch. Under
            ``torchrun`` rank ``r`` of ``w`` takes every ``w``-th batch from ``r``.
        config: :class:`DistillConfig`.
        outputs: ``(model, batch) -> tensor`` the loss compares, by default
            :func:`model_output`; e.g. a pooled sentence embedding.
        checkpoint: this call is one unit of that run (resumable mid-way).

    Returns:
        ``{"step", "loss"}`` records, the loss averaged over each logging window.

    Raises:
        DeepShrinkError: no batches (on this rank), a hidden or frozen pattern
            that matches no module, outputs of different shapes.
    """
    cfg = config or DistillConfig()
    ckpt = checkpoint or NO_CHECKPOINT
    return ckpt.unit("distill", lambda: _distill(student, teacher, batches, cfg, outputs, ckpt))


def _distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    cfg: DistillConfig,
    outputs: OutputFn,
    checkpoint: Checkpointer | NoCheckpoint,
) -> list[dict]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    mine = list(batches)[rank::world]
    if not mine:
        raise DeepShrinkError(f"distillation needs batches: rank {rank} of {world} got none")
    device = next(student.parameters()).device
    frozen = _matching(student, cfg.frozen, "frozen")
    held = [p for m in frozen.values() for p in m.parameters() if p.requires_grad]
    if cfg.quantization_aware:
        latent_sharing_(student, skip=frozen)
    for p in held:
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    net = DistributedDataParallel(student, find_unused_parameters=True) if world > 1 else student
    step, history, window = 0, [], []
    resumed = checkpoint.loop_state()
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        step, history, window = resumed["step"], resumed["history"], resumed["window"]
        set_rng_state(resumed["rng"])
    teacher.eval()
    student.train()
    student_taps, teacher_taps = _Taps(student, cfg.hidden), _Taps(teacher, cfg.hidden)
    rounding = train_with_int8_inputs(student) if cfg.int8_inputs else []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.5f}"), TimeRemainingColumn()]  # fmt: skip
    try:
        with progress_bar(*columns, show=cfg.progress and rank == 0) as bar, deterministic_on_cpu(device):
            task = bar.add_task("distilling", total=cfg.steps, completed=step, loss=float("nan"))
            while step < cfg.steps:
                epoch, index = divmod(step, len(mine))
                batch = batch_to(mine[_order(len(mine), cfg.seed, epoch)[index]], device)
                mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                with torch.no_grad():
                    target = outputs(teacher, batch)
                loss = relative_error(outputs(net, batch), target, mask)
                for name, value in teacher_taps.outputs.items():
                    loss = loss + cfg.hidden_weight * relative_error(student_taps.outputs[name], value, mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                window.append(loss.item())
                step += 1
                if step % cfg.log_every == 0 or step == cfg.steps:
                    history.append({"step": step, "loss": sum(window) / len(window)})
                    bar.update(task, completed=step, loss=history[-1]["loss"])
                    window = []
                if checkpoint.due(step):
                    state = {"step": step, "history": history, "window": window,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}  # fmt: skip
                    checkpoint.save_loop(step, state)
    finally:
        student_taps.remove()
        teacher_taps.remove()
        for handle in rounding:
            handle.remove()
        for p in held:
            p.requires_grad_(True)
    if cfg.quantization_aware:
        fix_sharing_(student)
    student.eval()
    cfg.history.extend(history)
    return history
