"""A small generated ImageFolder of real JPEG files for tests and the quick start: each class a kind of shape (disc,
square, triangle, ...) on a noisy grey background (docs/small-data-recipes.md; more kinds: benchmarks/datasets.py).

    python -m common.synthetic OUT [--classes 4] [--train-per-class 32] [--val-per-class 8] [--size 48] [--seed 0]
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "cross", "ring", "hbars", "vbars", "diamond", "dots", "x")


def draw(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    level = rng.uniform(60, 200)  # background grey level
    bg = level + rng.normal(0, 8, 3)  # with a faint tint
    img = Image.fromarray(np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    contrast = rng.choice([-1, 1]) * rng.uniform(50, 90)  # the shape is lighter or darker than the background
    if not 0 <= level + contrast <= 255:
        contrast = -contrast
    fg = tuple(int(c) for c in np.clip(level + contrast + rng.normal(0, 8, 3), 0, 255))
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2, int(r / 3))
    if shape == "disc":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "cross":
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fg)
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif shape == "hbars":
        for o in (-r, 0.0, r):
            d.rectangle((cx - r, cy + o - w / 2, cx + r, cy + o + w / 2), fill=fg)
    elif shape == "vbars":
        for o in (-r, 0.0, r):
            d.rectangle((cx + o - w / 2, cy - r, cx + o + w / 2, cy + r), fill=fg)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif shape == "dots":
        for dx in (-r / 2, r / 2):
            for dy in (-r / 2, r / 2):
                d.ellipse((cx + dx - w, cy + dy - w, cx + dx + w, cy + dy + w), fill=fg)
    elif shape == "x":
        d.line((cx - r, cy - r, cx + r, cy + r), fill=fg, width=w)
        d.line((cx - r, cy + r, cx + r, cy - r), fill=fg, width=w)
    return img


def write_folder(root: str, painters: dict, train_per_class: int, val_per_class: int, rng) -> str:
    """Write root/{train,val}/<name>/<name>_<i>.JPEG, each image painted by painters[name](rng); return root."""
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name, paint in painters.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                paint(rng).save(os.path.join(folder, f"{name}_{i}.JPEG"), quality=90)
    return root


def make_image_folder(root: str, classes=4, train_per_class=32, val_per_class=8, size=48, seed=0) -> str:
    """The shapes, drawn from the seed: root/{train,val}/<shape>/<shape>_<i>.JPEG; returns root."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be in 1..{len(SHAPES)} for shapes")
    painters = {s: lambda r, s=s: draw(s, size, r) for s in SHAPES[:classes]}
    return write_folder(root, painters, train_per_class, val_per_class, np.random.default_rng(seed))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_image_folder(a.out, a.classes, a.train_per_class, a.val_per_class, a.size, a.seed)
    print(f"wrote {a.out}/train and {a.out}/val")
