"""Process group setup from torchrun's environment (one plain `python script.py` process too: a one-process group,
so the distributed code paths are the same at any world size; NCCL on CUDA, gloo on CPU), and the collectives."""

import os

import torch
import torch.distributed as dist

from common.cli import UserError


def init_distributed(device: str = "auto") -> torch.device:
    """Join (or create) the process group; return this process's device ("auto": CUDA when available)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    # plain `python script.py`: a one-process group on an in-process store (no port to find or to race for)
    alone = "RANK" not in os.environ
    store = dict(store=dist.HashStore(), rank=0, world_size=1) if alone else {}
    local_rank = 0 if alone else int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev, **store)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", **store)
    return dev


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather equal-sized tensors and concatenate them in rank order. No gradient flows back."""
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


@torch.no_grad()
def gather_to_main(tensor: torch.Tensor) -> torch.Tensor | None:
    """Gather equal-sized tensors to rank 0 only, concatenated in rank order (a memory bank); None elsewhere."""
    out = [torch.empty_like(tensor) for _ in range(world_size())] if is_main() else None
    dist.gather(tensor.contiguous(), out, dst=0)
    return torch.cat(out) if is_main() else None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over all processes; returns the tensor."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    dist.broadcast(tensor, src)
    return tensor
