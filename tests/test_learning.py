"""MoCo v2 learns: after a short pretraining on the generated shapes, a linear probe on its trunk beats the same
probe on a randomly initialised trunk by a clear margin (benchmarks/learning.py: the benchmark's 200-epoch cosine
run shows a gap of 35 points; this reduced run, 80 epochs at a constant lr, 11 to 14 in our runs)."""

import os

from benchmarks import learning
from common.synthetic import make_image_folder

EPOCHS = 80  # with a constant lr: about 3 minutes on 2 CPU cores
MARGIN = 5.0  # points of probe accuracy; measured +14.3 (67.7 % against 53.3 %, chance 16.7 %)


def test_moco_v2_beats_random_init(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), seed=0, **learning.DATA)
    random_acc = learning.probe("resnet18", None, root, 32)
    os.environ["OMP_NUM_THREADS"] = "1"  # the loader workers take the other core
    state, _ = learning.pretrain("moco_v2", root, str(tmp_path / "moco"), EPOCHS, extra=["--no-cos"])
    acc = learning.probe("resnet18", state, root, 32)
    assert acc >= random_acc + MARGIN, f"probe {acc:.1f} % on the pretrained trunk, {random_acc:.1f} % on a random one"
