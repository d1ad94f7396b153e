"""lincls.py: loading the public MoCo and SwAV-repository formats strictly (common.ckpt.load_trunk), recipes."""

import pytest
import torch
import torchvision
from conftest import TINY, load_ckpt, read_log, run_main

from common.ckpt import load_trunk
from common.cli import UserError


def trunk_state(seed=0):
    torch.manual_seed(seed)
    return {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}


def test_public_moco_format(tmp_path):
    trunk = trunk_state()
    sd = {f"module.encoder_q.{k}": v for k, v in trunk.items()}
    sd.update({f"module.encoder_k.{k}": v + 1 for k, v in trunk.items()})
    sd.update(
        {
            "module.queue": torch.randn(128, 16),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
            "module.encoder_q.fc.0.weight": torch.randn(512, 512),
            "module.encoder_q.fc.2.weight": torch.randn(8, 512),
        }
    )
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, tmp_path / "moco.pth.tar")
    loaded = load_trunk(str(tmp_path / "moco.pth.tar"), "resnet18")
    assert loaded.keys() == trunk.keys() and all(torch.equal(loaded[k], trunk[k]) for k in trunk)


@pytest.mark.parametrize("wrapped", [True, False])
def test_public_swav_format(tmp_path, wrapped):
    trunk = trunk_state()
    sd = {f"module.{k}": v for k, v in trunk.items()}
    sd.update(
        {
            "module.projection_head.0.weight": torch.randn(16, 512),
            "module.prototypes.prototypes0.weight": torch.randn(30, 16),
        }
    )
    torch.save({"epoch": 800, "state_dict": sd} if wrapped else sd, tmp_path / "swav.pth")
    loaded = load_trunk(str(tmp_path / "swav.pth"), "resnet18")
    assert all(torch.equal(loaded[k], trunk[k]) for k in trunk)


def test_extra_or_missing_keys_are_errors(tmp_path):
    trunk = trunk_state()
    extra = {f"module.{k}": v for k, v in trunk.items()} | {"module.something_else.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected"):
        load_trunk(str(tmp_path / "extra.pth"), "resnet18")
    missing = {f"module.{k}": v for k, v in trunk.items() if k != "layer4.1.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing"):
        load_trunk(str(tmp_path / "missing.pth"), "resnet18")


def test_swav_recipe_and_public_checkpoint_end_to_end(tiny_data, tmp_path, capsys):
    trunk = trunk_state(1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trunk.items()}}, tmp_path / "swav.pth")
    out = tmp_path / "lin"
    args = ["--epochs", 2, "--recipe", "swav", "--pretrained", tmp_path / "swav.pth", "--output-dir", out]
    run_main("lincls.py", tiny_data, *TINY, *args)
    log = read_log(out)
    assert [r["train/lr"] for r in log] == [0.3, pytest.approx(0.15)]  # cosine over 2 epochs
    assert "note: the lr of this recipe is fixed (lr 0.3 at batch 256); --batch-size is 16" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["args"]["wd"] == 1e-6 and all(torch.equal(state["backbone"][k], trunk[k]) for k in trunk)
    # --evaluate on the result reproduces the last validation accuracy
    stats = run_main("lincls.py", tiny_data, *TINY, "--resume", out / "checkpoint.pth", "--output-dir", out, "-e")
    assert f"val/acc1 {log[-1]['val/acc1']:.3f}" in capsys.readouterr().out
    assert stats["val/acc1"] == pytest.approx(log[-1]["val/acc1"])


def test_moco_v2_checkpoint_end_to_end(tiny_data, pretrained, tmp_path):
    """One process on the shared MoCo v2 run's checkpoint: the trunk stays frozen, BatchNorm statistics included."""
    out, moco = tmp_path / "lin", pretrained("moco_v2.py") / "checkpoint.pth"
    run_main("lincls.py", tiny_data, *TINY, "--epochs", 1, "--pretrained", moco, "--output-dir", out)
    rec = read_log(out)[-1]
    assert 0 <= rec["val/acc1"] <= rec["val/acc5"] <= 100
    trunk, before = load_ckpt(out / "checkpoint.pth")["backbone"], load_ckpt(moco)["backbone"]
    assert all(torch.equal(trunk[k], v) for k, v in before.items())
