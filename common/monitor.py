"""Watching a pretraining run: a kNN monitor of the trunk (`KNNMonitor`, the weighted kNN of Wu et al. 2018), the
collapse and clustering statistics, and one-line warnings for the usual failures (`check_health`). What they measure,
how the monitor leaves training unchanged, and its cost: docs/monitoring.md.
"""

import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from common import ckpt, dist
from common.cli import UserError
from common.data import ImageFolder, shard_loader
from common.views import eval_val_view

PER_CLASS = 50  # training images per class in the kNN memory: 50,000 on ImageNet, the size of its val set
SUBSET_SEED = 0  # fixed, so that runs with different --seed are measured on the same images
KNN_K, KNN_T = 200, 0.07  # Wu et al. 2018

LOSS_RATIO = 0.97  # check_health: warn when the epoch's mean loss is above 0.97 x chance past the warm-up
SPREAD_MIN = 0.1  # and when embedding_spread is below (1: spread over the sphere; 0.1: within ~6 deg of a direction)
CLUSTER_MAX = 0.5  # and when one cluster of a head holds more than half of the memory (cluster_sizes)


def trunk_features(resnet: torch.nn.Module, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """The pooled features (N x d, fp32) of a torchvision ResNet, whatever its fc: its forward up to avgpool. With
    `amp`, bf16 autocast and channels_last input, as the scripts train with --amp on."""
    x = images.contiguous(memory_format=torch.channels_last) if amp else images
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        x = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
        return torch.flatten(resnet.avgpool(x), 1).float()


@torch.no_grad()
def knn_predict(queries, memory, memory_labels, num_classes: int, k: int = KNN_K, t: float = KNN_T, chunk=1024):
    """Weighted kNN (Wu et al. 2018): queries Q x d and memory M x d, unit rows; memory_labels M. Each query's
    k = min(k, M) most similar memory rows vote for their class with weight exp(sim / t). Returns Q labels."""
    k = min(k, memory.shape[0])
    out = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for s in range(0, queries.shape[0], chunk):
        sim, idx = (queries[s : s + chunk] @ memory.T).topk(k, dim=1)  # q x k: the nearest memory rows
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)  # q x C
        votes.scatter_add_(1, memory_labels[idx], (sim / t).exp())
        out[s : s + chunk] = votes.argmax(dim=1)
    return out


def balanced_subset(targets, per_class: int, seed: int) -> list[int]:
    """Indices, in folder order, of up to `per_class` samples of each class, drawn in a seeded order."""
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in sorted(by_class):
        order = torch.randperm(len(by_class[c]), generator=g)[:per_class].tolist()
        keep += [by_class[c][j] for j in order]
    return sorted(keep)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode inside, then every submodule's own training flag back (not one flag for all)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class KNNMonitor:
    """Weighted-kNN top-1 of a trunk (docs/monitoring.md). Build it once on every process (the datasets are scanned
    here); call it on every process with the unwrapped trunk (e.g. `model_without_ddp.encoder_q`). With `arch`, the
    first call also measures a randomly initialised trunk of that architecture. crop_size: the script's; batch_size:
    images per process per forward; amp: bf16 autocast and channels_last, as the script trains (--amp)."""

    def __init__(
        self,
        data: str,
        crop_size: int,
        batch_size: int,
        workers: int,
        device: torch.device,
        amp: bool = False,
        per_class: int = PER_CLASS,
        k: int = KNN_K,
        arch: str | None = None,
    ):
        self.device, self.amp, self.k = device, amp, k
        self.arch, self.random_acc = arch, None  # the random-trunk reference, computed at the first call
        view, val = eval_val_view(crop_size), os.path.join(data, "val")
        if not os.path.isdir(val):
            raise UserError(f"the kNN monitor reads {val}, which does not exist (--knn-every 0 turns it off)")
        self.train_set = ImageFolder(os.path.join(data, "train"), view)
        self.val_set = ImageFolder(val, view)
        if self.val_set.classes != self.train_set.classes:
            raise UserError(f"the class folders of {data}/val differ from those of {data}/train (kNN monitor)")
        keep = balanced_subset(self.train_set.targets, per_class, SUBSET_SEED)
        self.train_set.samples = self.train_set.imgs = [self.train_set.samples[i] for i in keep]
        self.train_set.targets = [target for _, target in self.train_set.samples]
        W = dist.world_size()
        if min(len(self.train_set), len(self.val_set)) < W:
            raise UserError(f"the kNN monitor needs at least {W} train and val images (one per process)")
        self.loaders = [self._loader(s, batch_size, workers) for s in (self.train_set, self.val_set)]

    def _loader(self, dataset, batch_size: int, workers: int) -> DataLoader:
        """This process's shard, with its own generator (else iterating draws a worker seed from the global RNG)."""
        return shard_loader(dataset, batch_size, workers, self.device, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def _embed(self, trunk, loader) -> torch.Tensor:
        """Unit pooled features of this process's shard, in shard order: n_r x d on the device."""
        feats = [trunk_features(trunk, x.to(self.device, non_blocking=True), self.amp) for x, _ in loader]
        return F.normalize(torch.cat(feats), dim=1)

    @torch.no_grad()
    def _gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """All processes' shards (rank r holds images r, r+W, ...) as n x d in dataset order. The shards are padded
        to one size for all_gather; the padding falls at the end of the interleaved order and is dropped."""
        W = dist.world_size()
        m = math.ceil(n / W)
        padded = F.pad(local, (0, 0, 0, m - local.shape[0]))  # m x d, zero rows at the end
        everyone = dist.concat_all_gather(padded).view(W, m, -1)  # rank w, row j = image j*W + w
        return everyone.transpose(0, 1).reshape(W * m, -1)[:n]

    def accuracy(self, trunk: torch.nn.Module) -> float:
        """Collective: the weighted-kNN top-1 (%) of `trunk` (run in eval mode, changing nothing)."""
        with ckpt.rng_kept(self.device), _eval_mode(trunk), torch.no_grad():
            train_loader, val_loader = self.loaders
            memory = self._gather(self._embed(trunk, train_loader), len(self.train_set))  # M x d, all processes
            memory_labels = torch.tensor(self.train_set.targets, device=self.device)  # M
            queries = self._embed(trunk, val_loader)  # this process's val images: Q_r x d
            labels = torch.tensor(self.val_set.targets[dist.rank() :: dist.world_size()], device=self.device)
            pred = knn_predict(queries, memory, memory_labels, len(self.train_set.classes), self.k)
            counts = dist.all_reduce_sum(torch.tensor([int((pred == labels).sum()), len(labels)], device=self.device))
        return 100.0 * counts[0].item() / counts[1].item()

    def __call__(self, trunk: torch.nn.Module) -> dict:
        """Collective. Returns {"knn/acc1": top-1 in %, "knn/s": seconds of this call} and, with `arch`,
        "knn/acc1_random": the same on a randomly initialised `arch` trunk (torchvision's, seed 0, first call)."""
        start = time.perf_counter()
        stats = {"knn/acc1": self.accuracy(trunk)}
        if self.arch is not None:
            if self.random_acc is None:
                with ckpt.rng_kept(self.device):
                    torch.manual_seed(0)
                    random_trunk = torchvision.models.get_model(self.arch).to(self.device)
                self.random_acc = self.accuracy(random_trunk)
            stats["knn/acc1_random"] = self.random_acc
        stats["knn/s"] = time.perf_counter() - start
        return stats


def knn_monitor(args, crop_size: int, batch_size: int, device):
    """The scripts' monitor, from their flags (--knn-every, DATA, -j, --amp, -a): a KNNMonitor with the random-trunk
    reference, or None when --knn-every is 0 or DATA/val does not exist (a note says the monitor is off)."""
    if not args.knn_every:
        return None
    if not os.path.isdir(os.path.join(args.data, "val")):
        dist.print0(f"note: {os.path.join(args.data, 'val')} does not exist; the kNN monitor is off")
        return None
    return KNNMonitor(args.data, crop_size, batch_size, args.workers, device, args.amp, arch=args.arch)


# ============ statistics and warnings ============
@torch.no_grad()
def embedding_spread(vectors: torch.Tensor) -> float:
    """Mean over dimensions of the standard deviation of the rows (N x D) made unit vectors, times sqrt(D): about 1
    spread over the sphere, 0 all equal (docs/monitoring.md). MoCo: `queue.T` (K x D); DeepCluster-v2: the memory."""
    x = F.normalize(vectors.float(), dim=1)
    return float(x.std(dim=0).mean() * math.sqrt(x.shape[1]))


@torch.no_grad()
def assignment_change(assignments: torch.Tensor, previous: torch.Tensor | None) -> dict:
    """train/assign_nmi and train/assign_changed (docs/monitoring.md) of this epoch's assignments against the last
    epoch's (both H x N, -100 for unassigned images), over the images assigned in both, means over heads; {} without
    a previous epoch."""
    if previous is None:
        return {}
    nmi, changed = [], []
    for a, b in zip(assignments, previous):
        keep = (a != -100) & (b != -100)
        a, b = a[keep], b[keep]
        if not a.numel():
            continue
        _, a = a.unique(return_inverse=True)  # dense ids 0..Ka-1
        _, b = b.unique(return_inverse=True)
        joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64, device=a.device)
        joint.index_put_((a, b), torch.ones_like(a, dtype=torch.float64), accumulate=True)
        p = joint / a.numel()  # Ka x Kb joint distribution
        pa, pb = p.sum(1), p.sum(0)
        mi = (p * (p / (pa[:, None] * pb[None, :])).log()).nansum()
        ha, hb = -(pa * pa.log()).sum(), -(pb * pb.log()).sum()
        nmi.append(float(mi / ((ha * hb).sqrt()).clamp(min=1e-12)) if ha > 0 and hb > 0 else float(ha == hb))
        changed.append(1.0 - float(joint.max(1).values.sum() / a.numel()))
    if not nmi:
        return {}
    return {"train/assign_nmi": sum(nmi) / len(nmi), "train/assign_changed": sum(changed) / len(changed)}


@torch.no_grad()
def cluster_sizes(assignments: torch.Tensor, clusters) -> dict:
    """Cluster sizes of an epoch's k-means (H x N assignments, -100 ignored; clusters: K_h per head): the largest share
    of the assigned images that one cluster of one head holds; the share of empty clusters and the largest cluster's
    size over the mean size N / K_h, means over heads (1: all the same size)."""
    largest, empty, ratio = [], [], []
    for a, k in zip(assignments, clusters):
        a = a[a != -100]
        if a.numel():
            counts = torch.bincount(a, minlength=k)
            largest.append(float(counts.max()) / a.numel())
            empty.append(float((counts == 0).float().mean()))
            ratio.append(float(counts.max()) * k / a.numel())
    n = max(len(empty), 1)
    return {
        "train/largest_cluster": max(largest, default=0.0),
        "train/empty_clusters": sum(empty) / n,
        "train/largest_over_mean": sum(ratio) / n,
    }


def check_health(stats: dict, chance: float, epoch: int, warmup_epochs: int) -> list[str]:
    """The warnings (docs/monitoring.md) that apply to an epoch's logged stats, printed (rank 0) and returned, one line
    each. chance: the loss of the uniform prediction; epoch: counted from 1, as in log.jsonl."""
    loss, lines = stats["train/loss"], []
    if epoch > warmup_epochs and not loss <= LOSS_RATIO * chance:  # not <=: a NaN warns too
        lines.append(
            f"train/loss {loss:.4f} after epoch {epoch} is above {LOSS_RATIO} x its chance value {chance:.4f}, past "
            f"the warm-up (epoch {warmup_epochs}): the network predicts no better than uniformly (often the collapsed, "
            "uniform solution); lower --lr or check the views (a loss well below chance is normal: moco #12, 6.9 for "
            "MoCo v2 at K = 65536, chance 11.09)"
        )
    if not stats.get("train/embed_spread", SPREAD_MIN) >= SPREAD_MIN:
        lines.append(
            f"train/embed_spread {stats['train/embed_spread']:.4f} is below {SPREAD_MIN} (about 1 when the embeddings "
            "spread over the sphere, 0 when they are all equal): the embeddings are collapsing to a point or a "
            "low-dimensional subspace; lower --lr or check the views"
        )
    if not (fraction := stats.get("train/largest_cluster", 0.0)) <= CLUSTER_MAX:
        lines.append(
            f"train/largest_cluster {fraction:.4f} is above {CLUSTER_MAX} (one cluster holds {100 * fraction:.0f} % of "
            "the memory): the trunk maps most images alike and k-means collapses to one cluster; lower --lr"
        )
    for line in lines:
        dist.print0("warning: " + line)
    return ["warning: " + line for line in lines]
