"""Data loading: images per second of each view pipeline (file read, JPEG decode, augmentation).

Pillow rows: one process, no DataLoader workers, one torch thread (as in a worker): the figure is what one worker
delivers, so a method that trains at R img/s per GPU needs about R / figure worker cores per GPU.

Device rows (common/device_views.py, for the two pretraining families): on the CPU, one thread, batches of --batch
images: read the bytes, decode the batch, augment it; the figure is images/s per core. With CUDA (--device cuda,
the default when a GPU is present), images/s on the GPU with the bytes read by 1 and 2 DataLoader workers, from the
second batch of each pass to the last (kernels finished).

    python -m benchmarks.loading [--images 64] [--batch 64] [--device cuda] [--gpu-images 1024]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import device_views  # noqa: E402
from common.data import DeviceViewLoader, ImageFolder, read_bytes  # noqa: E402
from common.synthetic import SHAPES, draw  # noqa: E402
from common.views import MultiCrop, TwoCrops, eval_train_view, moco_v2_view  # noqa: E402

TWO_CROP = "moco_v2 / mochi / hexa_moco (2 x 224 aug-plus)"
MULTI_CROP = "deepcluster_v2 / hexa_dcluster (2 x 224 + 6 x 96)"
PIPELINES = {
    "supervised (1 x 224)": lambda: eval_train_view(224),
    TWO_CROP: lambda: TwoCrops(moco_v2_view(224)),
    MULTI_CROP: lambda: MultiCrop([2, 6], [224, 96], [0.14, 0.05], [1, 0.14]),
}
DEVICE_FAMILIES = (TWO_CROP, MULTI_CROP)  # the pipelines the pretraining scripts run on the device


def make_folder(root: str, n: int, seed: int = 0) -> str:
    """ImageNet-sized JPEGs (500 x 375, quality 90, noisy backgrounds: about ImageNet's file sizes)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "train", "c0")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        draw(SHAPES[i % len(SHAPES)], 500, rng).crop((0, 0, 500, 375)).save(f"{folder}/{i}.JPEG", quality=90)
    return os.path.join(root, "train")


def _row(name, where, rates, size_kb):
    return {
        "pipeline": name,
        "where": where,
        "img_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "jpeg_kb": size_kb,
    }


def _pillow_rates(root, make, reps):
    dataset = ImageFolder(root, make())
    dataset[0]  # warm-up
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - t))
    return rates


def _device_cpu_rates(root, make, reps, batch):
    """Read bytes + batched decode + augment on the CPU, `batch` images at a time."""
    views = device_views.from_transform(make())
    paths = [p for p, _ in ImageFolder(root).samples]
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    views([read_bytes(p) for p in chunks[0]], chunks[0], torch.device("cpu"))  # warm-up
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for chunk in chunks:
            views([read_bytes(p) for p in chunk], chunk, torch.device("cpu"))
        rates.append(len(paths) / (time.perf_counter() - t))
    return rates


def _device_gpu_rates(root, make, reps, batch, workers, device):
    """The loader of train_loader(views="device") over the folder; images/s from the 2nd batch to the end."""
    dataset = ImageFolder(root, make())
    loader = DeviceViewLoader(dataset, SequentialSampler(dataset), batch, workers, device)
    rates = []
    for _ in range(reps + 1):  # the first pass warms up (cuDNN, nvJPEG, allocator)
        it = iter(loader)
        next(it)
        torch.cuda.synchronize(device)
        t, n = time.perf_counter(), 0
        for views, _ in it:
            n += len(views[0])
        torch.cuda.synchronize(device)
        rates.append(n / (time.perf_counter() - t))
    return rates[1:]


def run(n_images: int = 64, reps: int = 3, device: str | None = None, batch: int = 64, gpu_images: int = 1024):
    """Rows of the table: every Pillow pipeline, then the device pipeline of the two families on the CPU and, when
    `device` is a CUDA device (default: CUDA if available), on the GPU with 1 and 2 workers."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # per core: a DataLoader worker runs with one torch thread
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_folder(tmp, n_images)
            files = os.listdir(root + "/c0")
            size_kb = sum(os.path.getsize(os.path.join(root, "c0", f)) for f in files) / n_images / 1024
            for name, make in PIPELINES.items():
                rows.append(_row(name, "Pillow, per worker", _pillow_rates(root, make, reps), size_kb))
                if name in DEVICE_FAMILIES:
                    rates = _device_cpu_rates(root, make, reps, batch)
                    rows.append(_row(name, f"device views on CPU, per core (batch {batch})", rates, size_kb))
    finally:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            root = make_folder(tmp, gpu_images)
            for name in DEVICE_FAMILIES:
                for workers in (1, 2):
                    rates = _device_gpu_rates(root, PIPELINES[name], reps, batch, workers, device)
                    where = f"device views on {torch.cuda.get_device_name(device)}, {workers} worker(s) (batch {batch})"
                    rows.append(_row(name, where, rates, size_kb))
    return rows


def table(rows) -> str:
    out = ["| view pipeline | where | img/s (median) | min / max |", "|---|---|---:|---:|"]
    out += [f"| {r['pipeline']} | {r['where']} | {r['img_s']:.1f} | {r['min']:.1f} / {r['max']:.1f} |" for r in rows]
    return (
        "\n".join(out)
        + f"\n\nImages: 500 x 375 JPEG, {rows[0]['jpeg_kb']:.0f} KB on average; one torch thread on the CPU."
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images of the CPU measurements")
    p.add_argument("--batch", type=int, default=64, help="batch of the device pipeline")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--gpu-images", type=int, default=1024, help="images of the GPU measurements")
    a = p.parse_args()
    print(table(run(a.images, device=a.device, batch=a.batch, gpu_images=a.gpu_images)))
