"""Run under torchrun: prune + share + fit with DDP, then check ranks agree.

Writes ``ok`` to the file named by argv[2] on rank 0 when every rank holds the
same masks, codes and codebooks and pruned weights are exactly zero.
"""

import sys

import torch
import torch.distributed as dist

from deepshrink.data.mnist import load_mnist
from deepshrink.models import lenet_300_100
from deepshrink.prune import prune_
from deepshrink.quantize import share_weights_
from deepshrink.targets import find_targets
from deepshrink.train import TrainConfig, fit


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
    ok = True
    for t in find_targets(model):
        comp = t.module.parametrizations[t.param][0]
        for tensor in (comp.mask.float(), comp.codes.float(), comp.codebook.detach()):
            gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, tensor)
            ok &= all(torch.equal(g, gathered[0]) for g in gathered)
        ok &= bool(torch.all(t.weight[~comp.mask] == 0))
    if rank == 0:
        with open(result_path, "w") as f:
            f.write("ok" if ok else "ranks disagree")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
