"""ImageNet-style folders and the distributed loaders built on them.

DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG. Pretraining reads only DATA/train.
"""

import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets

from common import dist
from common.cli import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # a truncated, corrupt or unreadable file
        raise UserError(f"cannot read image {path}: {err}") from None


class ImageFolder(datasets.ImageFolder):
    """torchvision ImageFolder with clear errors for a missing folder, an empty class folder and an unreadable
    image. With `with_index`, items are (index, sample) instead of (sample, target)."""

    def __init__(self, root: str, transform=None, with_index: bool = False):
        check_folder(root)
        super().__init__(root, transform=transform, loader=load_rgb)
        self.with_index = with_index

    def __getitem__(self, index):
        sample, target = super().__getitem__(index)
        return (index, sample) if self.with_index else (sample, target)


def check_folder(root: str) -> None:
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist (expected DATA/train/<class>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"data folder {root} has no class sub-folders")
    for c in classes:
        folder = os.path.join(root, c)
        if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder) for f in files):
            raise UserError(f"class folder {folder} holds no images")


def per_rank_batch(global_batch: int) -> int:
    """--batch-size is global; each process gets an equal share."""
    w = dist.world_size()
    if global_batch < w or global_batch % w:
        raise UserError(f"--batch-size {global_batch} must be a multiple of the number of processes ({w})")
    return global_batch // w


def train_loader(dataset, global_batch: int, workers: int, seed: int, device: torch.device) -> DataLoader:
    """Shuffled, sharded over processes (DistributedSampler, seeded), whole batches only (drop_last)."""
    batch = per_rank_batch(global_batch)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    if len(sampler) < batch:
        raise UserError(f"{len(dataset)} training images are fewer than one global batch of {global_batch}")
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        # Fresh workers each epoch, seeded from the main process's RNG: a resumed run draws the same
        # augmentations as an uninterrupted one (persistent workers would carry their RNG across epochs).
        persistent_workers=False,
    )


def eval_loader(dataset, global_batch: int, workers: int, device: torch.device) -> DataLoader:
    """Every image exactly once over all processes (rank r takes images r, r+W, ...), no padding."""
    subset = Subset(dataset, range(dist.rank(), len(dataset), dist.world_size()))
    return DataLoader(
        subset,
        batch_size=per_rank_batch(global_batch),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
