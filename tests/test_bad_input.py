"""Bad input: one clear line on stderr, exit code 2, and nothing already written is lost or overwritten.

The one-line mechanism (common.cli.run: `error: ...`, exit 2, no traceback) is checked on real script runs for the
failures that happen in the middle of a run (an unreadable image, in this process and in a loader worker; a loss
that is not finite) and at the start (a fresh run over an existing one); the other messages are checked on main()
in this process, which raises the same UserError (conftest.main_error)."""

import hashlib
import os
import shutil

import pytest
from conftest import MOCO_TINY, TINY, assert_clean_error, main_error, run_main, run_script

MOCO = MOCO_TINY


def digest(folder):
    return {
        f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))
    }


@pytest.fixture
def run_dir(pretrained, tmp_path):
    """A copy of the shared MoCo v2 run after its 2 epochs (checkpoint.pth and log.jsonl), which each bad-input case
    tries to continue with --resume."""
    out = tmp_path / "run"
    os.makedirs(out)
    for f in ("checkpoint.pth", "log.jsonl"):
        shutil.copy(pretrained("moco_v2.py") / f, out / f)
    return out


def data_copy(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def test_missing_data_folder(run_dir, tmp_path):
    before = digest(run_dir)
    message = main_error("moco_v2", tmp_path / "nowhere", *MOCO, "--epochs", 3, "--output-dir", run_dir, "--resume")
    assert "does not exist" in message
    assert digest(run_dir) == before


def test_empty_class_folder(tiny_data, run_dir, tmp_path):
    root = data_copy(tiny_data, tmp_path)
    os.makedirs(root / "train" / "zzz_empty")
    before = digest(run_dir)
    assert "zzz_empty holds no images" in main_error("moco_v2", root, *MOCO, "--output-dir", run_dir, "--resume")
    assert digest(run_dir) == before


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image(tiny_data, run_dir, tmp_path, workers):
    root = data_copy(tiny_data, tmp_path)
    for cls in os.listdir(root / "train"):
        (root / "train" / cls / "broken.JPEG").write_bytes(b"this is not a JPEG file")
    before = digest(run_dir)
    args = [root, *MOCO, "-j", workers, "--views", "pil", "--epochs", 3, "--output-dir", run_dir, "--resume"]
    assert_clean_error(run_script("moco_v2.py", *args, check=False), "broken.JPEG")
    assert digest(run_dir) == before


def test_fresh_run_refuses_to_overwrite(tiny_data, run_dir):
    before = digest(run_dir)
    proc = run_script("moco_v2.py", tiny_data, *MOCO, "--epochs", 1, "--output-dir", run_dir, check=False)
    assert_clean_error(proc, "already holds a run")
    assert digest(run_dir) == before


def test_resume_from_missing_file(tiny_data, run_dir):
    message = main_error("moco_v2", tiny_data, *MOCO, "--output-dir", run_dir, "--resume", run_dir / "nope.pth")
    assert "no such file" in message


def test_resume_from_an_empty_checkpoint(tiny_data, run_dir):
    (run_dir / "checkpoint_0001.pth").write_bytes(b"")  # what an interrupted copy or a full disk leaves
    before = digest(run_dir)
    args = [tiny_data, *MOCO, "--epochs", 3, "--output-dir", run_dir, "--resume", run_dir / "checkpoint_0001.pth"]
    assert "checkpoint_0001.pth: the file is empty (0 bytes" in main_error("moco_v2", *args)
    assert digest(run_dir) == before


def test_resume_with_other_flags_names_the_tensor_and_the_flag(tiny_data, run_dir):
    before = digest(run_dir)
    args = [tiny_data, *MOCO, "--moco-dim", 64, "--epochs", 3, "--output-dir", run_dir, "--resume"]
    message = main_error("moco_v2", *args)
    assert "in the checkpoint, [64, 64] with these flags; check the flags that build" in message
    assert digest(run_dir) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, run_dir):
    before = digest(run_dir)
    args = [tiny_data, *MOCO, "--epochs", 3, "--lr", "1e30", "--output-dir", run_dir, "--resume"]
    proc = run_script("moco_v2.py", *args, check=False)  # the first step sends the weights to inf
    assert_clean_error(proc, "the loss is not finite in epoch 2")
    assert digest(run_dir) == before


def test_lincls_rejects_wrong_checkpoints(tiny_data, pretrained, tmp_path):
    moco = pretrained("moco_v2.py") / "checkpoint.pth"
    lin = tmp_path / "lin"
    run_main("lincls.py", tiny_data, *TINY, "--epochs", 1, "--pretrained", moco, "--output-dir", lin)
    (tmp_path / "empty.pth").write_bytes(b"")
    cases = [
        (["--pretrained", lin / "checkpoint.pth"], "is a lincls checkpoint, not a pretraining one"),
        (["--pretrained", tmp_path / "empty.pth"], "empty.pth: the file is empty (0 bytes"),  # others: test_ckpt.py
        (["--pretrained", tmp_path / "missing.pth"], "no such file"),
        (["-a", "resnet34", "--pretrained", moco], "does not hold a resnet34 trunk"),  # another architecture
        (["--resume", moco], "is not a lincls checkpoint"),  # a pretraining checkpoint given to --resume
    ]
    for n, (flags, fragment) in enumerate(cases):
        assert fragment in main_error("lincls", tiny_data, *TINY, *flags, "--output-dir", tmp_path / f"x{n}")
    # its own checkpoint, resumed on data with another number of classes: one line, and the run left as it was
    root = data_copy(tiny_data, tmp_path)
    shutil.copytree(root / "train" / os.listdir(root / "train")[0], root / "train" / "zzz_extra")
    shutil.copytree(root / "val" / os.listdir(root / "val")[0], root / "val" / "zzz_extra")
    before = digest(lin)
    message = main_error("lincls", root, *TINY, "--epochs", 2, "--resume", lin / "checkpoint.pth", "--output-dir", lin)
    assert "fc.weight is [4, 512] in the checkpoint, [5, 512] with these flags; check DATA" in message
    assert digest(lin) == before
