"""Run under torchrun with 2 processes by test_deepcluster_v2.py: distributed k-means on a memory split over the
processes. Each process holds a different shuffled part of the same rows (generated from a fixed seed); rank 0
writes the centroids and the assignments by dataset id to argv[1] (torch.save)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_deepcluster_v2 import kmeans_data  # noqa: E402

from common import dist  # noqa: E402
from deepcluster_v2 import spherical_kmeans  # noqa: E402

dist.init_distributed("cpu")
x, ids = kmeans_data()
mine = torch.randperm(len(ids), generator=torch.Generator().manual_seed(7))[dist.rank() :: dist.world_size()]
out = {}
for backend in ("faiss", "torch"):
    centroids, assign = spherical_kmeans(x[mine], ids[mine], K=12, iters=10, seed=3, backend=backend)
    by_id = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    by_id[dist.concat_all_gather(ids[mine])] = dist.concat_all_gather(assign)
    out[backend] = {"centroids": centroids, "assignments": by_id}
if dist.is_main():
    torch.save(out, sys.argv[1])
dist.cleanup()
