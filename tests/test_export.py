"""common.export: the trunk as a torchvision state_dict and as a detectron2 .pkl, from our checkpoints and the public
formats; wrong input is a clear error."""

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, assert_clean_error

from common import ckpt, export
from common.cli import UserError


def trunk_state(arch, seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch)
    for buf in model.buffers():  # BatchNorm statistics that differ from their initial values
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def ours(path, trunk, method="moco_v2", arch="resnet18", classifier=False):
    """A checkpoint of our schema, small: the export reads `backbone`; `model` is the trunk under a prefix, or with
    `classifier` the trunk and a linear classifier, as lincls.py and finetune.py write it."""
    state = {k: {} for k in ckpt.KEYS} | {"format": ckpt.FORMAT, "method": method, "arch": arch, "epoch": 7}
    fc = {"fc.weight": torch.zeros(4, 512), "fc.bias": torch.zeros(4)}
    model = trunk | fc if classifier else {f"encoder_q.{k}": v for k, v in trunk.items()}
    torch.save({**state, "backbone": trunk, "model": model}, path)
    return str(path)


def public_swav(path, trunk):
    torch.save({"state_dict": {f"module.{k}": v for k, v in trunk.items()}}, path)
    return str(path)


def exported(checkpoint, out, fmt="torchvision", arch=None):
    return export.main(argparse.Namespace(checkpoint=str(checkpoint), out=str(out), format=fmt, arch=arch))


# ---------------------------------------------------------------- torchvision


def test_torchvision_round_trip(tmp_path):
    trunk = trunk_state("resnet18")
    out = exported(ours(tmp_path / "ckpt.pth", trunk), tmp_path / "trunk.pth")
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    state = model.state_dict()
    assert state.keys() == trunk.keys() and all(torch.equal(state[k], trunk[k]) for k in trunk)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth", "trunk.pth"]  # no temporary file left


def test_torchvision_from_the_public_moco_format(tmp_path):
    trunk = trunk_state("resnet18", seed=1)
    sd = {f"module.encoder_q.{k}": v for k, v in trunk.items()} | {"module.encoder_q.fc.0.weight": torch.ones(2)}
    sd |= {f"module.encoder_k.{k}": v + 1 for k, v in trunk.items()} | {"module.queue": torch.zeros(8, 16)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, tmp_path / "moco.pth.tar")
    out = exported(tmp_path / "moco.pth.tar", tmp_path / "trunk.pth", arch="resnet18")
    loaded = torch.load(out, weights_only=True)
    assert loaded.keys() == trunk.keys() and all(torch.equal(loaded[k], trunk[k]) for k in trunk)


# ---------------------------------------------------------------- detectron2


def detectron2_resnet50_shapes() -> dict:
    """detectron2's names and shapes for a ResNet-50 trunk, from the architecture: a 7x7 stem conv to 64 channels,
    then res2..res5 of 3, 4, 6, 3 bottleneck blocks (1x1, 3x3, 1x1 convs of width 64, 128, 256, 512 and 4x that
    out), a projection shortcut in the first block of each stage; a norm (4 tensors) after every conv."""
    shapes = {}

    def conv(name, out_ch, in_ch, k):
        shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)
        shapes.update({f"{name}.norm.{t}": (out_ch,) for t in ("weight", "bias", "running_mean", "running_var")})

    conv("stem.conv1", 64, 3, 7)
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=2):
        for b in range(blocks):
            prefix = f"res{stage}.{b}"
            conv(f"{prefix}.conv1", width, in_ch, 1)
            conv(f"{prefix}.conv2", width, width, 3)
            conv(f"{prefix}.conv3", 4 * width, width, 1)
            if b == 0:
                conv(f"{prefix}.shortcut", 4 * width, in_ch, 1)
            in_ch = 4 * width
    return shapes


def test_detectron2_names_and_shapes_of_a_resnet50(tmp_path):
    trunk = trunk_state("resnet50")
    out = exported(public_swav(tmp_path / "swav.pth", trunk), tmp_path / "r50.pkl", "detectron2")  # -a resnet50
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert set(obj) == {"model", "__author__", "matching_heuristics"} and obj["matching_heuristics"] is True
    model = obj["model"]
    assert all(isinstance(v, np.ndarray) for v in model.values())
    assert {k: v.shape for k, v in model.items()} == detectron2_resnet50_shapes()
    pairs = [("conv1.weight", "stem.conv1.weight"), ("bn1.running_var", "stem.conv1.norm.running_var"),
             ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
             ("layer3.5.bn2.bias", "res4.5.conv2.norm.bias"),
             ("layer4.0.downsample.1.running_mean", "res5.0.shortcut.norm.running_mean")]  # fmt: skip
    for tv, d2 in pairs:
        assert np.array_equal(model[d2], trunk[tv].numpy()), (tv, d2)


def test_detectron2_basic_blocks_and_our_format(tmp_path):
    trunk = trunk_state("resnet18")
    out = exported(ours(tmp_path / "ckpt.pth", trunk, method="deepcluster_v2"), tmp_path / "r18.pkl", "detectron2")
    with open(out, "rb") as f:
        obj = pickle.load(f)
    names = set(obj["model"])
    assert "res2.1.conv2.norm.weight" in names and "res3.0.shortcut.norm.weight" in names
    assert "res2.0.shortcut.weight" not in names  # layer1 of a ResNet-18 keeps 64 channels: no projection
    assert len(names) == len([k for k in trunk if not k.endswith("num_batches_tracked")])
    assert "deepcluster_v2 epoch 7" in obj["__author__"]


# ---------------------------------------------------------------- wrong input


def test_wrong_input_is_a_clear_error(tmp_path):
    trunk = trunk_state("resnet18")
    (tmp_path / "photo.pth").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64))
    (tmp_path / "taken.pth").write_bytes(b"already here")
    cases = [
        (ours(tmp_path / "ft.pth", trunk, "finetune", classifier=True), "out.pth", "is a finetune checkpoint, not a"),
        (tmp_path / "photo.pth", "out.pth", "not a checkpoint written by these scripts"),
        (tmp_path / "missing.pth", "out.pth", "no such file"),
        (ours(tmp_path / "ckpt.pth", trunk), "taken.pth", "taken.pth already exists"),
    ]
    for checkpoint, out, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            exported(checkpoint, tmp_path / out)
    with pytest.raises(UserError, match=r"detectron2 reads this layout only from a file named \*.pkl"):
        exported(tmp_path / "ckpt.pth", tmp_path / "r18.pth", "detectron2")
    with pytest.raises(UserError, match="holds a resnet18 trunk, not -a resnet50"):  # ours name their arch
        exported(tmp_path / "ckpt.pth", tmp_path / "out.pth", arch="resnet50")
    with pytest.raises(UserError, match="does not hold a resnet50 trunk"):  # the public ones do not: -a, checked
        exported(public_swav(tmp_path / "swav.pth", trunk), tmp_path / "out.pth")
    assert (tmp_path / "taken.pth").read_bytes() == b"already here"
    assert not any(name.startswith("out") or name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_command_line(tmp_path):
    (tmp_path / "taken.pkl").write_bytes(b"already here")
    args = [tmp_path / "ckpt.pth", tmp_path / "taken.pkl", "--format", "detectron2"]
    proc = subprocess.run([sys.executable, "-m", "common.export", *args], cwd=ROOT, capture_output=True, text=True)
    assert_clean_error(proc, f"{tmp_path / 'taken.pkl'} already exists; remove it or choose another OUT")
