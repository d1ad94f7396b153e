"""common.ckpt: the latest checkpoint and the kept ones, unreadable files, a full disk, resuming with other flags."""

import argparse
import errno
import hashlib
import os
import re
import shutil

import pytest
import torch
import torchvision
from conftest import load_ckpt

from common import ckpt
from common.cli import UserError


def state(epoch, **extra):
    return {"epoch": epoch, "model": {"w": torch.full((4,), float(epoch))}, "extra": extra}


def test_kept_checkpoint_is_a_link_that_later_saves_leave_alone(tmp_path):
    ckpt.save(state(1), tmp_path, keep=True)
    kept, latest = tmp_path / "checkpoint_0001.pth", tmp_path / "checkpoint.pth"
    assert os.stat(kept).st_ino == os.stat(latest).st_ino  # one file on disk, not two
    ckpt.save(state(2), tmp_path, keep=False)
    assert load_ckpt(kept)["model"]["w"].tolist() == [1.0] * 4
    assert load_ckpt(latest)["epoch"] == 2 and os.stat(kept).st_nlink == 1
    ckpt.save(state(1), tmp_path, keep=True)  # an epoch run again after a resume: the kept file is replaced
    assert load_ckpt(kept)["epoch"] == 1 and os.stat(kept).st_ino == os.stat(latest).st_ino
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_0001.pth"]  # no temp file left


def test_latest_only_extras_stay_out_of_kept_checkpoints(tmp_path):
    ckpt.save(state(3, memory=torch.ones(8), best=0.5), tmp_path, keep=True, latest_only=("memory",))
    assert set(load_ckpt(tmp_path / "checkpoint.pth")["extra"]) == {"memory", "best"}
    assert load_ckpt(tmp_path / "checkpoint_0003.pth")["extra"] == {"best": 0.5}


# ---------------------------------------------------------------- files that are not checkpoints


def checkpoint_bytes(tmp_path, legacy=False):
    torch.save(state(1), tmp_path / "whole.pth", _use_new_zipfile_serialization=not legacy)
    return (tmp_path / "whole.pth").read_bytes()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (lambda t: b"", "is empty (0 bytes"),
        (lambda t: checkpoint_bytes(t)[: len(checkpoint_bytes(t)) // 2], "is truncated"),
        (lambda t: checkpoint_bytes(t, legacy=True)[:-20], "is truncated"),
        (lambda t: b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)), "not a checkpoint written by these scripts"),
        (lambda t: b'{"epoch": 1, "train/loss": 5.2}\n', "not a checkpoint written by these scripts"),
        (lambda t: None, "is a folder"),
    ],
    ids=["empty", "truncated", "truncated-legacy", "jpeg", "text", "folder"],
)
def test_unreadable_checkpoints_are_one_clear_line(tmp_path, content, fragment):
    path = tmp_path / "checkpoint.pth"
    data = content(tmp_path)
    path.mkdir() if data is None else path.write_bytes(data)
    with pytest.raises(UserError, match=re.escape(fragment)) as err:
        ckpt.load(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_python_objects_are_refused_by_name(tmp_path):
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match=r"holds a Python object \(argparse.Namespace\)"):
        ckpt.load(str(tmp_path / "pickled.pth"))


# ---------------------------------------------------------------- a full disk


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def full_disk():
    """Point a path at /dev/full, on which every write fails with ENOSPC, as on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    return lambda path: os.symlink("/dev/full", path)


def test_disk_full_keeps_the_last_checkpoint_and_says_so(tmp_path, full_disk):
    ckpt.save(state(1), tmp_path, keep=False)
    before = digest(tmp_path / "checkpoint.pth")
    full_disk(tmp_path / "checkpoint.pth.tmp")
    with pytest.raises(UserError) as err:
        ckpt.save(state(2), tmp_path, keep=True)
    message = str(err.value)
    assert message.startswith(f"cannot write {tmp_path / 'checkpoint.pth'}: no space left on device"), message
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pth'} (epoch 1)" in message
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and digest(tmp_path / "checkpoint.pth") == before
    fresh = tmp_path / "fresh"  # no checkpoint yet: nothing to fall back on, and the message says so
    fresh.mkdir()
    full_disk(fresh / "checkpoint.pth.tmp")
    with pytest.raises(UserError, match="no checkpoint was written before"):
        ckpt.save(state(1), fresh, keep=False)
    assert os.listdir(fresh) == []


def test_disk_full_on_a_kept_checkpoint(tmp_path, full_disk, monkeypatch):
    ckpt.save(state(1), tmp_path, keep=False)
    full_disk(tmp_path / "checkpoint_0002.pth.tmp")  # the kept copy without the memory bank is a second file
    with pytest.raises(UserError) as err:
        ckpt.save(state(2, memory=torch.ones(4)), tmp_path, keep=True, latest_only=("memory",))
    assert f"cannot write {tmp_path / 'checkpoint_0002.pth'}: no space left on device" in str(err.value)
    assert f"{tmp_path / 'checkpoint.pth'} (epoch 2)" in str(err.value)  # the latest was written before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]

    def no_links(src, dst):
        raise OSError(errno.EPERM, "links not permitted")

    def fill_up(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", no_links)  # where links are refused, the kept checkpoint is a copy
    monkeypatch.setattr(shutil, "copyfileobj", fill_up)
    with pytest.raises(UserError, match=r"checkpoint_0003.pth: no space left on device .*\(epoch 3\)"):
        ckpt.save(state(3), tmp_path, keep=True)
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and load_ckpt(tmp_path / "checkpoint.pth")["epoch"] == 3


def test_a_failed_write_without_errno_is_judged_by_the_free_space(tmp_path, monkeypatch):
    def torch_save_to_a_path(obj, f):  # what torch.save(obj, "path") raises when the disk is full
        f.write(b"PK\x03\x04 half an archive")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_save_to_a_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**40, 2**40, 4096))
    with pytest.raises(UserError, match=r"checkpoint.pth: no space left on device \(0 MiB free"):
        ckpt.save(state(1), tmp_path, keep=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- resuming with other flags


@pytest.fixture(scope="module")
def moco_state():
    from moco_v2 import MoCo

    return MoCo("resnet18", 16, 64).state_dict()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (dict(arch="resnet50"), "[64, 64, 3, 3] in the checkpoint, [64, 64, 1, 1] with these flags; check -a/--arch"),
        (dict(mlp=False), "has no encoder_q.fc.weight; check the flags that build encoder_q.fc (the checkpoint's"),
        (dict(K=128), "queue is [16, 64] in the checkpoint, [16, 128] with these flags; check the flags that build"),
    ],
    ids=["arch", "mlp", "moco-k"],
)
def test_resume_with_other_moco_flags_names_the_tensor_and_what_to_check(moco_state, flags, fragment):
    from moco_v2 import MoCo

    args = {"arch": "resnet18", "moco_dim": 16, "moco_k": 64, "mlp": True}
    model = MoCo(**{"arch": "resnet18", "dim": 16, "K": 64, **flags})
    with pytest.raises(UserError) as err:
        ckpt.load_state(model, moco_state, "moco.pth", args)
    assert str(err.value).startswith("moco.pth does not fit these flags: ") and fragment in str(err.value)
    if "arch" in flags:  # the trunk: the checkpoint's architecture is named
        assert str(err.value).endswith("check -a/--arch (the checkpoint's run: -a resnet18)")


def test_resume_with_other_deepcluster_flags_names_the_tensor_and_what_to_check():
    from deepcluster_v2 import DeepClusterV2

    saved = DeepClusterV2("resnet18", 16, 64, (16, 16, 16)).state_dict()
    args = {"arch": "resnet18", "feat_dim": 16, "hidden_mlp": 64, "nmb_prototypes": [16, 16, 16]}
    cases = [
        (DeepClusterV2("resnet18", 16, 64, (16, 16)), "holds prototypes.2.weight, which these flags do not build"),
        (DeepClusterV2("resnet18", 16, 64, (16, 16, 20)), "prototypes.2.weight is [16, 16] in the checkpoint"),
        (DeepClusterV2("resnet18", 16, 0, (16, 16, 16)), "has no projection_head.weight; check the flags that build"),
    ]
    for model, fragment in cases:
        with pytest.raises(UserError, match=re.escape(fragment)):
            ckpt.load_state(model, saved, "dc.pth", args)


def test_load_state_and_optimizer_restore_a_fitting_checkpoint_and_reject_others():
    saved, model = torchvision.models.resnet18(num_classes=4), torchvision.models.resnet18(num_classes=4)
    ckpt.load_state(model, saved.state_dict(), "lin.pth")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match=re.escape("fc.weight is [4, 512] in the checkpoint, [5, 512] with these")):
        ckpt.load_state(torchvision.models.resnet18(num_classes=5), saved.state_dict(), "lin.pth")

    params = list(model.parameters())
    model.fc.weight.grad, model.fc.bias.grad = torch.ones_like(model.fc.weight), torch.ones_like(model.fc.bias)
    optimizer = torch.optim.SGD(model.fc.parameters(), 0.1, momentum=0.9)
    optimizer.step()  # a momentum buffer for each of the two tensors
    resumed = torch.optim.SGD(model.fc.parameters(), 0.1, momentum=0.9)
    ckpt.load_optimizer(resumed, optimizer.state_dict(), "lin.pth")
    assert torch.equal(resumed.state[model.fc.bias]["momentum_buffer"], torch.ones(4))
    with pytest.raises(UserError, match=r"its optimizer has parameter groups of \[2\] tensors, this run's \[62\]"):
        ckpt.load_optimizer(torch.optim.SGD(params, 0.1), optimizer.state_dict(), "lin.pth")


def test_check_kind_wants_the_whole_schema():
    whole = {k: {} for k in ckpt.KEYS} | {"format": ckpt.FORMAT, "method": "lincls"}
    ckpt.check_kind(whole, "lin.pth", "lincls")
    with pytest.raises(UserError, match="is not a moco_v2 checkpoint of this project"):
        ckpt.check_kind(whole, "lin.pth", "moco_v2")
    with pytest.raises(UserError, match="without its optimizer, rng entries"):
        ckpt.check_kind({k: v for k, v in whole.items() if k not in ("optimizer", "rng")}, "lin.pth", "lincls")
    with pytest.raises(UserError, match=r"\(found: a lincls checkpoint\)"):
        ckpt.check_kind(whole, "lin.pth", "moco_v2")
    public = {"state_dict": {}, "epoch": 200, "arch": "resnet50", "optimizer": {}}  # the MoCo repository's layout
    with pytest.raises(UserError, match=r"found: no checkpoint of this project; its keys: arch, epoch, optimizer"):
        ckpt.check_kind(public, "moco_v2_200ep_pretrain.pth.tar", "moco_v2")


def test_a_full_disk_while_logging_is_one_line(tmp_path):
    from common.meters import log_epoch

    os.symlink("/dev/full", tmp_path / "log.jsonl")  # appending fails as on a full disk
    with pytest.raises(UserError, match=r"cannot append to .*log.jsonl: .*No space left on device; the checkpoint"):
        log_epoch(str(tmp_path), {"epoch": 1, "train/loss": 1.0})
