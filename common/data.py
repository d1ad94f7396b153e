"""ImageNet-style folders (DATA/train/<class>/*.JPEG, DATA/val/<class>/*.JPEG) and the distributed loaders."""

import os

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets

from common import device_views, dist
from common.cli import UserError, reason
from common.views import load_rgb

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_bytes(path: str) -> torch.Tensor:
    """The encoded file as a 1-D uint8 tensor (decoded later, on the training device)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except Exception as err:  # a missing or unreadable file
        raise UserError(f"cannot read image {path}: {reason(err)}") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class ImageFolder(datasets.ImageFolder):
    """torchvision ImageFolder with clear errors for a missing folder, an empty class folder and an unreadable
    image. Items: (sample, target); (index, sample) `with_index`; (index, the file's bytes, target) when `encoded`
    (set by `train_loader(..., views="device")`: the views are made later, batched, on the training device)."""

    def __init__(self, root: str, transform=None, with_index: bool = False):
        check_folder(root)
        super().__init__(root, transform=transform, loader=load_rgb)
        self.with_index, self.encoded = with_index, False

    def __getitem__(self, index):
        if self.encoded:
            path, target = self.samples[index]
            return index, read_bytes(path), target
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


def train_loader(dataset, global_batch: int, workers: int, seed: int, device: torch.device, views: str = "pil"):
    """Shuffled, sharded over processes (DistributedSampler, seeded), whole batches only (drop_last). `views`: where
    the dataset's view transform runs: "pil" in the DataLoader workers, "device" batched on `device` (a
    DeviceViewLoader, common/device_views.py), "auto" "device" on CUDA else "pil". Both yield the same structure."""
    if views not in ("auto", "pil", "device"):
        raise ValueError(f"views must be 'auto', 'pil' or 'device', got {views!r}")
    if views == "auto":
        views = "device" if device.type == "cuda" else "pil"
    batch = per_rank_batch(global_batch)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    if len(sampler) < batch:
        raise UserError(f"{len(dataset)} training images are fewer than one global batch of {global_batch}")
    if views == "device":
        return DeviceViewLoader(dataset, sampler, batch, workers, device)
    return _batches(dataset, sampler, batch, workers, device)


def _batches(dataset, sampler, batch_size: int, workers: int, device: torch.device, collate_fn=None) -> DataLoader:
    # Whole batches only. Fresh workers each epoch (persistent_workers off), seeded from the main process's RNG: a
    # resumed run draws the same augmentations as an uninterrupted one. Pinned memory on CUDA: asynchronous copies.
    pin = device.type == "cuda"
    return DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn, pin_memory=pin, drop_last=True
    )


def _collate_encoded(items):
    # [(index, bytes, target)] -> B indices, a list of B byte tensors (of different lengths), B targets
    index, blobs, target = zip(*items)
    return torch.tensor(index, dtype=torch.long), list(blobs), torch.tensor(target, dtype=torch.long)


class DeviceViewLoader:
    """train_loader with views="device": the workers only read the encoded bytes; each batch is decoded and augmented
    on `device` (`device_views.from_transform` of the dataset's transform), as the Pillow path yields it. Puts the
    dataset (an ImageFolder, or a Subset of one) in encoded mode; forwards len(), .sampler, .batch_size, .dataset."""

    def __init__(self, dataset, sampler, batch_size: int, workers: int, device: torch.device):
        folder = dataset.dataset if isinstance(dataset, Subset) else dataset
        if not isinstance(folder, ImageFolder):
            raise ValueError(f"views='device' needs a common.data.ImageFolder or a Subset of one, got {type(folder)}")
        self.views = device_views.from_transform(folder.transform)
        folder.encoded = True
        self.folder, self.dataset, self.sampler = folder, dataset, sampler
        self.batch_size, self.device = batch_size, device
        self.loader = _batches(dataset, sampler, batch_size, workers, device, _collate_encoded)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for index, blobs, target in self.loader:
            paths = [self.folder.samples[i][0] for i in index.tolist()]  # for the error of an unreadable file
            views = self.views(blobs, paths, self.device)
            yield (index, views) if self.folder.with_index else (views, target)


def eval_loader(dataset, global_batch: int, workers: int, device: torch.device) -> DataLoader:
    """Every image exactly once over all processes (rank r takes images r, r+W, ...), no padding."""
    return shard_loader(dataset, per_rank_batch(global_batch), workers, device, persistent_workers=workers > 0)


def shard_loader(dataset, batch_size: int, workers: int, device: torch.device, **kwargs) -> DataLoader:
    """This process's shard of `dataset` in order (rank r of W takes images r, r+W, ...); kwargs: DataLoader's."""
    shard = Subset(dataset, range(dist.rank(), len(dataset), dist.world_size()))
    return DataLoader(shard, batch_size, num_workers=workers, pin_memory=device.type == "cuda", **kwargs)
