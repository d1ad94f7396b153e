"""Run under torchrun with 2 processes by test_monitor.py: the kNN monitor with its images split over the processes.
argv: DATA OUT. Rank 0 writes the result, the gathered training features and the number of val images classified
(summed over the processes) to OUT (torch.save)."""

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_monitor import MONITOR  # noqa: E402

from common import dist  # noqa: E402
from common.monitor import KNNMonitor  # noqa: E402

dist.init_distributed("cpu")
torch.manual_seed(0)
trunk = torchvision.models.resnet18()  # the same weights on both processes (same seed)
monitor = KNNMonitor(sys.argv[1], device=torch.device("cpu"), **MONITOR)
stats = monitor(trunk)
train_loader, val_loader = monitor.loaders
memory = monitor._gather(monitor._embed(trunk.eval(), train_loader), len(monitor.train_set))
n_val = dist.all_reduce_sum(torch.tensor([len(val_loader.dataset)]))
if dist.is_main():
    torch.save({"stats": stats, "memory": memory, "n_val": int(n_val)}, sys.argv[2])
dist.cleanup()
