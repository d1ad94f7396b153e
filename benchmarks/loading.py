"""Data loading: images per second per worker of each view pipeline (JPEG decode plus augmentation).

One process, no DataLoader workers: the figure is what one worker delivers, so a method that trains at
R img/s per GPU needs about R / figure worker cores per GPU.

    python -m benchmarks.loading [--images 64]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import ImageFolder  # noqa: E402
from common.synthetic import SHAPES, draw  # noqa: E402
from common.views import MultiCrop, TwoCrops, eval_train_view, moco_v2_view  # noqa: E402

PIPELINES = {
    "supervised (1 x 224)": lambda: eval_train_view(224),
    "moco_v2 / mochi / hexa_moco (2 x 224 aug-plus)": lambda: TwoCrops(moco_v2_view(224)),
    "deepcluster_v2 / hexa_dcluster (2 x 224 + 6 x 96)": lambda: MultiCrop([2, 6], [224, 96], [0.14, 0.05], [1, 0.14]),
}


def make_folder(root: str, n: int, seed: int = 0) -> str:
    """ImageNet-sized JPEGs (500 x 375, quality 90, noisy backgrounds: about ImageNet's file sizes)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "train", "c0")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        draw(SHAPES[i % len(SHAPES)], 500, rng).crop((0, 0, 500, 375)).save(f"{folder}/{i}.JPEG", quality=90)
    return os.path.join(root, "train")


def run(n_images: int = 64, reps: int = 3) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(tmp, n_images)
        size_kb = sum(os.path.getsize(os.path.join(root, "c0", f)) for f in os.listdir(root + "/c0")) / n_images / 1024
        for name, make in PIPELINES.items():
            dataset = ImageFolder(root, make())
            dataset[0]  # warm-up
            rates = []
            for _ in range(reps):
                t = time.perf_counter()
                for i in range(len(dataset)):
                    dataset[i]
                rates.append(len(dataset) / (time.perf_counter() - t))
            rows.append(
                {
                    "pipeline": name,
                    "img_s": statistics.median(rates),
                    "min": min(rates),
                    "max": max(rates),
                    "jpeg_kb": size_kb,
                }
            )
    return rows


def table(rows) -> str:
    out = ["| view pipeline | img/s per worker (median) | min / max |", "|---|---:|---:|"]
    out += [f"| {r['pipeline']} | {r['img_s']:.1f} | {r['min']:.1f} / {r['max']:.1f} |" for r in rows]
    return "\n".join(out) + f"\n\nImages: 500 x 375 JPEG, {rows[0]['jpeg_kb']:.0f} KB on average."


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    print(table(run(p.parse_args().images)))
