"""Checkpoints: one schema for every script, atomic writes, strict loads, exact resume.

The schema, and how a checkpoint is told by its contents rather than its method's name: docs/checkpoints.md. Every
failure to read or write a checkpoint, or to fit one to the model these flags build, is a UserError: one line that
names the file and the cause.
"""

import contextlib
import errno
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as torch_dist
import torchvision

from common import dist
from common.cli import UserError, reason

FORMAT = 1
LATEST = "checkpoint.pth"
KEYS = ("format", "method", "arch", "epoch", "backbone", "model", "optimizer", "args", "rng", "extra")


# ---------------------------------------------------------------- output folder and resume path
def prepare_output_dir(output_dir: str, resume: str | None) -> None:
    """Create the output folder; refuse to start a fresh run on top of an existing one."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --output-dir {output_dir}: {_os_cause(err)}") from None
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
    if os.path.isdir(resume):
        raise UserError(f"--resume {resume} is a folder; give a checkpoint file, e.g. {os.path.join(resume, LATEST)}")
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume}: no such file")
    return resume


# ---------------------------------------------------------------- writing
def save(state: dict, output_dir: str, keep: bool, latest_only: tuple = ()) -> str:
    """Rank 0 writes OUTPUT_DIR/checkpoint.pth atomically; with `keep`, also checkpoint_<epoch>.pth, without the
    `extra` entries named in `latest_only` (such as a memory bank), else as a hard link to checkpoint.pth (a copy
    where links are refused; docs/checkpoints.md). A failed write leaves the previous files as they were and no
    temporary file; its error names the last good checkpoint. Other ranks do nothing."""
    if not dist.is_main():
        return ""
    path = os.path.join(output_dir, LATEST)
    try:
        write_atomic(path, lambda f: torch.save(state, f))
        if keep:
            kept = os.path.join(output_dir, f"checkpoint_{state['epoch']:04d}.pth")
            if any(k in state["extra"] for k in latest_only):
                extra = {k: v for k, v in state["extra"].items() if k not in latest_only}
                write_atomic(kept, lambda f: torch.save({**state, "extra": extra}, f))
            else:
                with open(path, "rb") as src:
                    write_atomic(kept, lambda f: shutil.copyfileobj(src, f, 2**24), link=path)
    except UserError as err:
        raise UserError(f"{err}; {_last_good(path)}") from None
    return path


def write_atomic(path: str, write, link: str | None = None) -> None:
    """Write `path` through `path.tmp`: `write(f)` fills the open binary file, which is synced to the disk and
    renamed over `path`; with `link`, `path.tmp` is a hard link to that file instead, where the file system allows
    one. On failure the temporary file is removed and `path` is left as it was."""
    tmp = path + ".tmp"
    try:
        if link is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            with contextlib.suppress(OSError):  # no hard links on this file system: `write` below
                os.link(link, tmp)
        if link is None or not os.path.lexists(tmp):
            with open(tmp, "wb") as f:
                write(f)  # torch.save into an open file reports a failed write as the OSError of the write
                f.flush()
                os.fsync(f.fileno())  # on the disk before the rename: a crash cannot leave a renamed empty file
        os.replace(tmp, path)
    except BaseException as err:  # an interrupt too: no partial file is left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(err, (OSError, RuntimeError)):  # RuntimeError: torch.save's report of a failed write
            raise
        raise UserError(f"cannot write {path}: {_write_cause(err, path)}; the partial file was removed") from None


def _write_cause(err: BaseException, path: str) -> str:
    folder, seen = os.path.dirname(os.path.abspath(path)), err
    while seen is not None and not (isinstance(seen, OSError) and seen.errno):  # maybe under torch's RuntimeError
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        # a full disk, told by the errno or, without one (torch.save given a path), by the free space
        full = seen.errno in (errno.ENOSPC, errno.EDQUOT) if seen else free < 2**26
        if full:
            cause = _os_cause(seen) if seen else "no space left on device"
            return f"{cause} ({free / 2**20:,.0f} MiB free in {folder})"
    return _os_cause(seen) if seen else reason(err)


def _os_cause(err: OSError) -> str:
    text = os.strerror(err.errno) if err.errno else reason(err)
    return text[:1].lower() + text[1:]


def _last_good(path: str) -> str:
    if not os.path.isfile(path):
        return "no checkpoint was written before"
    with contextlib.suppress(Exception):  # only a detail of the message; mmap: the epoch without the tensors
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        return f"the last good checkpoint is {path} (epoch {epoch})"
    return f"the last good checkpoint is {path}"


# ---------------------------------------------------------------- reading
def load(path: str) -> dict:
    """Read a checkpoint on the CPU; any failure is one clear error that names the file and the cause."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load's messages name neither the file nor, often, the cause
        raise UserError(f"cannot read checkpoint {path}: {_read_cause(path, err)}") from None


def _read_cause(path: str, err: Exception) -> str:
    if isinstance(err, OSError) and err.errno:
        return _os_cause(err)
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes, what an interrupted copy or a full disk leaves)"
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80\x02\x8a\x0a")):  # torch.save's zip archive, or its older pickle
        return "not a checkpoint written by these scripts (nor by torch.save)"
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"it holds a Python object ({found.group(1)}); only tensors and plain containers are read (weights_only)"
    return f"the file is truncated or damaged ({size:,} bytes; an interrupted copy or a full disk?)"


def check_kind(ckpt: dict, path: str, method: str) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("method") != method:
        if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
            found = f"a {ckpt.get('method')} checkpoint"
        elif isinstance(ckpt, dict):  # e.g. a public MoCo or SwAV-repository checkpoint: a trunk for --pretrained
            found = "no checkpoint of this project; its keys: " + ", ".join(sorted(map(str, ckpt))[:4])
        else:
            found = type(ckpt).__name__
        raise UserError(f"{path} is not a {method} checkpoint of this project (found: {found})")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is a {method} checkpoint without its {', '.join(missing)} entries")


def load_state(module: torch.nn.Module, state_dict: dict, path: str, saved_args: dict | None = None) -> None:
    """Load a resumed checkpoint's model state strictly; one that does not fit is one line that names the first
    missing, unexpected or differently shaped tensor and the flags to check (`saved_args`: the checkpoint's run's)."""
    expected = module.state_dict()
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not fit these flags: its model entry is not a state_dict of tensors")
    problem = _first_mismatch(expected, state_dict)
    if problem:
        key, what = problem
        raise UserError(f"{path} does not fit these flags: {what}; check {_flag_hint(key, saved_args or {})}")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:  # keys and shapes fit (checked above): show PyTorch's reason, on one line
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        raise UserError(f"{path} does not fit these flags: {detail or reason(err)}") from None


def _first_mismatch(expected: dict, state: dict) -> tuple[str, str] | None:
    for k, v in expected.items():  # in the model's order: the first problem is the most telling one
        if k not in state:
            return k, f"the checkpoint has no {k}"
        if state[k].shape != v.shape:
            return k, f"{k} is {list(state[k].shape)} in the checkpoint, {list(v.shape)} with these flags"
    extra = [k for k in state if k not in expected]
    return (extra[0], f"the checkpoint holds {extra[0]}, which these flags do not build") if extra else None


def _flag_hint(key: str, saved_args: dict) -> str:
    # Told from the key alone (no list of methods): an evaluation's classifier, the ResNet trunk, or method state.
    if key in ("fc.weight", "fc.bias"):
        return "DATA (the number of class folders sets the classifier)"
    if re.match(r"(\w+\.)?(conv1|bn1|layer\d)\.", key):  # the trunk, plain or under one prefix
        return "-a/--arch" + (f" (the checkpoint's run: -a {saved_args['arch']})" if "arch" in saved_args else "")
    return f"the flags that build {key.rsplit('.', 1)[0]} (the checkpoint's are in its args entry)"


def load_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict, path: str) -> None:
    """Load a resumed checkpoint's optimizer state; parameter groups of other sizes are one clear line."""
    groups = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
    saved = [len(g.get("params", [])) for g in groups]
    here = [len(g["params"]) for g in optimizer.param_groups]
    if saved != here:
        raise UserError(
            f"{path} does not fit these flags: its optimizer has parameter groups of {saved} tensors, "
            f"this run's {here} (another optimizer, or other trainable parameters)"
        )
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{path}: cannot restore the optimizer state: {reason(err)}") from None


# ---------------------------------------------------------------- the trunk, for evaluation and export
def load_trunk(path: str, arch: str) -> dict:
    """trunk_of the checkpoint file at `path`."""
    return trunk_of(load(path), path, arch)


def trunk_of(obj, path: str, arch: str) -> dict:
    """The trunk of a loaded pretraining checkpoint (ours, the MoCo or the SwAV repository's: docs/checkpoints.md)
    as torchvision ResNet keys without fc.*, checked strictly: every trunk key present with its shape, nothing else."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj.get("backbone")
        if not isinstance(state, dict):
            raise UserError(f"{path} is a {obj.get('method')} checkpoint without its backbone entry")
        if is_evaluation(obj):
            raise UserError(f"{path} is a {obj.get('method')} checkpoint, not a pretraining one")
    else:
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UserError(f"{path} is not a pretraining checkpoint (no state_dict of tensors)")
        moco = any(k.startswith("module.encoder_q.") for k in sd)  # else the SwAV repository's (DeepCluster-v2, SwAV)
        prefix, heads = ("module.encoder_q.", ("fc.",)) if moco else ("module.", ("projection_head.", "prototypes."))
        state = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix) or not moco}
        state = {k: v for k, v in state.items() if not k.startswith(heads)}  # MoCo's MLP head; SwAV's head, prototypes
    expected = {k: v.shape for k, v in backbone_of(torchvision.models.get_model(arch)).items()}
    problems = {"missing": sorted(set(expected) - set(state)), "unexpected": sorted(set(state) - set(expected))}
    problems["shape of"] = sorted(k for k in expected if k in state and state[k].shape != expected[k])
    for what, keys in problems.items():
        if keys:
            raise UserError(f"{path} does not hold a {arch} trunk ({what} {keys[:3]}); check -a/--arch and the file")
    return state


def is_evaluation(obj: dict) -> bool:
    """Whether a checkpoint of ours is an evaluation's (lincls.py, finetune.py), by its contents (module docstring)."""
    model, backbone = obj.get("model"), obj.get("backbone")
    if not isinstance(model, dict) or not isinstance(backbone, dict):
        return False
    return set(model) == set(backbone) | {"fc.weight", "fc.bias"}


def backbone_of(encoder: torch.nn.Module) -> dict:
    """The trunk of a torchvision ResNet: its state_dict without fc.*."""
    return {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}


# ---------------------------------------------------------------- RNG
def rng_states() -> list:
    """Every process's RNG states, gathered (collective: call on all ranks)."""
    out = [None] * dist.world_size()
    torch_dist.all_gather_object(out, _rng_state())
    return out


def restore_rng(states: list) -> bool:
    """Restore this rank's RNG states; False (and nothing restored) when the process count changed."""
    if len(states) != dist.world_size():
        return False
    _set_rng_state(states[dist.rank()])
    return True


@contextlib.contextmanager
def rng_kept(device: torch.device):
    """Put back this process's torch (CPU, and `device` if a CUDA one), numpy and python RNG states on leaving."""
    state = _rng_state(device)
    try:
        yield
    finally:
        _set_rng_state(state, device)


def seed_all(seed: int) -> None:
    """Seed torch, numpy and python; callers offset the seed by rank."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state(device: torch.device | None = None) -> dict:
    # CUDA: every device's generator (a checkpoint), or only `device`'s (rng_kept).
    if device is None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    else:
        cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))  # tensors: weights_only
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy, "python": random.getstate()}


def _set_rng_state(s: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(s["torch"])
    if device is not None and s["cuda"]:
        torch.cuda.set_rng_state(s["cuda"][0], device)
    elif torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
