"""Run under torchrun: a checkpointed fit, crashed on every rank, resumes on every rank to the uninterrupted result.

Writes ``ok`` to the file named by argv[1] on rank 0 when, on every rank, the resumed
model equals the one an uninterrupted run trained, and no rank but 0 wrote a checkpoint.
"""

import sys

import torch
import torch.distributed as dist

from deepshrink.compress import checkpoint as checkpoint_module
from deepshrink.compress.checkpoint import Checkpointer
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.compress.train import TrainConfig, fit
from deepshrink.data.digits import load_digits
from deepshrink.models import lenet_300_100


class Crash(Exception):
    pass


def fresh(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = lenet_300_100(in_features=64, dropout=0.2)
    prune_(model, 0.5)
    share_weights_(model, bits=4)
    return model


def crash_at(n: int):
    """An on_step callback that stops the run after step ``n``, before that step's checkpoint save."""

    def on_step(step: int, total: int) -> None:
        if step == n:
            raise Crash

    return on_step


def main(result_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank != 0:  # only rank 0 may write: any other rank's attempt fails the run

        def refuse(*_: object) -> None:
            raise AssertionError(f"rank {rank} wrote a checkpoint")

        checkpoint_module.write_atomic = refuse
    data, cfg = load_digits("train"), TrainConfig(epochs=2, lr=0.05, progress=False)  # 12 steps an epoch per rank
    reference = fresh(0)
    fit(reference, data, cfg, checkpoint=Checkpointer(f"{result_path}.reference", reference, every=5))
    crashed = fresh(0)
    try:  # the last save is at step 15, in the second epoch
        fit(crashed, data, cfg, on_step=crash_at(18), checkpoint=Checkpointer(f"{result_path}.ckpt", crashed, every=5))
    except Crash:
        pass
    resumed = fresh(1)  # another start: everything must come from the checkpoint
    fit(resumed, data, cfg, checkpoint=Checkpointer(f"{result_path}.ckpt", resumed, every=5, resume=True))
    a, b = reference.state_dict(), resumed.state_dict()
    same = all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    torch.save({"same": same}, f"{result_path}.rank{rank}")  # compared through files: see ddp_finetune.py
    dist.barrier()
    if rank == 0:
        results = [torch.load(f"{result_path}.rank{r}")["same"] for r in range(dist.get_world_size())]
        with open(result_path, "w") as f:
            f.write("ok" if all(results) else f"resumed equals uninterrupted, per rank: {results}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
