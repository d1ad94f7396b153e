"""Running averages, progress lines and the per-epoch JSON log (rank 0 only)."""

import json
import os
import time

import torch

from common import dist
from common.cli import UserError, reason


class Meter:
    """Average of a scalar over an epoch; device tensors are summed on the device (only reading `avg` waits)."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n: int = 1) -> None:
        self.sum = self.sum + (value.detach().float() if hasattr(value, "detach") else value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(self.sum) / max(self.count, 1)


class Progress:
    """Times the steps of one epoch and prints `Epoch [e][i/n] name value ... img/s data` every print_freq."""

    def __init__(self, epoch: int, steps: int, global_batch: int, print_freq: int):
        self.epoch, self.steps, self.global_batch, self.print_freq = epoch, steps, global_batch, print_freq
        self.meters: dict[str, Meter] = {}
        self.start = self.last = time.perf_counter()
        self.data_time = Meter()

    def data_loaded(self) -> None:
        self.data_time.update(time.perf_counter() - self.last)

    def step(self, i: int, **values) -> None:
        """Record this step's values; print every print_freq steps (reading values syncs with the device)."""
        for k, v in values.items():
            self.meters.setdefault(k, Meter()).update(v)
        now = time.perf_counter()
        self.last = now
        if dist.is_main() and (i % self.print_freq == 0 or i == self.steps - 1):
            rate = (i + 1) * self.global_batch / (now - self.start)
            vals = "  ".join(f"{k} {m.avg:.4g}" for k, m in self.meters.items())
            stats = f"{vals}  img/s {rate:.1f}  data {self.data_time.avg:.3f}s"
            print(f"Epoch [{self.epoch}][{i + 1}/{self.steps}]  {stats}", flush=True)

    def summary(self, prefix: str = "train") -> dict:
        """The epoch's means, images/s, seconds, the mean wait for data per step and, on CUDA, the peak GPU memory
        of the epoch in GiB (the peak is reset for the next epoch)."""
        elapsed = time.perf_counter() - self.start
        out = {f"{prefix}/{k}": m.avg for k, m in self.meters.items()}
        out.update({f"{prefix}/img_per_s": self.steps * self.global_batch / elapsed, f"{prefix}/epoch_s": elapsed})
        out[f"{prefix}/data_s"] = self.data_time.avg
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out[f"{prefix}/max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return out


def log_epoch(output_dir: str, record: dict) -> None:
    """Append one JSON object to OUTPUT_DIR/log.jsonl and print it (rank 0)."""
    if not dist.is_main():
        return
    line, path = json.dumps(record), os.path.join(output_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:  # a full disk, say: the epoch's checkpoint is already written
        raise UserError(f"cannot append to {path}: {reason(err)}; the checkpoint of this epoch is written") from None
    print(line, flush=True)
