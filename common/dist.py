"""Process group setup from torchrun's environment, and the few collectives the methods use.

Every script runs inside a process group, even as one plain `python script.py` process (a one-process
group on a free local port), so the distributed code paths (all-gather, broadcast, all-reduce) are the
same at world size 1 and N. NCCL on CUDA, gloo on CPU.
"""

import os
import socket

import torch
import torch.distributed as dist


def init_distributed(device: str = "auto") -> torch.device:
    """Join (or create) the process group and return this process's device.

    device: "auto" (CUDA when available), "cuda" or "cpu".
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        from common.cli import UserError

        raise UserError("--device cuda was asked for but CUDA is not available")
    if "RANK" not in os.environ:  # plain `python script.py`: a one-process group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over all processes; returns the tensor."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    dist.broadcast(tensor, src)
    return tensor


def barrier() -> None:
    dist.barrier()
