"""Run under torchrun: prune + share + fit with DDP, then check ranks agree.

Writes ``ok`` to the file named by argv[2] on rank 0 when every rank holds the
same masks, codes and codebooks and every rank's pruned weights are exactly zero.
"""

import sys

import torch
import torch.distributed as dist

from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import TrainConfig, fit
from deepshrink.data.mnist import load_mnist
from deepshrink.models import lenet_300_100


def main(data_root: str, result_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial model on every rank
    images, labels = load_mnist(data_root, "test")
    data = (images[:2048], labels[:2048])
    model = lenet_300_100()
    fit(model, data, TrainConfig(epochs=1, lr=0.05, progress=False))
    prune_(model, 0.9)
    fit(model, data, TrainConfig(epochs=1, lr=0.01, progress=False))
    share_weights_(model, bits=4)
    fit(model, data, TrainConfig(epochs=1, lr=0.01, progress=False))
    state = {"pruned weights are zero": torch.tensor(True)}
    for t in find_targets(model):
        comp = t.module.parametrizations[t.param][0]
        state.update({f"{t.name}.mask": comp.mask, f"{t.name}.codes": comp.codes,
                      f"{t.name}.codebook": comp.codebook.detach()})  # fmt: skip
        state["pruned weights are zero"] &= torch.all(t.weight[~comp.mask] == 0)
    # Ranks compare through files, not a final all_gather: Gloo's worker thread frees a
    # finished collective's Python tensors after wait() returns, and when that races the
    # interpreter's shutdown the process aborts (pytorch/pytorch#179291; ~1 run in 15 here).
    # A barrier has no tensors to free.
    torch.save(state, f"{result_path}.rank{rank}")
    dist.barrier()
    if rank == 0:
        states = [torch.load(f"{result_path}.rank{r}") for r in range(dist.get_world_size())]
        agree = all(s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s) for s in states)
        zeros = all(bool(s["pruned weights are zero"]) for s in states)
        with open(result_path, "w") as f:
            f.write("ok" if agree and zeros else f"ranks agree: {agree}, pruned weights zero: {zeros}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
