"""Bad input: one clear line on stderr, exit code 2, and nothing already written is lost or overwritten."""

import hashlib
import os
import shutil

import pytest
from conftest import MOCO_TINY, TINY, assert_clean_error, run_script

MOCO = MOCO_TINY


def digest(folder):
    return {
        f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 1-epoch MoCo v2 run: checkpoint.pth and log.jsonl."""
    out = tmp_path_factory.mktemp("finished")
    run_script("moco_v2.py", tiny_data, *MOCO, "--epochs", 1, "--output-dir", out)
    yield out
    shutil.rmtree(out)


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A copy of the finished run, which each bad-input case tries to continue with --resume."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def data_copy(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def test_missing_data_folder(run_dir, tmp_path):
    before = digest(run_dir)
    proc = run_script(
        "moco_v2.py", tmp_path / "nowhere", *MOCO, "--epochs", 2, "--output-dir", run_dir, "--resume", check=False
    )
    assert_clean_error(proc, "does not exist")
    assert digest(run_dir) == before


def test_empty_class_folder(tiny_data, run_dir, tmp_path):
    root = data_copy(tiny_data, tmp_path)
    os.makedirs(root / "train" / "zzz_empty")
    before = digest(run_dir)
    proc = run_script("moco_v2.py", root, *MOCO, "--epochs", 2, "--output-dir", run_dir, "--resume", check=False)
    assert_clean_error(proc, "zzz_empty holds no images")
    assert digest(run_dir) == before


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image(tiny_data, run_dir, tmp_path, workers):
    root = data_copy(tiny_data, tmp_path)
    for cls in os.listdir(root / "train"):
        (root / "train" / cls / "broken.JPEG").write_bytes(b"this is not a JPEG file")
    before = digest(run_dir)
    proc = run_script(
        "moco_v2.py", root, *MOCO, "-j", workers, "--epochs", 2, "--output-dir", run_dir, "--resume", check=False
    )
    assert_clean_error(proc, "broken.JPEG")
    assert digest(run_dir) == before


def test_fresh_run_refuses_to_overwrite(tiny_data, run_dir):
    before = digest(run_dir)
    proc = run_script("moco_v2.py", tiny_data, *MOCO, "--epochs", 1, "--output-dir", run_dir, check=False)
    assert_clean_error(proc, "already holds a run")
    assert digest(run_dir) == before


def test_resume_from_missing_file(tiny_data, run_dir):
    proc = run_script(
        "moco_v2.py", tiny_data, *MOCO, "--output-dir", run_dir, "--resume", run_dir / "nope.pth", check=False
    )
    assert_clean_error(proc, "no such file")


def test_resume_from_an_empty_checkpoint(tiny_data, run_dir):
    (run_dir / "checkpoint_0001.pth").write_bytes(b"")  # what an interrupted copy or a full disk leaves
    before = digest(run_dir)
    args = [tiny_data, *MOCO, "--epochs", 2, "--output-dir", run_dir, "--resume", run_dir / "checkpoint_0001.pth"]
    proc = run_script("moco_v2.py", *args, check=False)
    assert_clean_error(proc, "checkpoint_0001.pth: the file is empty (0 bytes")
    assert digest(run_dir) == before


def test_resume_with_other_flags_names_the_tensor_and_the_flag(tiny_data, run_dir):
    before = digest(run_dir)
    args = [tiny_data, *MOCO, "--moco-dim", 64, "--epochs", 2, "--output-dir", run_dir, "--resume"]
    proc = run_script("moco_v2.py", *args, check=False)
    assert_clean_error(proc, "in the checkpoint, [64, 64] with these flags; check --moco-k / --moco-dim")
    assert digest(run_dir) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, run_dir):
    before = digest(run_dir)
    args = [tiny_data, *MOCO, "--epochs", 2, "--lr", "1e30", "--output-dir", run_dir, "--resume"]
    proc = run_script("moco_v2.py", *args, check=False)  # the first step sends the weights to inf
    assert_clean_error(proc, "the loss is not finite in epoch 1")
    assert digest(run_dir) == before


def test_lincls_rejects_wrong_checkpoints(tiny_data, finished_run, tmp_path):
    lin = tmp_path / "lin"
    run_script(
        "lincls.py",
        tiny_data,
        *TINY,
        "--epochs",
        1,
        "--pretrained",
        finished_run / "checkpoint.pth",
        "--output-dir",
        lin,
    )
    (tmp_path / "empty.pth").write_bytes(b"")
    cases = [
        (lin / "checkpoint.pth", "is a lincls checkpoint, not a pretraining one"),
        (tmp_path / "empty.pth", "empty.pth: the file is empty (0 bytes"),  # (other unreadable files: test_ckpt.py)
        (tmp_path / "missing.pth", "no such file"),
    ]
    for path, fragment in cases:
        proc = run_script(
            "lincls.py", tiny_data, *TINY, "--pretrained", path, "--output-dir", tmp_path / "x", check=False
        )
        assert_clean_error(proc, fragment)
    # a trunk of another architecture
    proc = run_script(
        "lincls.py",
        tiny_data,
        *TINY,
        "-a",
        "resnet34",
        "--pretrained",
        finished_run / "checkpoint.pth",
        "--output-dir",
        tmp_path / "y",
        check=False,
    )
    assert_clean_error(proc, "does not hold a resnet34 trunk")
    # a pretraining checkpoint given to --resume
    proc = run_script(
        "lincls.py",
        tiny_data,
        *TINY,
        "--resume",
        finished_run / "checkpoint.pth",
        "--output-dir",
        tmp_path / "z",
        check=False,
    )
    assert_clean_error(proc, "is not a lincls checkpoint")
    # its own checkpoint, resumed on data with another number of classes: one line, and the run left as it was
    root = data_copy(tiny_data, tmp_path)
    shutil.copytree(root / "train" / os.listdir(root / "train")[0], root / "train" / "zzz_extra")
    shutil.copytree(root / "val" / os.listdir(root / "val")[0], root / "val" / "zzz_extra")
    before = digest(lin)
    proc = run_script(
        "lincls.py", root, *TINY, "--epochs", 2, "--resume", lin / "checkpoint.pth", "--output-dir", lin, check=False
    )
    assert_clean_error(proc, "fc.weight is [4, 512] in the checkpoint, [5, 512] with these flags; check DATA")
    assert digest(lin) == before
