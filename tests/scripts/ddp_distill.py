"""Run under torchrun: calibrate, one-shot prune and share, distill with DDP; check that ranks agree.

Each rank sees different batches (calibration statistics are summed over ranks,
distillation takes every other batch), yet every rank must end with the same
masks, codes and codebooks. Writes ``ok`` to argv[1] on rank 0 when they do.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

from deepshrink.compress.calibrate import calibrate
from deepshrink.compress.distill import DistillConfig, distill
from deepshrink.compress.oneshot import prune_calibrated_, share_calibrated_
from deepshrink.compress.targets import find_targets
from deepshrink.data.digits import load_digits


def main(result_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same teacher on every rank
    teacher = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    student.load_state_dict(teacher.state_dict())
    images = load_digits("train")[0].reshape(-1, 64)
    batches = [images[i : i + 32] for i in range(0, 512, 32)]
    calib = calibrate(student, batches[rank::2], progress=False)  # each rank its own inputs, summed
    prune_calibrated_(student, calib, 0.5, method="sparsegpt", progress=False)
    share_calibrated_(student, calib, bits=3, progress=False)
    distill(student, teacher, batches, DistillConfig(steps=20, lr=1e-3, progress=False))
    state = {}
    for t in find_targets(student):
        comp = t.module.parametrizations[t.param][0]
        state.update({f"{t.name}.mask": comp.mask, f"{t.name}.codes": comp.codes,
                      f"{t.name}.codebook": comp.codebook.detach()})  # fmt: skip
    torch.save(state, f"{result_path}.rank{rank}")  # compared through files: see ddp_finetune.py
    dist.barrier()
    if rank == 0:
        states = [torch.load(f"{result_path}.rank{r}") for r in range(dist.get_world_size())]
        agree = all(s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s) for s in states)
        with open(result_path, "w") as f:
            f.write("ok" if agree else "ranks disagree")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
