"""The bf16 path on the CPU (--amp on: bf16 autocast and channels_last, what --amp auto turns on for CUDA): every
pretraining script and both evaluation scripts, two steps, in one process with both view pipelines and in two
processes (tests/dist_checks.py): finite losses; parameters, buffers and optimizer state in fp32 (among them the MoCo
queue, the DeepCluster prototypes and memory bank, the input of its k-means); the checkpoint resumes with --amp off
and its trunk exports.

The DeepCluster small crops are 24 px here, not 16 as elsewhere in the suite: in torch 2.14's CPU kernels a
ResNet-18 under bf16 autocast on 16-px inputs (layer3 down to 1 x 1) gives run-to-run different gradients and, now
and then, NaN, where fp32 and 20 px or more are deterministic (seen with a plain torchvision resnet18, not our code).
"""

import argparse
import os

import pytest
import torch
import torchvision
from conftest import DC_TINY, MOCO_TINY, TINY, load_ckpt, read_log, run_main

from common import export

# Two steps of 16 images on the 32 training images of `amp_data`.
AMP_DC = [*DC_TINY, "--size-crops", "32", "24"]
AMP_RUNS = {
    "moco_v2": MOCO_TINY,
    "mochi": [*MOCO_TINY, "--mochi-n", "16", "--mochi-s", "8", "--mochi-s-prime", "4", "--mix-start-epoch", "0"],
    "hexa_moco": MOCO_TINY,
    "deepcluster_v2": [*AMP_DC, "--nmb-prototypes", "8", "8", "8"],
    "hexa_dcluster": [*AMP_DC, "--nmb-prototypes", "8", "8", "8", "--adv-weight", "1"],  # the attack under bf16
}


@pytest.fixture(scope="module")
def amp_data(tmp_path_factory):
    """4 classes x 8 train x 4 val images: two steps of a global batch of 16."""
    from common.synthetic import make_image_folder

    return make_image_folder(str(tmp_path_factory.mktemp("amp_data")), 4, 8, 4, 40, seed=3)


def assert_fp32_state(state: dict):
    """Every floating tensor of the method state and of the optimizer state is fp32; the DeepCluster memory bank
    too. Returns the names of the method-state tensors checked."""
    floats = {k: v for k, v in state["model"].items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 for v in floats.values()), {k: v.dtype for k, v in floats.items()}
    assert all(torch.isfinite(v).all() for v in floats.values())
    for s in state["optimizer"]["state"].values():
        for v in s.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == torch.float32 and torch.isfinite(v).all()
    memory = state["extra"].get("memory")
    if memory:
        assert memory["embeddings"].dtype == torch.float32  # the k-means input
        torch.testing.assert_close(memory["embeddings"].norm(dim=2), torch.ones(memory["embeddings"].shape[:2]))
    return floats


def check_amp_run(out, script):
    log = read_log(out)
    assert all(torch.isfinite(torch.tensor(v)) for r in log for k, v in r.items() if k.endswith("loss"))
    state = load_ckpt(out / "checkpoint.pth")
    assert state["args"]["amp"] is True  # --amp on, resolved
    floats = assert_fp32_state(state)
    if script in ("moco_v2", "mochi", "hexa_moco"):
        assert "queue" in floats
    else:
        assert {"prototypes.0.weight", "prototypes.2.weight"} <= floats.keys()
    return state


@pytest.mark.parametrize("views", ["pil", "device"])
@pytest.mark.parametrize("script", sorted(AMP_RUNS))
def test_bf16_two_steps_resume_without_amp_and_export(amp_data, tmp_path, script, views):
    out = tmp_path / script
    run_main(f"{script}.py", amp_data, *AMP_RUNS[script], "--amp", "on", "--views", views, "--epochs", 1,
             "--knn-every", 1, "--output-dir", out)  # fmt: skip
    assert read_log(out)[-1]["knn/acc1"] >= 0  # the monitor under bf16 too
    check_amp_run(out, script)
    if views == "device":
        return  # the resume and the export once per script
    run_main(f"{script}.py", amp_data, *AMP_RUNS[script], "--amp", "off", "--views", views, "--epochs", 2,
             "--knn-every", 0, "--resume", "--output-dir", out)  # fmt: skip
    state = load_ckpt(out / "checkpoint.pth")
    assert state["epoch"] == 2 and state["args"]["amp"] is False
    assert_fp32_state(state)
    trunk = torch.load(export.main(argparse.Namespace(checkpoint=str(out / "checkpoint.pth"),
                                                      out=str(tmp_path / "trunk.pth"), format="torchvision",
                                                      arch=None)), weights_only=True)  # fmt: skip
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(trunk)
    assert all(torch.equal(trunk[k], state["backbone"][k]) for k in trunk)


@pytest.mark.parametrize("script", ["lincls", "finetune"])
def test_bf16_evaluation(amp_data, tmp_path, script):
    pre = tmp_path / "pre"
    run_main("moco_v2.py", amp_data, *MOCO_TINY, "--epochs", 1, "--knn-every", 0, "--output-dir", pre)
    out = tmp_path / script
    extra = ["--schedule", "1", "--labels-perc", "100"] if script == "finetune" else []
    run_main(f"{script}.py", amp_data, *TINY, "--amp", "on", "--epochs", 1, *extra, "--pretrained",
             pre / "checkpoint.pth", "--output-dir", out)  # fmt: skip
    log = read_log(out)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in log) and 0 <= log[-1]["val/acc1"] <= 100
    state = load_ckpt(out / "checkpoint.pth")
    assert state["args"]["amp"] is True
    assert_fp32_state(state)


def test_two_processes_bf16(two_processes):
    """The same under torchrun x2, the device views (tests/dist_checks.py): the pretraining runs and lincls."""
    for script in AMP_RUNS:
        check_amp_run(two_processes[f"amp_{script}"], script)
    log = read_log(two_processes["amp_lincls"])
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in log)
    assert os.path.exists(two_processes["amp_lincls"] / "checkpoint.pth")
