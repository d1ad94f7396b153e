"""The first MoCo v2 step on 16 images, as 2 processes of 8 (BatchNorm groups of 8: one per process) and as one
process of 16 in 2 groups of 8, with the same weights, images and shuffle permutation. test_moco_v2.py runs
first_step() in its own process and this file under torchrun with 2 processes; rank 0 saves the result to argv[1]."""

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from moco_v2 import MoCo  # noqa: E402

BATCH = 16  # global


def first_step(bn_group_size: int = 8) -> dict:
    """One training step (forward, loss, backward, SGD) of the global batch split over the processes."""
    W, r = dist.world_size(), dist.rank()
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=8, K=32, m=0.99, T=0.2, mlp=True, bn_group_size=bn_group_size)
    im_q, im_k = torch.randn(2, BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mine = slice(r * BATCH // W, (r + 1) * BATCH // W)  # this process's images
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), 0.5, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(2)  # rank 0 draws the shuffle permutation for all processes
    logits, labels = ddp(im_q[mine], im_k[mine])
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {
        "logits": dist.concat_all_gather(logits.detach()),  # BATCH x (1+K), in image order
        "loss": dist.all_reduce_sum(loss.detach().clone()) / W,  # the mean over all images
        "weights": {k: p.detach().clone() for k, p in model.encoder_q.named_parameters()},  # after the step
        "queue": model.queue.clone(),
    }


if __name__ == "__main__":
    dist.init_distributed("cpu")
    result = first_step()
    if dist.is_main():
        torch.save(result, sys.argv[1])
    dist.cleanup()
