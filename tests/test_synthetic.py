"""The generated datasets (common/synthetic.py) and the learning benchmark's probe (benchmarks/learning.py)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import learning
from common.synthetic import _glyph_mask, glyph_alphabet, make_image_folder


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

    acc, lam = learning.linear_probe(sample(60), sample(600))
    assert acc > 65 and lam > learning.LAMBDAS[-1]  # chance 33 %; 75-80 % at seeds 0-2 of this draw
