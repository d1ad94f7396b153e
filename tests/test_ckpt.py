"""common.ckpt: the latest checkpoint and the kept ones."""

import os

import torch
from conftest import load_ckpt

from common import ckpt


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
