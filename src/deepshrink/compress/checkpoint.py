"""Checkpoints that let a long compression resume after ``kill -9``, losing at most one interval.

A run (a recipe, a distillation, any script) is a sequence of *units*: steps
whose effect lives in the model (a pruning round, weight sharing, a training
run) or whose result is small JSON data (an accuracy, a sensitivity proposal).
The driver wraps each in :meth:`Checkpointer.unit`; a training loop inside a
unit reports its progress with :meth:`Checkpointer.save_loop` (when
:meth:`Checkpointer.due`) and picks it up
again with :meth:`Checkpointer.loop_state`.

On resume the run is replayed from its start. Units the checkpoint records as
done are skipped and return their recorded result; when the replay reaches the
first unit not done, the model (parametrizations, masks and codebooks
included), the dropout rates and the random number generators are restored
from the checkpoint, and that unit runs, its training loop continuing from the
last step saved. The replay must take the same path (a fingerprint of the run
and the units' names are compared): code between units must not change the
model or read it (wrap such code in a unit).

Files are written atomically (:func:`deepshrink.atomic.write_atomic`) after
every unit and every ``every`` optimizer steps; under ``torchrun`` only rank 0
writes and every rank reads. Nothing in a checkpoint is executed: it is read
with ``torch.load(weights_only=True)``.

Examples:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> model = nn.Linear(2, 2)
    >>> ckpt = Checkpointer(path, model)
    >>> ckpt.unit("answer", lambda: 42)
    42
    >>> replay = Checkpointer(path, model, resume=True)
    >>> replay.unit("answer", lambda: 0)  # done before: the recorded result, fn is not called
    42
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deepshrink.atomic import write_atomic
from deepshrink.compress.parametrization import restore_
from deepshrink.errors import DeepShrinkError

T = TypeVar("T")
FORMAT = 1  # bump when the contents change meaning


def rng_state() -> dict:
    """The state of every random number generator a training run draws from (torch, CUDA, NumPy, Python)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])


def _writes() -> bool:
    """Rank 0 writes (or the only process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _dropout_rates(model: nn.Module) -> dict[str, list]:
    """Dropout rates are no state-dict entry, but retraining changes them (``scale_dropout_``)."""
    return {
        name: [m.p, m.__dict__.get("_deepshrink_p0")] for name, m in model.named_modules() if isinstance(m, nn.Dropout)
    }


def _set_dropout_rates(model: nn.Module, rates: dict[str, list]) -> None:
    for name, (p, p0) in rates.items():
        module = model.get_submodule(name)
        module.p = p
        if p0 is not None:
            module.__dict__["_deepshrink_p0"] = p0


class Checkpointer:
    """Save a run's progress as it goes; resume it by replaying the run.

    Args:
        path: the checkpoint file.
        model: the model the run changes (its state is what is saved).
        every: optimizer steps between saves inside a training loop (0: save
            only when a unit ends).
        resume: continue from ``path`` if it exists (else start afresh).
        fingerprint: describes the run (a recipe, its settings); a checkpoint
            of another run is refused rather than resumed.

    Raises:
        DeepShrinkError: ``every`` is negative, the file cannot be read as a
            checkpoint, or it belongs to another run.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        *,
        every: int = 500,
        resume: bool = False,
        fingerprint: str = "",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise DeepShrinkError(f"every={every!r} must be a non-negative integer (optimizer steps between saves)")
        self.path, self.model, self.every, self.fingerprint = Path(path), model, every, fingerprint
        self.journal: list[dict] = []  # the units done, in order: {"name", "result"}
        self._saved: dict | None = self._load() if resume and self.path.exists() else None
        self._overwrites = not resume and self.path.exists()
        self._next = 0  # index of the next unit the run starts
        self._running = ""  # the name of the unit running now
        self._loop: dict | None = None  # the running unit's loop state, as last saved

    # -- reading -----------------------------------------------------------------------------

    def _load(self) -> dict:
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            saved["journal"] = json.loads(saved["journal"])
        except Exception as err:  # torch.load raises many types on a file it cannot parse
            raise DeepShrinkError(f"cannot resume from {str(self.path)!r}: not a deepshrink checkpoint "
                                  f"({type(err).__name__}: {str(err)[:200]})") from err  # fmt: skip
        if saved.get("format") != FORMAT or saved.get("fingerprint") != self.fingerprint:
            raise DeepShrinkError(f"the checkpoint {str(self.path)!r} belongs to another run (its recipe or settings "
                                  "differ); remove it, or run without resuming to overwrite it")  # fmt: skip
        return saved

    @property
    def resuming(self) -> bool:
        """True until the replay has reached the point where the checkpoint was saved."""
        return self._saved is not None

    def describe(self) -> str:
        """Where a resumed run picks up, for the user."""
        if self._saved is None:
            if self._overwrites:
                return "starting from the beginning, over the checkpoint there (pass resume=True, --resume, to continue it)"
            return "starting from the beginning"
        done, loop = self._saved["journal"], self._saved["loop"]
        where = f"{len(done)} steps of the run done"
        return where + (f"; resuming inside a training run at optimizer step {loop['step']}" if loop else "")

    # -- the driver's side ---------------------------------------------------------------------

    def unit(
        self,
        name: str,
        fn: Callable[[], T],
        *,
        save: bool = True,
        encode: Callable[[T], object] | None = None,
        decode: Callable[[object], T] | None = None,
    ) -> T:
        """Run ``fn`` as the next unit of the run, or return its recorded result if the checkpoint has it done.

        Args:
            name: the unit's name; a replay must meet the same names in the same order.
            fn: the unit's work.
            save: write the checkpoint when it ends (a unit that only reads the
                model, such as an evaluation, need not).
            encode, decode: turn the result into JSON data and back (default: it is JSON data).

        Raises:
            DeepShrinkError: the replay took another path than the recorded run,
                or the result is not JSON data.
        """
        index = self._next
        self._next += 1
        if self._saved is not None and index < len(self._saved["journal"]):
            entry = self._saved["journal"][index]
            if entry["name"] != name:
                raise DeepShrinkError(f"the run does not replay as checkpointed: step {index} is {name!r} now but "
                                      f"was {entry['name']!r}; remove {str(self.path)!r} to start afresh")  # fmt: skip
            self.journal.append(entry)
            return decode(entry["result"]) if decode else entry["result"]
        self._restore()
        if self._loop is not None and self._loop["unit"] != name:
            raise DeepShrinkError(f"the run does not replay as checkpointed: step {index} is {name!r} now but was "
                                  f"{self._loop['unit']!r}; remove {str(self.path)!r} to start afresh")  # fmt: skip
        self._running = name
        result = fn()
        stored = encode(result) if encode else result
        try:
            json.dumps(stored)
        except (TypeError, ValueError) as err:
            raise DeepShrinkError(
                f"unit {name!r} returned {type(stored).__name__}, not JSON data; give encode="
            ) from err
        self.journal.append({"name": name, "result": stored})
        self._loop = None
        if save:
            self.save()
        return result

    def finish(self) -> None:
        """The run's units are all done: make sure the model holds their result (a replay that skipped them all)."""
        self._restore()

    def remove(self) -> None:
        """Delete the checkpoint (the run's output is safely written)."""
        if _writes():
            self.path.unlink(missing_ok=True)

    # -- the training loop's side ------------------------------------------------------------------

    def loop_state(self) -> dict | None:
        """The state the running unit's training loop saved last, when resuming inside it; else None.

        The loop restores what it passed to :meth:`save_loop` (its optimizer,
        data position, history), then calls :func:`set_rng_state` on
        ``state["rng"]`` once its data iterator is made (making one draws a seed).
        """
        return self._loop

    def due(self, step: int) -> bool:
        """Whether the loop should save after optimizer step ``step`` (from 1): every ``every`` steps."""
        return bool(self.every) and step % self.every == 0

    def save_loop(self, step: int, state: dict) -> None:
        """Save the running loop's ``state`` after optimizer step ``step``, with the model and RNG.

        ``state`` holds tensors and JSON-like data only (lists, dicts, numbers,
        strings): an optimizer's ``state_dict()``, a generator's ``get_state()``.
        Call it when :meth:`due`.
        """
        self._loop = {**state, "step": step, "unit": self._running, "rng": rng_state()}
        self.save()

    # -- writing and restoring ---------------------------------------------------------------------

    def save(self) -> None:
        """Write the run's progress now (rank 0 only), atomically."""
        if not _writes():
            return
        data = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "journal": json.dumps(self.journal),
            "loop": self._loop,
            "model": self.model.state_dict(),
            "dropout": _dropout_rates(self.model),
            "rng": rng_state(),
        }
        buffer = io.BytesIO()
        torch.save(data, buffer)
        write_atomic(self.path, buffer.getvalue())

    def _restore(self) -> None:
        """At the first unit not done: put the model and RNG back as saved (once)."""
        if self._saved is None:
            return
        saved, self._saved = self._saved, None
        device = next(self.model.parameters(), torch.empty(0)).device
        try:
            restore_(self.model, saved["model"])
        except (RuntimeError, KeyError) as err:
            raise DeepShrinkError(f"the checkpoint {str(self.path)!r} does not fit the model: {err}") from err
        self.model.to(device)
        _set_dropout_rates(self.model, saved["dropout"])
        set_rng_state(saved["rng"])
        self._loop = saved["loop"]


class NoCheckpoint:
    """What a run without checkpoints uses in place of a :class:`Checkpointer`: every unit runs, nothing is saved."""

    resuming = False

    def unit(self, name: str, fn: Callable[[], T], **_: object) -> T:
        return fn()

    def loop_state(self) -> None:
        return None

    def due(self, step: int) -> bool:
        return False

    def finish(self) -> None:
        pass

    def remove(self) -> None:
        pass


NO_CHECKPOINT = NoCheckpoint()
