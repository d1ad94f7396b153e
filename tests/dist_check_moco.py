"""Run under torchrun with 2 processes by test_moco_v2.py: shuffle-BN and the queue across processes.
Writes a JSON of findings (rank 0) to argv[1]."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from moco_v2 import MoCo  # noqa: E402

dist.init_distributed("cpu")
torch.manual_seed(0)
model = MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2)  # the same weights on both processes (same seed)
torch.manual_seed(100 + dist.rank())  # different images on each process
x = torch.randn(4, 3, 32, 32)
x_shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
unshuffle_identity = torch.equal(model._batch_unshuffle_ddp(x_shuffled, idx_unshuffle), x)
# Did this process get images of the other process? (over 8 images: the permutation is global)
gathered = dist.concat_all_gather(x)
own = torch.arange(4) + 4 * dist.rank()
from_rows = [int((gathered == row).flatten(1).all(1).nonzero()) for row in x_shuffled]
mixes = torch.tensor([any(r not in own.tolist() for r in from_rows)], dtype=torch.float)
model.eval()  # eval-mode BatchNorm: each key depends on its own image only, so the shuffle must not matter
with torch.no_grad():
    k_shuffled = model._batch_unshuffle_ddp(model.encoder_k(x_shuffled), idx_unshuffle)
    keys_match = torch.allclose(k_shuffled, model.encoder_k(x), atol=1e-5)
model.train()
model(x, torch.randn(4, 3, 32, 32))
queues = dist.concat_all_gather(model.queue[None])
ptrs = dist.concat_all_gather(model.queue_ptr)
mixes = dist.all_reduce_sum(mixes)
flags = dist.all_reduce_sum(torch.tensor([float(unshuffle_identity), float(keys_match)]))
if dist.is_main():
    with open(sys.argv[1], "w") as f:
        json.dump(
            {
                "unshuffle_identity": flags[0].item() == 2,
                "keys_match_unshuffled": flags[1].item() == 2,
                "queue_equal_across_ranks": torch.equal(queues[0], queues[1]),
                "queue_ptr": ptrs.tolist(),
                "slices_mix_ranks": mixes.item() > 0,
            },
            f,
        )
dist.cleanup()
