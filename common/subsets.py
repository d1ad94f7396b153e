"""Label subsets for semi-supervised evaluation: a SimCLR list file (one training file name a line,
`n01440764_10026.JPEG`), or a seeded class-balanced draw of the same size. See docs/methods/finetune.md.
"""

import os

import torch

from common import ckpt, dist
from common.cli import UserError


def select(dataset, subset_file: str | None, perc: float, seed: int) -> None:
    """Restrict an ImageFolder's samples in place, in folder order: to `subset_file`'s list, else to `balanced`."""
    keep = from_file(dataset, subset_file) if subset_file else balanced(dataset.targets, perc, seed)
    dataset.samples = dataset.imgs = [dataset.samples[i] for i in keep]
    dataset.targets = [target for _, target in dataset.samples]


def from_file(dataset, path: str) -> list[int]:
    """Indices of the files a SimCLR-format list names, checked: every name an image of its class folder, once."""
    if not os.path.isfile(path):
        raise UserError(f"--subset-file {path}: no such file")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UserError(f"--subset-file {path} is empty")
    index = {(dataset.classes[t], os.path.basename(p)): i for i, (p, t) in enumerate(dataset.samples)}
    keep = set()
    for n, name in enumerate(names, 1):
        cls = name.rpartition("_")[0]
        if cls not in dataset.class_to_idx:
            raise UserError(f"{path} line {n}: {name} is not <class>_<id>.<ext> with a class folder of {dataset.root}")
        i = index.get((cls, name))
        if i is None:
            raise UserError(f"{path} line {n}: {name} is not an image of {os.path.join(dataset.root, cls)}")
        if i in keep:
            raise UserError(f"{path} line {n}: {name} is listed twice")
        keep.add(i)
    return sorted(keep)


def balanced(targets: list[int], perc: float, seed: int) -> list[int]:
    """Indices of floor(perc/100 x N) samples: min(size, L) of each class for the largest level L that fits, the
    few left over one each to classes with images to spare, in a seeded order; within a class, in a seeded order."""
    n = int(perc * len(targets) // 100)
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    classes = sorted(by_class)
    sizes = [len(by_class[c]) for c in classes]
    lo, hi = 0, max(sizes)  # largest level L with sum(min(size, L)) <= n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(s, mid) for s in sizes) <= n else (lo, mid - 1)
    quota = [min(s, lo) for s in sizes]
    g = torch.Generator().manual_seed(seed)
    spare = [j for j in torch.randperm(len(classes), generator=g).tolist() if sizes[j] > lo]
    for j in spare[: n - sum(quota)]:
        quota[j] += 1
    keep = []
    for j, c in enumerate(classes):
        order = torch.randperm(sizes[j], generator=g).tolist()
        keep += [by_class[c][k] for k in order[: quota[j]]]
    return sorted(keep)


def write(path: str, dataset) -> None:
    """Rank 0 writes the file names of the dataset's samples, one a line, in the list-file format (atomically)."""
    if dist.is_main():
        names = "".join(os.path.basename(p) + "\n" for p, _ in dataset.samples)
        ckpt.write_atomic(path, lambda f: f.write(names.encode()))
