"""HEXA-DCluster: DeepCluster-v2 trained also on hard views of the large crops, cut-mixed (and adversarial).

Paper: Li, Li, Zhang, Peng, Zhou, Gao, "Self-supervised Pre-training with Hard Examples Improves Visual
Representations" (HEXA), arXiv:2012.13493. It publishes no attack, mixing or schedule settings that we could read:
every default here is our choice, measured on small generated data only (docs/methods/hexa_dcluster.md, BENCHMARKS.md).
Base: deepcluster_v2.py; every block that differs is tagged `# HEXA:`. Deltas:
  1. Adversarial view (off by default; --adv-weight 1 adds it): PGD from the V0 = nmb_crops[0] large crops in [0,1]
     pixels under an L-inf budget (1 step, eps = step = 2/255) on their DeepCluster loss against their images'
     k-means assignments; input gradient only, BatchNorm statistics untouched (adversarial_view); prototypes,
     memory bank and assignments only read.
  2. Cut-mixed view: CutMix of the large crops with a partner image of the batch (one box for all the large crops
     of an image); loss lambda * l(own assignment) + (1 - lambda) * l(partner's), per head (cutmix).
  3. Hard views from --hard-start-epoch on (default: after 20 % of the epochs, as HEXA-MoCo), cut-mixed only by
     default: on small generated data they gained 3.1 points over DeepCluster-v2 on average (3 datasets x 2 seeds,
     +0.3 to +7.9), while adding the adversarial views lost 0.7 to 16.1 points (docs/methods/hexa_dcluster.md).
     ImageNet: not measured.
  4. The hard views go through the one DDP forward of the step, their BatchNorm batches per --hard-bn: "shared"
     (default), in the large crops' trunk pass; "own", passes of their own; "separate", those, leaving the running
     statistics to the clean crops. The clean rows give the base's loss and memory update.
     Loss = clean + --adv-weight * adversarial + --mix-weight * cut-mixed; a weight of 0 skips its computation.

    python hexa_dcluster.py DATA                          # one process: one GPU, or the CPU for debugging
    torchrun --nproc_per_node=8 hexa_dcluster.py DATA     # one node, 8 GPUs, global batch 4096 (published: 64 x 64)
"""

import argparse
import contextlib  # HEXA: running_stats_frozen
import functools
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

from common import ckpt, dist
from common.cli import UserError, run
from common.data import ImageFolder, train_loader
from common.meters import Progress, log_epoch
from common.monitor import assignment_change, check_health, cluster_sizes, embedding_spread, knn_monitor
from common.views import MEAN, STD, MultiCrop  # HEXA: MEAN, STD: the attack works on pixels

METHOD = "hexa_dcluster"  # HEXA: the name in checkpoints and output folders
ARCHS = sorted(n for n in torchvision.models.list_models(torchvision.models) if "resne" in n)
VIEWS = ["auto", "pil", "device"]  # auto: device on CUDA, pil on the CPU (common/device_views.py)
HARD_BN = ["shared", "own", "separate"]  # HEXA: the hard views' BatchNorm (see the docstring)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="ImageNet-style root; DATA/train/<class>/*.JPEG is read")
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, help="torchvision ResNet (default resnet50)")
    p.add_argument("--epochs", type=int, default=800, help="total epochs (default 800)")
    p.add_argument("-b", "--batch-size", type=int, default=4096, help="global batch over all processes (default 4096)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 4.8 x batch-size / 4096)")
    p.add_argument("--final-lr", type=float, default=None, help="lr at the end of the cosine (default 0.0048 x b/4096)")
    p.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up epochs (default 10)")
    p.add_argument("--start-warmup", type=float, default=None, help="first warm-up lr (default 0.3 x b/4096)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--wd", type=float, default=1e-6, help="weight decay, folded into LARS (default 1e-6)")
    p.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process (default 8)")
    p.add_argument("--views", default="auto", choices=VIEWS, help="pil (in workers) or device; auto: device on CUDA")
    p.add_argument("--seed", type=int, default=0, help="seed; process r uses seed + r (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: CUDA if available")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="bf16, channels_last (auto: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders (off: unmeasured on a GPU)")
    p.add_argument("--output-dir", default=f"runs/{METHOD}", help=f"checkpoints and log.jsonl (default runs/{METHOD})")
    p.add_argument("--resume", nargs="?", const="latest", help="checkpoint path; alone: the latest in --output-dir")
    p.add_argument("--save-freq", type=int, default=10, help="keep checkpoint_<epoch>.pth every N epochs (default 10)")
    p.add_argument("-p", "--print-freq", type=int, default=10, help="progress line every N steps (default 10)")
    p.add_argument("--knn-every", type=int, default=5, help="kNN monitor every N epochs and at the end; 0: off (5)")
    # DeepCluster-v2
    p.add_argument("--nmb-crops", type=int, nargs="+", default=[2, 6], help="crops per resolution (default 2 6)")
    p.add_argument("--size-crops", type=int, nargs="+", default=[224, 96], help="crop sides (default 224 96)")
    p.add_argument("--min-scale-crops", type=float, nargs="+", default=[0.14, 0.05], help="min crop scales (0.14 0.05)")
    p.add_argument("--max-scale-crops", type=float, nargs="+", default=[1.0, 0.14], help="max crop scales (1 0.14)")
    p.add_argument("--crops-for-assign", type=int, nargs="+", default=[0, 1], help="crops in the memory (0 1)")
    p.add_argument("--nmb-prototypes", type=int, nargs="+", default=[3000] * 3, help="clusters per head (3000 x 3)")
    p.add_argument("--feat-dim", type=int, default=128, help="embedding dimension D (default 128)")
    p.add_argument("--hidden-mlp", type=int, default=2048, help="projection hidden width; 0: one Linear (2048)")
    p.add_argument("--temperature", type=float, default=0.1, help="softmax temperature (default 0.1)")
    p.add_argument("--kmeans-iters", type=int, default=10, help="k-means iterations per epoch and head (default 10)")
    p.add_argument("--kmeans-backend", default="faiss", choices=["faiss", "torch"], help="nearest-centroid search")
    # HEXA: hard views; eps and step in units of 1/255 of the [0, 1] pixel range
    p.add_argument("--adv-weight", type=float, default=0.0, help="adversarial views' loss weight (default 0: none)")
    p.add_argument("--adv-eps", type=float, default=2.0, help="L-inf budget of the attack, x 1/255 (default 2)")
    p.add_argument("--adv-step", type=float, default=2.0, help="attack step size, x 1/255 (default 2)")
    p.add_argument("--adv-steps", type=int, default=1, help="attack (PGD) steps (default 1)")
    p.add_argument("--adv-random-start", action=argparse.BooleanOptionalAction, default=False, help="PGD random start")
    p.add_argument("--mix-weight", type=float, default=1.0, help="cut-mixed views' loss weight; 0: no CutMix")
    p.add_argument("--hard-bn", default="shared", choices=HARD_BN, help="hard views' BatchNorm (default shared)")
    p.add_argument("--hard-start-epoch", type=int, default=None, help="hard views from this epoch (20 %% of --epochs)")
    p.add_argument("--mix-partner", default="image", choices=["image", "view"], help="CutMix source (default image)")
    return p


class DeepClusterV2(nn.Module):
    """A ResNet trunk, a projection head to L2-normalised embeddings and one prototype matrix per clustering
    head (swav: src/resnet50.py with a list of nmb_prototypes).

    b = per-process batch, V = number of crops, d = trunk width, D = embedding dimension, K_h = clusters of head h.
    """

    # HEXA: + hard_bn, the hard views' BatchNorm (one of HARD_BN)
    def __init__(self, arch="resnet50", feat_dim=128, hidden_mlp=2048, nmb_prototypes=(3000,) * 3, hard_bn="shared"):
        super().__init__()
        self.backbone = torchvision.models.get_model(arch)
        d = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # the trunk ends at the pooled d-dim features
        if hidden_mlp:  # Linear(d, h), BN, ReLU, Linear(h, D)
            self.projection_head = nn.Sequential(
                nn.Linear(d, hidden_mlp),
                nn.BatchNorm1d(hidden_mlp),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_mlp, feat_dim),
            )
        else:
            self.projection_head = nn.Linear(d, feat_dim)
        # Prototypes C_h (K_h x D): bias-free, so the scores z C_h^T are cosine similarities once the rows are unit
        # vectors. They are the k-means centroids written at the start of every epoch and never receive gradients
        # (the reference freezes them for 300k iterations, longer than its longest run).
        self.prototypes = nn.ModuleList(nn.Linear(feat_dim, k, bias=False) for k in nmb_prototypes)
        self.prototypes.requires_grad_(False)
        self.hard_bn = hard_bn  # HEXA: one of HARD_BN

    def forward_head(self, feats):
        """feats: V*b x d. Returns z (V*b x D, unit rows, fp32) and the scores [V*b x K_h for each head]."""
        z = F.normalize(self.projection_head(feats).float(), dim=1)  # V*b x D
        with torch.autocast(z.device.type, enabled=False):  # scores in fp32, also under bf16 autocast
            return z, [head(z) for head in self.prototypes]

    def forward(self, crops, hard=()):  # HEXA: + the hard views
        """crops: a list of V crop batches (b x 3 x s_v x s_v), grouped by resolution. Consecutive crops of the same
        size go through the trunk together (trunk BN statistics per resolution); the head runs once on all of them.
        Row v*b + i of the outputs is crop v of image i."""
        # HEXA: hard: batches of hard views of the first resolution; their rows follow the V*b clean rows. hard_bn
        # "shared": they join the large crops' trunk pass and the head's pass; "own": trunk and head passes of their
        # own; "separate": those, leaving the BatchNorm running statistics as they were.
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        groups = [torch.cat(list(group)) for _, group in itertools.groupby(crops, lambda c: c.shape[-1])]  # HEXA
        if hard and self.hard_bn == "shared":  # HEXA: in the large crops' trunk pass (one BatchNorm batch)
            first = self.backbone(torch.cat([groups[0], *hard]))
            n0 = len(groups[0])
            return self.forward_head(torch.cat([first[:n0], *[self.backbone(x) for x in groups[1:]], first[n0:]]))
        z, scores = self.forward_head(torch.cat([self.backbone(x) for x in groups]))  # V*b x d in, (z, scores) out
        if not hard:  # HEXA: else the hard views' own passes, their rows after the clean ones
            return z, scores
        with running_stats_frozen(self) if self.hard_bn == "separate" else contextlib.nullcontext():
            z_hard, scores_hard = self(torch.cat(hard))
        return torch.cat([z, z_hard]), [torch.cat(pair) for pair in zip(scores, scores_hard)]


# ============ memory bank and k-means ============


@torch.no_grad()
def init_memory(model, loader, args, device):
    """One pass over the loader (train mode, no gradients, as swav: init_memory): the embeddings of the crops in
    crops_for_assign, one bank per crop. Returns the dataset indices (M) and the banks (n_banks x M x D),
    M = steps x per-process batch."""
    model.train()
    b, n_banks = loader.batch_size, len(args.crops_for_assign)
    fmt = torch.channels_last if args.amp else torch.contiguous_format
    local_memory_index = torch.zeros(len(loader) * b, dtype=torch.long, device=device)  # M
    local_memory_embeddings = torch.zeros(n_banks, len(loader) * b, args.feat_dim, device=device)  # n_banks x M x D
    for i, (idx, crops) in enumerate(loader):
        local_memory_index[i * b : (i + 1) * b] = idx.to(device)
        for j, c in enumerate(args.crops_for_assign):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                z, _ = model(crops[c].to(device, non_blocking=True, memory_format=fmt))  # b x D
            local_memory_embeddings[j, i * b : (i + 1) * b] = z
    return local_memory_index, local_memory_embeddings


@functools.cache
def _faiss_gpu_resources():
    import faiss

    return faiss.StandardGpuResources()  # scratch memory for the GPU indexes, allocated once per process


def _faiss_index(dim: int, device: torch.device):
    """Inner-product index: on the GPU when the memory is on CUDA and faiss has GPU support, else on the CPU."""
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors, CPU or CUDA)
    except ImportError:
        raise UserError("faiss is not installed (pip install faiss-cpu); or use --kmeans-backend torch") from None
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = device.index if device.index is not None else torch.cuda.current_device()
        return faiss.GpuIndexFlatIP(_faiss_gpu_resources(), dim, cfg)
    return faiss.IndexFlatIP(dim)


def nearest_centroid(x, centroids, backend="faiss", chunk=65536):
    """E-step: argmax_k <x_i, c_k> for every row of x (M x D), centroids K x D; returns M cluster ids."""
    if backend == "faiss":
        index = _faiss_index(x.shape[1], x.device)
        on_index = x.device if "Gpu" in type(index).__name__ else torch.device("cpu")
        index.add(centroids.float().to(on_index).contiguous())
        return index.search(x.float().to(on_index).contiguous(), 1)[1].squeeze(1).to(x.device)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = (x[s : s + chunk] @ centroids.T).argmax(dim=1)  # chunk x K scores, then argmax
    return out


@torch.no_grad()
def m_step(x, assignments, centroids):
    """Spherical M-step over all processes: c_k = normalise(sum of the rows assigned to k); an empty cluster keeps
    its centroid. x: M x D (this process's rows), assignments: M, centroids: K x D. Returns the new centroids."""
    K = centroids.shape[0]
    emb_sums = torch.zeros_like(centroids).index_add_(0, assignments, x)  # K x D
    counts = torch.bincount(assignments, minlength=K)  # K
    dist.all_reduce_sum(emb_sums)
    dist.all_reduce_sum(counts)
    new = F.normalize(emb_sums / counts.clamp(min=1)[:, None], dim=1)
    return torch.where(counts[:, None] > 0, new, centroids)  # kept exactly, not re-normalised


@torch.no_grad()
def spherical_kmeans(x, local_index, K, iters=10, seed=0, backend="faiss"):
    """Distributed spherical k-means of the rows of all processes (swav: cluster_memory, one head).

    x: M x D unit rows held by this process, local_index: their dataset ids (M). The K initial centroids are the
    rows of K distinct dataset ids drawn under `seed` from all ids held by any process, so the result does not
    depend on how the rows are spread over processes (the reference draws from rank 0's bank). Then `iters`
    rounds of E-step (nearest centroid by inner product) and M-step, and a final E-step.
    Returns the centroids (K x D) and this process's assignments (M).
    """
    ids = torch.unique(dist.concat_all_gather(local_index)).cpu()  # all ids held, sorted
    if len(ids) < K:
        raise UserError(f"the memory holds {len(ids)} images over all processes, fewer than {K} clusters")
    g = torch.Generator().manual_seed(seed)
    chosen = ids[torch.randperm(len(ids), generator=g)[:K]].to(x.device)  # K ids
    # Each process contributes the rows it holds; an id held twice (sampler padding) gets the mean.
    sorted_index, order = local_index.sort()
    pos = torch.searchsorted(sorted_index, chosen).clamp(max=len(sorted_index) - 1)  # K
    held = sorted_index[pos] == chosen  # K
    centroids = torch.where(held[:, None], x[order[pos]], torch.zeros_like(x[:1]))  # K x D
    counts = held.to(x.dtype)
    dist.all_reduce_sum(centroids)
    dist.all_reduce_sum(counts)
    centroids = F.normalize(centroids / counts[:, None], dim=1)
    for _ in range(iters):
        centroids = m_step(x, nearest_centroid(x, centroids, backend), centroids)
    return centroids, nearest_centroid(x, centroids, backend)


@torch.no_grad()
def cluster_memory(model, local_memory_index, local_memory_embeddings, size_dataset, args, epoch):
    """k-means for every head at the start of an epoch (swav: cluster_memory). Head h clusters bank h mod n_banks;
    its prototypes become the centroids. Returns the assignments H x N (N = dataset size, -100 for the images that
    no process holds: the loss ignores them) and the centroids [K_h x D]."""
    H = len(args.nmb_prototypes)
    assignments = torch.full((H, size_dataset), -100, dtype=torch.long, device=local_memory_index.device)  # H x N
    all_index = dist.concat_all_gather(local_memory_index)  # W*M, rank order
    all_centroids = []
    for h, K in enumerate(args.nmb_prototypes):
        x = local_memory_embeddings[h % len(local_memory_embeddings)]  # M x D
        seed = (args.seed * 100_003 + epoch) * 1_009 + h  # shared by all processes, a new draw per epoch and head
        centroids, local_assignments = spherical_kmeans(
            x, local_memory_index, K, args.kmeans_iters, seed, args.kmeans_backend
        )
        model.prototypes[h].weight.copy_(centroids)
        assignments[h, all_index] = dist.concat_all_gather(local_assignments)  # W*M; a padded duplicate: last wins
        all_centroids.append(centroids)
    return assignments, all_centroids


def deepcluster_loss(scores, targets, temperature):
    """Cross-entropy of every crop towards its image's cluster, averaged over heads (swav: main_deepclusterv2.py).

    scores: [V*b x K_h] per head (crop-major rows), targets: H x b. Targets -100 are ignored; a head whose batch
    holds no valid target contributes zero (never a made-up target, never NaN)."""
    loss = 0.0
    for s, t in zip(scores, targets):
        t = t.repeat(s.shape[0] // t.shape[0])  # V*b: the same target for every crop of an image
        valid = (t != -100).sum()
        loss = loss + F.cross_entropy(s / temperature, t, ignore_index=-100, reduction="sum") / valid.clamp(min=1)
    return loss / len(scores)


# HEXA: the hard-example generators and two helpers, the same text in both HEXA scripts
@functools.cache
def pixel_stats(device: torch.device) -> tuple:
    """MEAN and STD as 1 x 3 x 1 x 1 tensors on `device`, made once (a host-to-device copy waits for the GPU)."""
    return torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1)


@contextlib.contextmanager
def running_stats_frozen(module):
    """Inside, the module's BatchNorm layers (in train mode) use batch statistics and leave their buffers alone."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def adversarial_view(model, loss_fn, images, eps, step, steps, random_start=False):
    """PGD (Madry et al.) in [0, 1] pixels: `steps` signed-gradient ascent steps of size `step` on loss_fn (normalised
    images N x 3 x H x W -> scalar), each projected onto the L-inf eps-ball and the valid range. Only the input
    gradient (no parameter .grad, no DDP all-reduce) and `model`'s BatchNorm statistics frozen: it changes nothing.
    images: N x 3 x H x W, normalised with MEAN/STD. Returns the adversarial images, normalised, detached."""
    mean, std = pixel_stats(images.device)
    x0 = images.detach() * std + mean  # clean pixels in [0, 1]: N x 3 x H x W
    x = x0 + torch.empty_like(x0).uniform_(-eps, eps) if random_start else x0
    with running_stats_frozen(model):
        for _ in range(steps):
            x = x.clamp(0, 1).requires_grad_()
            (grad,) = torch.autograd.grad(loss_fn((x - mean) / std), x)
            x = torch.minimum(torch.maximum(x.detach() + step * grad.sign(), x0 - eps), x0 + eps)
    return ((x.clamp(0, 1) - mean) / std).detach()


def cutmix(images, source=None, alpha=1.0):
    """CutMix (Yun et al., arXiv:1905.04899) inside a batch, one box for the whole batch.

    images: N x C x H x W (N >= 2). Each image gets a box pasted from its partner, a random cyclic derangement
    (never itself); or, with `source` (N x C x H x W), from source[i] (partner = i: another view of the image).
    lambda ~ Beta(alpha, alpha); box sides H, W x sqrt(1 - lambda), centre uniform, clipped to the image; lambda is
    then recomputed from the clipped box: exactly the fraction of pixels that stay the image's own.
    Returns the mixed images N x 3 x H x W, partner N (a device tensor) and lambda (a Python float: no host sync).
    """
    n, _, h, w = images.shape
    perm = torch.randperm(n, device=images.device)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(-1)  # one cycle through the batch: partner[i] != i
    if source is not None:
        partner = torch.arange(n, device=images.device)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # drawn on the host
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y1, y2, x1, x2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[:, :, y1:y2, x1:x2] = (images[partner] if source is None else source)[:, :, y1:y2, x1:x2]
    return mixed, partner, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


# ============ optimizer and schedule ============


class LARS(torch.optim.SGD):
    """SGD with momentum wrapped in LARC as in apex (trust coefficient 0.001, clip=False, eps 1e-8), the setting of
    the SwAV repository (You et al., arXiv:1708.03888). Weight decay is folded into the scaled gradient:
    g <- eta |w| / (|g| + wd |w| + eps) * (g + wd w); a parameter with |w| = 0 or |g| = 0 takes the plain step
    without weight decay. The inner SGD step runs with weight decay 0."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.trust_coefficient, self.eps = trust_coefficient, eps

    @torch.no_grad()
    def step(self, closure=None):
        weight_decays = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            weight_decays.append(wd)
            group["weight_decay"] = 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                trust = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
                scaled = (p.grad + wd * p) * trust
                p.grad.copy_(torch.where((w_norm > 0) & (g_norm > 0), scaled, p.grad))  # no host sync
        try:
            return super().step(closure)
        finally:
            for group, wd in zip(self.param_groups, weight_decays):
                group["weight_decay"] = wd


def lr_schedule(args, steps_per_epoch: int) -> np.ndarray:
    """Per iteration: linear warm-up from --start-warmup to --lr over --warmup-epochs (both ends included), then a
    cosine from --lr to --final-lr (swav: main_deepclusterv2.py)."""
    warmup = np.linspace(args.start_warmup, args.lr, steps_per_epoch * args.warmup_epochs)
    t = np.arange(steps_per_epoch * max(args.epochs - args.warmup_epochs, 0))
    cosine = args.final_lr + 0.5 * (args.lr - args.final_lr) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate((warmup, cosine))


def train_one_epoch(model, loader, optimizer, schedule, memory, assignments, epoch: int, args, device) -> dict:
    model.train()
    dc = model.module  # HEXA: the unwrapped model: the attack runs outside DDP's forward
    local_memory_index, local_memory_embeddings = memory
    progress = Progress(epoch, len(loader), args.batch_size, args.print_freq)
    fmt = torch.channels_last if args.amp else torch.contiguous_format
    b, n0 = loader.batch_size, args.nmb_crops[0]  # HEXA: n0 = V0, the large crops, the ones made hard
    for i, (idx, images) in enumerate(loader):
        progress.data_loaded()
        lr = float(schedule[epoch * len(loader) + i])
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = idx.to(device, non_blocking=True)  # b dataset ids
        images = [x.to(device, non_blocking=True, memory_format=fmt) for x in images]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            # HEXA: hard views of the large crops (crop-major, V0*b rows each), then the one DDP forward of all views
            targets, hard = assignments[:, idx], []  # H x b; [V0*b x 3 x s0 x s0]
            on = epoch >= args.hard_start_epoch  # hard views from --hard-start-epoch on
            if args.adv_weight > 0 and on:

                def loss_fn(x):  # the DeepCluster loss of the large crops x against their images' clusters
                    return deepcluster_loss(dc(x)[1], targets, args.temperature)

                eps, step = args.adv_eps / 255, args.adv_step / 255
                large = torch.cat(images[:n0])  # V0*b x 3 x s0 x s0
                hard.append(adversarial_view(dc, loss_fn, large, eps, step, args.adv_steps, args.adv_random_start))
            if args.mix_weight > 0 and on:  # an image's V0 large crops as channels: one partner, one box for all
                other = torch.cat(images[1:n0] + images[:1], dim=1) if args.mix_partner == "view" else None
                mixed, partner, lam = cutmix(torch.cat(images[:n0], dim=1), other)  # b x 3*V0 x s0 x s0, partner b
                hard.append(torch.cat(mixed.split(3, dim=1)).contiguous(memory_format=fmt))  # V0*b x 3 x s0 x s0
            z, scores = model(images, hard)  # HEXA: + the hard views' rows after the V*b clean ones
            if hard:  # HEXA: the hard views' rows out: z and scores are the clean crops' (V*b rows) as in the base
                n_clean = len(images) * b
                hard_scores = [s[n_clean:] for s in scores]  # [len(hard)*V0*b x K_h], adversarial rows first
                z, scores = z[:n_clean], [s[:n_clean] for s in scores]  # V*b x D, [V*b x K_h]
        loss = deepcluster_loss(scores, assignments[:, idx], args.temperature)  # targets H x b
        hexa = {"hexa/clean_loss": loss} if hard else {}  # HEXA: the clean and hard views' losses, logged
        if args.adv_weight > 0 and on:
            hexa["hexa/adv_loss"] = deepcluster_loss([s[: n0 * b] for s in hard_scores], targets, args.temperature)
            loss = loss + args.adv_weight * hexa["hexa/adv_loss"]
        if args.mix_weight > 0 and on:  # own and partner's assignments, each normalised as deepcluster_loss
            mix_scores = [s[-n0 * b :] for s in hard_scores]  # [V0*b x K_h]
            own, other = (deepcluster_loss(mix_scores, t, args.temperature) for t in (targets, targets[:, partner]))
            hexa["hexa/mix_loss"] = lam * own + (1 - lam) * other
            loss = loss + args.mix_weight * hexa["hexa/mix_loss"]

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Refresh the memory with this forward's embeddings (before the step, as the reference), for the next epoch.
        with torch.no_grad():
            local_memory_index[i * b : (i + 1) * b] = idx
            for j, c in enumerate(args.crops_for_assign):
                local_memory_embeddings[j, i * b : (i + 1) * b] = z[c * b : (c + 1) * b].detach()
        progress.step(i, loss=loss, lr=lr, **hexa)  # HEXA: + the hard views' losses
    return progress.summary()


def check_args(args) -> None:
    n = len(args.nmb_crops)
    if not len(args.size_crops) == len(args.min_scale_crops) == len(args.max_scale_crops) == n:
        raise UserError("--nmb-crops, --size-crops, --min-scale-crops and --max-scale-crops need the same length")
    if any(c < 0 or c >= sum(args.nmb_crops) for c in args.crops_for_assign):
        raise UserError(
            f"--crops-for-assign {args.crops_for_assign}: crop ids must lie in 0..{sum(args.nmb_crops) - 1}"
        )
    if len(set(args.crops_for_assign)) != len(args.crops_for_assign):
        raise UserError(f"--crops-for-assign {args.crops_for_assign} repeats a crop")
    if min(args.nmb_prototypes) < 1 or args.kmeans_iters < 0:
        raise UserError("--nmb-prototypes must be positive and --kmeans-iters non-negative")


def main(args):
    # ============ setup ============
    check_args(args)
    device = dist.init_distributed(args.device)
    args.amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")  # bf16 autocast, channels_last
    ckpt.prepare_output_dir(args.output_dir, args.resume)
    resume_path = ckpt.resolve_resume(args.resume, args.output_dir)
    ckpt.seed_all(args.seed + dist.rank())
    # Linear scaling rule: the published values hold for a global batch of 4096.
    args.lr = 4.8 * args.batch_size / 4096 if args.lr is None else args.lr
    args.final_lr = 0.0048 * args.batch_size / 4096 if args.final_lr is None else args.final_lr
    args.start_warmup = 0.3 * args.batch_size / 4096 if args.start_warmup is None else args.start_warmup
    # HEXA: the hard-view flags
    args.hard_start_epoch = round(0.2 * args.epochs) if args.hard_start_epoch is None else args.hard_start_epoch
    if min(args.adv_weight, args.adv_eps, args.adv_step, args.adv_steps, args.mix_weight, args.hard_start_epoch) < 0:
        raise UserError("--adv-*, --mix-weight and --hard-start-epoch must not be negative")
    if args.mix_weight > 0 and args.batch_size < 2 * dist.world_size():  # HEXA: CutMix pairs images of a process
        raise UserError(f"--mix-weight > 0 needs at least 2 images per process; --batch-size is {args.batch_size}")
    dist.print0(f"{METHOD}: {dist.world_size()} process(es) on {device}; {vars(args)}")

    # ============ data ============
    views = MultiCrop(args.nmb_crops, args.size_crops, args.min_scale_crops, args.max_scale_crops)
    dataset = ImageFolder(os.path.join(args.data, "train"), views, with_index=True)
    loader = train_loader(dataset, args.batch_size, args.workers, args.seed, device, args.views)
    memory_size = len(loader) * loader.batch_size  # M per process
    if memory_size * dist.world_size() < max(args.nmb_prototypes):
        raise UserError(
            f"the memory holds {memory_size * dist.world_size()} images over all processes, "
            f"fewer than --nmb-prototypes {max(args.nmb_prototypes)}"
        )
    # the kNN top-1 of the trunk on DATA/val every --knn-every epochs (common/monitor.py)
    knn = knn_monitor(args, args.size_crops[0], loader.batch_size, device)

    # ============ model ============
    config = (args.arch, args.feat_dim, args.hidden_mlp, args.nmb_prototypes, args.hard_bn)  # HEXA: + --hard-bn
    model = DeepClusterV2(*config).to(device)
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN does not run on the CPU
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:  # torch.compile of the trunk, in place: the same modules, parameters and checkpoint keys
        model.backbone.compile()
    model_without_ddp = model

    # ============ optimizer ============
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], args.lr, args.momentum, args.wd)
    schedule = lr_schedule(args, len(loader))

    # ============ resume ============
    start_epoch, saved_memory = 0, None
    if resume_path:
        state = ckpt.load(resume_path)
        ckpt.check_kind(state, resume_path, METHOD)
        ckpt.load_state(model_without_ddp, state["model"], resume_path, state["args"])
        ckpt.load_optimizer(optimizer, state["optimizer"], resume_path)
        start_epoch = state["epoch"]
        if not ckpt.restore_rng(state["rng"]):
            dist.print0("note: the number of processes changed; RNG states not restored")
        saved_memory = state["extra"].get("memory")
        dist.print0(f"resumed from {resume_path} at epoch {start_epoch}")
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ============ memory bank ============
    W, r = dist.world_size(), dist.rank()
    if saved_memory is not None and saved_memory["index"].shape[0] == W * memory_size:
        # The bank of every process, gathered in rank order at the end of the last epoch: take back this slice.
        local_memory_index = saved_memory["index"][r * memory_size : (r + 1) * memory_size].to(device)
        local_memory_embeddings = saved_memory["embeddings"][:, r * memory_size : (r + 1) * memory_size].to(device)
    else:
        if resume_path:  # a kept copy (no bank), or a bank of another size (processes x steps x batch)
            dist.print0("note: no memory bank of this size in the checkpoint; memory bank rebuilt from the model")
        loader.sampler.set_epoch(start_epoch)
        local_memory_index, local_memory_embeddings = init_memory(model, loader, args, device)
    memory = (local_memory_index, local_memory_embeddings)

    # ============ training loop ============
    previous = None  # the last epoch's assignments, for train/assign_nmi and train/assign_changed
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        assignments, _ = cluster_memory(model_without_ddp, *memory, len(dataset), args, epoch)
        kmeans_s = time.perf_counter() - t0
        stats = train_one_epoch(model, loader, optimizer, schedule, memory, assignments, epoch, args, device)
        if not math.isfinite(stats["train/loss"]):
            raise UserError(f"the loss is not finite in epoch {epoch}; stopped, last good checkpoint kept")
        # The memory bank goes into the checkpoint (gathered in rank order on rank 0 only, which writes it), so a
        # resumed run clusters exactly the embeddings the uninterrupted run clusters.
        index = dist.gather_to_main(local_memory_index)  # W*M on rank 0, None elsewhere
        embeddings = dist.gather_to_main(local_memory_embeddings.transpose(0, 1))  # W*M x n_banks x D
        gathered = None
        if dist.is_main():
            gathered = {"index": index.cpu(), "embeddings": embeddings.cpu().transpose(0, 1).contiguous()}
        del index, embeddings
        state = {
            "format": ckpt.FORMAT,
            "method": METHOD,
            "arch": args.arch,
            "epoch": epoch + 1,
            "backbone": ckpt.backbone_of(model_without_ddp.backbone),
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "args": vars(args),
            "rng": ckpt.rng_states(),
            "extra": {"memory": gathered},
        }
        keep = (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs
        ckpt.save(state, args.output_dir, keep, latest_only=("memory",))  # kept copies: no bank (rebuilt on resume)
        del gathered, state
        stats["train/embed_spread"] = embedding_spread(local_memory_embeddings[0])  # this process's bank: M x D
        # the epoch's k-means (H x N): cluster sizes, and how many images moved since the last epoch's
        stats.update(cluster_sizes(assignments, args.nmb_prototypes), **assignment_change(assignments, previous))
        previous = assignments
        if knn and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            stats.update(knn(model_without_ddp.backbone))
        log_epoch(args.output_dir, {"epoch": epoch + 1, **stats, f"train/{METHOD}/kmeans_s": kmeans_s})
        hard = (args.adv_weight + args.mix_weight) * (epoch >= args.hard_start_epoch)  # HEXA: chance of the clean
        chance = (1 + hard) * sum(math.log(k) for k in args.nmb_prototypes) / len(args.nmb_prototypes)  # + hard losses
        check_health(stats, chance, epoch + 1, args.warmup_epochs)
    dist.cleanup()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
