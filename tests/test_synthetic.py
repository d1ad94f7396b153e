"""The generated datasets (common/synthetic.py, benchmarks/datasets.py) and the learning benchmark's probe
(benchmarks/learning.py)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import learning
from benchmarks.datasets import TEXTONS, _glyph_mask, glyph_alphabet, make_image_folder
from common.data import ImageFolder
from common.views import eval_val_view


def test_glyph_alphabet_is_seeded_and_distinct_under_flips():
    a, b = glyph_alphabet(8, seed=0), glyph_alphabet(8, seed=1)
    assert a == glyph_alphabet(8, seed=0) and a != b
    masks = [_glyph_mask(g) for g in a]
    for i, m in enumerate(masks):
        for o in masks[:i]:
            for other in (o, o[:, ::-1]):
                assert (m & other).sum() / (m | other).sum() <= 0.5


def test_glyph_folder(tmp_path):
    root = make_image_folder(str(tmp_path), classes=3, train_per_class=2, val_per_class=1, size=40, kind="glyphs")
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["glyph00", "glyph01", "glyph02"]
    img = Image.open(os.path.join(root, "val", "glyph01", "glyph01_0.JPEG"))
    assert img.size == (40, 40) and img.mode == "RGB"
    pixels = np.asarray(img, dtype=np.float64)
    assert pixels.std() > 10  # ink and a shaded, noisy background, not a blank image
    with pytest.raises(ValueError, match="kind"):
        make_image_folder(str(tmp_path / "x"), kind="letters")


def test_texture_folder(tmp_path):
    root = make_image_folder(str(tmp_path), classes=8, train_per_class=3, val_per_class=1, size=40, kind="textures")
    assert sorted(os.listdir(os.path.join(root, "train"))) == sorted(TEXTONS)
    imgs = {c: np.asarray(Image.open(os.path.join(root, "train", c, f"{c}_0.JPEG")), dtype=np.float64) for c in TEXTONS}
    assert all(img.shape == (40, 40, 3) and img.std() > 10 for img in imgs.values())
    # The class is in the orientation of the elements: a horizontal texture has its ink along rows, a vertical one
    # along columns (grey-level variation between neighbours across the strokes is larger than along them).
    grey = {c: img.mean(2) for c, img in imgs.items()}
    across = {c: (np.abs(np.diff(g, axis=0)).mean(), np.abs(np.diff(g, axis=1)).mean()) for c, g in grey.items()}
    assert across["horizontal"][0] > 1.2 * across["horizontal"][1]
    assert across["vertical"][1] > 1.2 * across["vertical"][0]
    with pytest.raises(ValueError, match="classes"):
        make_image_folder(str(tmp_path / "x"), classes=len(TEXTONS) + 1, kind="textures")


def test_dataset_spec():
    spec, kw = learning.parse_dataset("glyphs:classes=5,train_per_class=10")
    assert kw == {**learning.DATASETS["glyphs"], "classes": 5, "train_per_class": 10}
    with pytest.raises(ValueError, match="kind"):
        learning.parse_dataset("glyphs:kind=3")
    with pytest.raises(ValueError, match="unknown dataset"):
        learning.parse_dataset("letters")


def test_linear_probe_chooses_the_regularisation_on_the_training_split():
    # Two informative dimensions among 50 noisy ones, 20 training points per class: cross-validation must pick an L2
    # stronger than the weakest, and the probe must still separate the classes.
    g = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.arange(n) % 3
        x = torch.randn(n, 52, generator=g)
        x[:, 0] += 4 * (y == 1)
        x[:, 1] += 4 * (y == 2)
        return x, y

    acc, lam, cv = learning.linear_probe(sample(60), sample(600))
    assert acc > 65 and cv > 50 and lam > learning.LAMBDAS[-1]  # chance 33 %; 75-80 % at seeds 0-2 of this draw


def test_reestimate_bn_changes_only_the_running_statistics(tmp_path):
    root = make_image_folder(str(tmp_path), classes=2, train_per_class=8, val_per_class=1, size=40, kind="textures")
    model = learning.trunk("resnet18", None, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learning.reestimate_bn(model, root, crop=32, batch=4)
    after = model.state_dict()
    stats = {k for k in after if k.endswith(("running_mean", "running_var"))}
    assert not model.training
    assert all(torch.equal(before[k], after[k]) for k in after if k not in stats and "num_batches" not in k)
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # every layer's statistics are the data's now
    # The first layer's running mean is the mean of its input over the 16 training images (4 equal batches).
    images = torch.stack([x for x, _ in ImageFolder(os.path.join(root, "train"), eval_val_view(32))])
    with torch.no_grad():
        expected = model.conv1(images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1 and int(model.bn1.num_batches_tracked) == 4
