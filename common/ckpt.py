"""Checkpoints: one schema for every script, atomic writes, strict loads, exact resume.

Schema (a plain dict, loadable with torch.load(weights_only=True)):
    format      1
    method      "moco_v2", "mochi", "hexa_moco", "deepcluster_v2", "hexa_dcluster", "lincls", "finetune"
    arch        torchvision ResNet name
    epoch       number of completed epochs
    backbone    the evaluated trunk: a torchvision ResNet state_dict without fc.* (load strictly into
                `torchvision.models.<arch>()` minus its fc)
    model       the full method state (heads, momentum encoder, queue and pointer, prototypes, ...)
    optimizer   optimizer state_dict
    args        the run's flags, as a dict
    rng         per-process RNG states (torch, CUDA, numpy, python), one entry per rank
    extra       method extras (e.g. the DeepCluster memory bank, the best accuracy of an evaluation)
"""

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as torch_dist

from common import dist
from common.cli import UserError

FORMAT = 1
LATEST = "checkpoint.pth"


def prepare_output_dir(output_dir: str, resume: str | None) -> None:
    """Create the output folder; refuse to start a fresh run on top of an existing one."""
    os.makedirs(output_dir, exist_ok=True)
    if resume is None and os.path.exists(os.path.join(output_dir, LATEST)):
        raise UserError(
            f"{output_dir} already holds a run ({LATEST}); continue it with --resume or choose another --output-dir"
        )


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """--resume PATH, or --resume alone for the latest checkpoint in --output-dir (none yet: start fresh)."""
    if resume is None:
        return None
    if resume == "latest":
        path = os.path.join(output_dir, LATEST)
        return path if os.path.exists(path) else None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume}: no such file")
    return resume


def save(state: dict, output_dir: str, keep: bool, latest_only: tuple = ()) -> str:
    """Rank 0 writes OUTPUT_DIR/checkpoint.pth atomically (temp file, then rename); with `keep`, also
    checkpoint_<epoch>.pth, without the `extra` entries named in `latest_only` (large state that only the latest
    checkpoint needs, such as a memory bank). Other ranks do nothing.

    A kept checkpoint with the same content as checkpoint.pth is a hard link to it, not a second copy: every later
    save replaces checkpoint.pth by a new file, so the kept one never changes (a copy where links are refused)."""
    if not dist.is_main():
        return ""
    path = os.path.join(output_dir, LATEST)
    _atomic_save(state, path)
    if keep:
        kept = os.path.join(output_dir, f"checkpoint_{state['epoch']:04d}.pth")
        if any(k in state["extra"] for k in latest_only):
            extra = {k: v for k, v in state["extra"].items() if k not in latest_only}
            _atomic_save({**state, "extra": extra}, kept)
        else:
            _atomic_link(path, kept)
    return path


def _atomic_save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _atomic_link(src: str, dst: str) -> None:
    if os.path.lexists(dst + ".tmp"):
        os.remove(dst + ".tmp")
    try:
        os.link(src, dst + ".tmp")
    except OSError:
        shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def load(path: str) -> dict:
    """Read a checkpoint on the CPU; any failure is one clear error."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def check_kind(ckpt: dict, path: str, method: str) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("method") != method:
        found = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a {method} checkpoint of this project (found: {found})")


def backbone_of(encoder: torch.nn.Module) -> dict:
    """The trunk of a torchvision ResNet: its state_dict without fc.*."""
    return {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}


def rng_states() -> list:
    """Every process's RNG states, gathered (collective: call on all ranks)."""
    mine = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    out = [None] * dist.world_size()
    torch_dist.all_gather_object(out, mine)
    return out


def restore_rng(states: list) -> bool:
    """Restore this rank's RNG states; False (and nothing restored) when the process count changed."""
    if len(states) != dist.world_size():
        return False
    s = states[dist.rank()]
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    return True


def seed_all(seed: int) -> None:
    """Seed torch, numpy and python; callers offset the seed by rank."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _numpy_state():
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
