"""A copied script is a method: moco_v2.py and deepcluster_v2.py copied under new names with a new METHOD train,
resume, and give their checkpoints to lincls.py, finetune.py and common.export as the originals do; resume still
refuses another method's checkpoint and the evaluation scripts an evaluation's."""

import argparse
import os
import pickle
import sys

import pytest
import torch
from conftest import PRETRAINED, ROOT, TINY, load_checked, load_ckpt, main_error, read_log, run_main

from common import export
from common.cli import UserError

COPIES = {"moco_v2.py": "my_moco", "deepcluster_v2.py": "my_dcluster"}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The copies, as a user makes them (`cp moco_v2.py my_moco.py`, then a new METHOD), in a folder on sys.path;
    they import `common` from the repository like the originals."""
    folder = tmp_path_factory.mktemp("copies")
    for base, name in COPIES.items():
        source = open(os.path.join(ROOT, base)).read()
        line = f'METHOD = "{base.removesuffix(".py")}"\n'
        assert source.count(line) == 1
        (folder / f"{name}.py").write_text(source.replace(line, f'METHOD = "{name}"\n'))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in COPIES.values():
        sys.modules.pop(name, None)


def exported(checkpoint, out, fmt="torchvision"):
    return export.main(argparse.Namespace(checkpoint=str(checkpoint), out=str(out), format=fmt, arch=None))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", COPIES)
def test_a_copied_script_is_a_method(copies, tiny_data, tmp_path, base):
    name, out = COPIES[base], tmp_path / "run"
    run = [tiny_data, *PRETRAINED[base], "--knn-every", 0, "--output-dir", out]

    # train one epoch, then resume to two: the checkpoints carry the copy's METHOD and count the epochs
    run_main(f"{name}.py", *run, "--epochs", 1)
    first = load_checked(out / "checkpoint.pth", name, 1)
    run_main(f"{name}.py", *run, "--epochs", 2, "--resume")
    state = load_checked(out / "checkpoint.pth", name, 2)
    assert [r["epoch"] for r in read_log(out)] == [1, 2]
    assert not same(state["backbone"], first["backbone"])  # the resumed epoch trained the trunk
    assert same(load_ckpt(out / "checkpoint_0001.pth")["backbone"], first["backbone"])

    # resume refuses another method's checkpoint, both ways
    original = base.removesuffix(".py")
    message = main_error(original, *run[:-1], tmp_path / "x", "--epochs", 3, "--resume", out / "checkpoint.pth")
    assert f"is not a {original} checkpoint of this project (found: a {name} checkpoint)" in message
    torch.save({**state, "method": original}, tmp_path / "other.pth")
    message = main_error(name, *run[:-1], tmp_path / "y", "--epochs", 3, "--resume", tmp_path / "other.pth")
    assert f"is not a {name} checkpoint of this project (found: a {original} checkpoint)" in message

    # the linear probe: the copy's trunk, frozen (BatchNorm statistics included)
    lin = tmp_path / "lin"
    run_main("lincls.py", tiny_data, *TINY, "--epochs", 1, "--pretrained", out / "checkpoint.pth", "--output-dir", lin)
    probe = load_ckpt(lin / "checkpoint.pth")
    assert (probe["method"], probe["epoch"], read_log(lin)[-1]["epoch"]) == ("lincls", 1, 1)
    assert same(probe["backbone"], state["backbone"])

    # fine-tuning starts from the copy's trunk: with the trunk's lr at 0 its parameters stay the copy's (the
    # BatchNorm statistics, in train mode, move) while the classifier learns
    ft = tmp_path / "ft"
    args = ["-b", 4, "--epochs", 1, "--lr", 0, "--pretrained", out / "checkpoint.pth", "--output-dir", ft]
    run_main("finetune.py", tiny_data, *TINY, *args)
    tuned = load_ckpt(ft / "checkpoint.pth")
    assert (tuned["method"], tuned["epoch"], read_log(ft)[-1]["epoch"]) == ("finetune", 1, 1)
    params = [k for k in state["backbone"] if k.endswith(("weight", "bias"))]
    assert all(torch.equal(tuned["backbone"][k], state["backbone"][k]) for k in params)
    assert not torch.equal(tuned["backbone"]["bn1.running_mean"], state["backbone"]["bn1.running_mean"])

    # export: the trunk written is the checkpoint's backbone, in both formats
    trunk = torch.load(exported(out / "checkpoint.pth", tmp_path / "trunk.pth"), weights_only=True)
    assert same(trunk, state["backbone"])
    with open(exported(out / "checkpoint.pth", tmp_path / "trunk.pkl", "detectron2"), "rb") as f:
        d2 = pickle.load(f)
    assert f"{name} epoch 2" in d2["__author__"]
    assert torch.equal(torch.from_numpy(d2["model"]["stem.conv1.weight"]), state["backbone"]["conv1.weight"])

    # an evaluation's checkpoint is still no pretraining checkpoint, whatever script wrote the trunk
    for evaluation in (lin, ft):
        method = "lincls" if evaluation == lin else "finetune"
        with pytest.raises(UserError, match=f"is a {method} checkpoint, not a pretraining one"):
            exported(evaluation / "checkpoint.pth", tmp_path / f"{method}.pth")
    message = main_error("finetune", tiny_data, *TINY, *args[:-3], lin / "checkpoint.pth", "--output-dir", ft / "x")
    assert "is a lincls checkpoint, not a pretraining one" in message
