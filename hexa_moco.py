"""HEXA-MoCo: MoCo v2 trained also on hard queries, adversarial and cut-mixed, with the keys unchanged.

Paper: Li, Li, Zhang, Peng, Zhou, Gao, "Self-supervised Pre-training with Hard Examples Improves Visual
Representations" (HEXA), arXiv:2012.13493. It publishes no attack, mixing or schedule settings that we could read:
every default here is our choice, measured on small generated data only (docs/methods/hexa_moco.md, BENCHMARKS.md).
Base: moco_v2.py; every block that differs is tagged `# HEXA:`. Deltas:
  1. The keys are computed first (MoCo.keys: momentum update, shuffle-BN), so the attack can aim at them.
  2. Adversarial query: PGD in [0,1] pixels under an L-inf budget (1 step, eps = step = 2/255) on the query's MoCo
     loss; input gradient only, BatchNorm statistics untouched (adversarial_view).
  3. Cut-mixed query: CutMix with a partner image of the batch, loss lambda * l(own key) + (1 - lambda) * l(partner's).
  4. Hard queries from --hard-start-epoch on (default: after 20 % of the epochs). From the first epoch they stalled
     the clean loss and cost 10 points of linear probe on the glyphs; from 20 % on they gained 5.0 points over MoCo
     v2 on average over 3 small generated datasets x 2 seeds (-0.7 to +10.9). ImageNet: not measured.
  5. All queries in the one DDP forward, view after view, so each BatchNorm group holds one kind of query.
     Loss = clean + --adv-weight * adversarial + --mix-weight * cut-mixed; a weight of 0 skips its computation.

    python hexa_moco.py DATA                          # one process: one GPU, or the CPU for debugging
    torchrun --nproc_per_node=8 hexa_moco.py DATA     # one node, 8 GPUs, global batch 256
"""

import argparse
import contextlib  # HEXA: running_stats_frozen
import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

from common import ckpt, dist
from common.cli import UserError, run
from common.data import ImageFolder, train_loader
from common.meters import Progress, log_epoch
from common.monitor import check_health, embedding_spread, knn_monitor
from common.views import MEAN, STD, TwoCrops, moco_v2_view  # HEXA: MEAN, STD: the attack works on pixels

METHOD = "hexa_moco"  # HEXA: the name in checkpoints and output folders
ARCHS = sorted(n for n in torchvision.models.list_models(torchvision.models) if "resne" in n)
VIEWS = ["auto", "pil", "device"]  # auto: device on CUDA, pil on the CPU (common/device_views.py)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="ImageNet-style root; DATA/train/<class>/*.JPEG is read")
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, help="torchvision ResNet (default resnet50)")
    p.add_argument("--epochs", type=int, default=200, help="total epochs (default 200)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="global batch over all processes (default 256)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 0.03 x batch-size / 256)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (default 1e-4)")
    p.add_argument("--cos", action=argparse.BooleanOptionalAction, default=True, help="half-cosine lr per epoch")
    p.add_argument("--schedule", type=int, nargs="*", default=[120, 160], help="lr x0.1 at these epochs (--no-cos)")
    p.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process (default 8)")
    p.add_argument("--views", default="auto", choices=VIEWS, help="pil (in workers) or device; auto: device on CUDA")
    p.add_argument("--crop-size", type=int, default=224, help="side of the random resized crops (default 224)")
    p.add_argument("--crop-min-scale", type=float, default=0.2, help="smallest crop area (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed; process r uses seed + r (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: CUDA if available")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="bf16, channels_last (auto: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders (off: unmeasured on a GPU)")
    p.add_argument("--output-dir", default=f"runs/{METHOD}", help=f"checkpoints and log.jsonl (default runs/{METHOD})")
    p.add_argument("--resume", nargs="?", const="latest", help="checkpoint path; alone: the latest in --output-dir")
    p.add_argument("--save-freq", type=int, default=10, help="keep checkpoint_<epoch>.pth every N epochs (default 10)")
    p.add_argument("-p", "--print-freq", type=int, default=10, help="progress line every N steps (default 10)")
    p.add_argument("--knn-every", type=int, default=5, help="kNN monitor every N epochs and at the end; 0: off (5)")
    # MoCo v2
    p.add_argument("--moco-dim", type=int, default=128, help="feature dimension C (default 128)")
    p.add_argument("--moco-k", type=int, default=65536, help="queue size K, a multiple of --batch-size (default 65536)")
    p.add_argument("--moco-m", type=float, default=0.999, help="key encoder momentum (default 0.999)")
    p.add_argument("--moco-t", type=float, default=0.2, help="softmax temperature (default 0.2)")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True, help="2-layer MLP head (MoCo v2)")
    p.add_argument("--bn-group-size", type=int, default=32, help="images per BatchNorm group (32; 0: all per process)")
    # HEXA: hard queries; eps and step in units of 1/255 of the [0, 1] pixel range
    p.add_argument("--adv-weight", type=float, default=1.0, help="adversarial queries' loss weight; 0: no attack")
    p.add_argument("--adv-eps", type=float, default=2.0, help="L-inf budget of the attack, x 1/255 (default 2)")
    p.add_argument("--adv-step", type=float, default=2.0, help="attack step size, x 1/255 (default 2)")
    p.add_argument("--adv-steps", type=int, default=1, help="attack (PGD) steps (default 1)")
    p.add_argument("--adv-random-start", action=argparse.BooleanOptionalAction, default=False, help="PGD random start")
    p.add_argument("--mix-weight", type=float, default=1.0, help="cut-mixed queries' loss weight; 0: no CutMix")
    p.add_argument(
        "--hard-start-epoch", type=int, default=None, help="hard queries from this epoch (20 %% of --epochs)"
    )
    return p


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from groups of `group_size` consecutive images of the batch.

    Shuffle-BN only hides a query's own key from its BatchNorm statistics when the key batch is spread over several
    BatchNorm batches: the paper's 8 GPUs x 32 images. With groups, W processes x G groups normalise like W*G processes
    of one group each (tested), so one GPU trains the 8-GPU method. In training each group is normalised with its own
    mean and variance, and the running statistics move towards the mean of the groups' statistics (BatchNorm's
    momentum rule); in eval mode, and for a batch of exactly one group, it is BatchNorm2d. Same parameters and buffers
    as BatchNorm2d: checkpoints load into a plain torchvision ResNet.
    """

    def __init__(self, num_features: int, group_size: int = 0, **kwargs):
        super().__init__(num_features, **kwargs)
        self.group_size = group_size  # 0: the whole batch is one group

    def forward(self, x):
        n, g = x.shape[0], self.group_size
        if not self.training or not g or n == g:
            return super().forward(x)
        if n % g:
            raise ValueError(f"a batch of {n} images does not split into BatchNorm groups of {g}")
        # One batch_norm call for all G groups: the groups side by side in the channel dimension (g x G*C), with the
        # affine parameters and running statistics repeated G times (a plain view would group strided images).
        G, C, hw = n // g, x.shape[1], x.shape[2:]
        y = x.view(G, g, C, *hw).transpose(0, 1).reshape(g, G * C, *hw)  # image j of group i: row j, channels i*C..
        track = self.track_running_stats  # off: batch statistics only, running statistics left as they are
        mean, var = (self.running_mean.repeat(G), self.running_var.repeat(G)) if track else (None, None)
        y = F.batch_norm(y, mean, var, self.weight.repeat(G), self.bias.repeat(G), True, self.momentum, self.eps)
        if track:  # the groups' momentum updates, averaged
            self.num_batches_tracked.add_(1)
            with torch.no_grad():
                self.running_mean.copy_(mean.view(G, C).mean(0))
                self.running_var.copy_(var.view(G, C).mean(0))
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y.view(g, G, C, *hw).transpose(0, 1).reshape(x.shape).contiguous(memory_format=fmt)  # n x C x H x W


class MoCo(nn.Module):
    """A query encoder, a momentum key encoder and a queue of K keys (MoCo, Sec. 3.2 and Algorithm 1).

    N = per-process batch, C = feature dimension, K = queue size, W = number of processes, G = BatchNorm groups
    per process (N / bn_group_size).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.2,
        mlp: bool = True,
        bn_group_size: int = 0,
    ):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        # torchvision ResNets whose fc maps the pooled features to C; MoCo v2 puts a hidden layer in front:
        # fc = Linear(d, d), ReLU, Linear(d, C), no BatchNorm (keys fc.0.* and fc.2.*).
        # BatchNorm in groups of bn_group_size images (SplitBatchNorm2d) in both encoders.
        norm_layer = functools.partial(SplitBatchNorm2d, group_size=bn_group_size)
        self.encoder_q = torchvision.models.get_model(arch, num_classes=dim, norm_layer=norm_layer)
        self.encoder_k = torchvision.models.get_model(arch, num_classes=dim, norm_layer=norm_layer)
        if mlp:
            d = self.encoder_q.fc.in_features
            self.encoder_q.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), self.encoder_k.fc)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)  # same start; the key encoder is never trained by gradients
            p_k.requires_grad = False
        # The queue of keys, C x K, columns unit vectors; ptr is where the next batch of keys is written.
        # Buffers, so both live in state_dict and come back on resume.
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only (Eq. 2): two fused calls over all tensors, the
        same arithmetic as a loop of mul_ and add_ per parameter."""
        p_k, p_q = list(self.encoder_k.parameters()), list(self.encoder_q.parameters())
        torch._foreach_mul_(p_k, self.m)
        torch._foreach_add_(p_k, p_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Write the keys of all processes (W*N x C, rank order) over the oldest ones; ptr advances mod K."""
        keys = dist.concat_all_gather(keys)  # WN x C
        B = keys.shape[0]
        assert self.K % B == 0, "queue size must be a multiple of the global batch"  # checked in main() too
        # Positions ptr, ..., ptr+B-1 (mod K), computed on the device: no host sync for the pointer.
        idx = (self.queue_ptr + torch.arange(B, device=keys.device)) % self.K
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(B).remainder_(self.K)

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """Shuffle-BN (Sec. 3.3): give each process a random slice of the global key batch, so the key
        encoder's BatchNorm statistics do not come from the same images as the queries'. The permutation runs over
        the whole global batch, so each of the W*G key groups holds random images, at any W (also 1). Returns this
        process's shuffled slice (N x ...) and the permutation that undoes it (WN)."""
        x_all = dist.concat_all_gather(x)  # WN x 3 x H x W
        idx_shuffle = torch.randperm(x_all.shape[0]).to(x.device)
        dist.broadcast(idx_shuffle, src=0)  # one permutation for all processes: rank 0's
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(dist.world_size(), -1)[dist.rank()]  # N
        return x_all[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        """Undo _batch_shuffle_ddp on the keys: this process gets back its own images' keys, in order."""
        x_all = dist.concat_all_gather(x)  # WN x C
        idx_this = idx_unshuffle.view(dist.world_size(), -1)[dist.rank()]  # N
        return x_all[idx_this]

    @torch.no_grad()
    def keys(self, im_k):
        """The momentum update (once per step), then the keys of the key views im_k through shuffle-BN: N x C."""
        self._momentum_update_key_encoder()
        im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
        k = F.normalize(self.encoder_k(im_k).float(), dim=1)  # keys: N x C
        return self._batch_unshuffle_ddp(k, idx_unshuffle)

    def contrast(self, q, k):
        """q, k: N x C unit vectors. Returns logits N x (1+K): q against its positive k (column 0) and the queue."""
        with torch.autocast(q.device.type, enabled=False):  # logits in fp32, also under bf16 autocast
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: N x 1
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())  # negative logits: N x K
            return torch.cat([l_pos, l_neg], dim=1) / self.T  # N x (1+K)

    def forward(self, im_q, k, im_adv=None, im_mix=None, partner=None):  # HEXA: keys from self.keys, hard queries
        """im_q: N query views; k: the keys of their key views, from self.keys (HEXA: before the forward).
        HEXA: im_adv, im_mix: N adversarial, N cut-mixed queries, or None; partner: N, whose key is the second
        positive of each cut-mixed query. Returns the clean logits N x (1+K) (positive in column 0), labels N
        (zeros) and the hard logits: "adv" N x (1+K), "mix" 2 x N x (1+K) (own key, partner's key) when given.
        Side effect: the enqueue of the clean keys after the logits."""
        # HEXA: all queries in the one DDP forward, view after view (V = 1, 2 or 3), so each BatchNorm group holds
        # one kind of query
        n, views = im_q.shape[0], [x for x in (im_q, im_adv, im_mix) if x is not None]
        q = F.normalize(self.encoder_q(torch.cat(views)).float(), dim=1)  # queries: VN x C, view after view
        logits = self.contrast(q[:n], k)  # N x (1+K)
        hard = {}
        if im_adv is not None:
            hard["adv"] = self.contrast(q[n : 2 * n], k)  # N x (1+K)
        if im_mix is not None:  # against the own key, then the partner's: only the positive logit differs
            mix = self.contrast(q[-n:], k)  # N x (1+K)
            l_partner = (q[-n:] * k[partner]).sum(dim=1, keepdim=True) / self.T  # N x 1, fp32 (not an autocast op)
            hard["mix"] = torch.stack([mix, torch.cat([l_partner, mix[:, 1:]], dim=1)])  # 2 x N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # the positive is class 0
        self._dequeue_and_enqueue(k)
        return logits, labels, hard


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


def adjust_learning_rate(optimizer, epoch: int, args) -> float:
    """Set once per epoch: half-cosine from args.lr to 0 (MoCo v2), or x0.1 at each --schedule milestone."""
    if args.cos:
        lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    else:
        lr = args.lr * 0.1 ** sum(epoch >= m for m in args.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_one_epoch(model, loader, optimizer, epoch: int, args, device) -> dict:
    model.train()
    progress = Progress(epoch, len(loader), args.batch_size, args.print_freq)
    fmt = torch.channels_last if args.amp else torch.contiguous_format
    moco = model.module  # HEXA: the unwrapped MoCo: the keys and the attack run outside DDP's forward
    for i, (images, _) in enumerate(loader):
        progress.data_loaded()
        im_q, im_k = (x.to(device, non_blocking=True, memory_format=fmt) for x in images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            # HEXA: keys first (no gradient), then the hard queries, then the one DDP forward of all queries
            k = moco.keys(im_k)  # N x C
            im_adv = im_mix = partner = None
            on = epoch >= args.hard_start_epoch  # hard queries from --hard-start-epoch on
            if args.adv_weight > 0 and on:
                zeros = torch.zeros(k.shape[0], dtype=torch.long, device=device)  # the positive is class 0

                def loss_fn(x):  # the MoCo loss of queries x against their own keys and the queue
                    return F.cross_entropy(moco.contrast(F.normalize(moco.encoder_q(x).float(), dim=1), k), zeros)

                eps, step = args.adv_eps / 255, args.adv_step / 255
                im_adv = adversarial_view(
                    moco.encoder_q, loss_fn, im_q, eps, step, args.adv_steps, args.adv_random_start
                )
            if args.mix_weight > 0 and on:
                im_mix, partner, lam = cutmix(im_q)
            logits, labels, hard = model(im_q, k, im_adv, im_mix, partner)
        loss = F.cross_entropy(logits, labels)
        hexa = {"hexa/clean_loss": loss} if hard else {}  # HEXA: the clean and hard queries' losses, logged
        if "adv" in hard:
            hexa["hexa/adv_loss"] = F.cross_entropy(hard["adv"], labels)
            loss = loss + args.adv_weight * hexa["hexa/adv_loss"]
        if "mix" in hard:
            own, other = (F.cross_entropy(logits_mix, labels) for logits_mix in hard["mix"])  # own, partner's key
            hexa["hexa/mix_loss"] = lam * own + (1 - lam) * other
            loss = loss + args.mix_weight * hexa["hexa/mix_loss"]

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        acc1 = (logits.argmax(dim=1) == labels).float().mean() * 100
        progress.step(i, loss=loss, acc1=acc1, **hexa)  # HEXA: + the hard queries' losses
    return progress.summary()


def main(args):
    # ============ setup ============
    device = dist.init_distributed(args.device)
    args.amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")  # bf16 autocast, channels_last
    ckpt.prepare_output_dir(args.output_dir, args.resume)
    resume_path = ckpt.resolve_resume(args.resume, args.output_dir)
    ckpt.seed_all(args.seed + dist.rank())
    if args.lr is None:
        args.lr = 0.03 * args.batch_size / 256  # linear scaling rule, 0.03 at batch 256
    if args.moco_k % args.batch_size:
        raise UserError(f"--moco-k {args.moco_k} must be a multiple of the global --batch-size {args.batch_size}")
    # HEXA: the hard-query flags; by default the hard queries start after 20 % of the epochs
    args.hard_start_epoch = round(0.2 * args.epochs) if args.hard_start_epoch is None else args.hard_start_epoch
    if min(args.adv_weight, args.adv_eps, args.adv_step, args.adv_steps, args.mix_weight, args.hard_start_epoch) < 0:
        raise UserError("--adv-*, --mix-weight and --hard-start-epoch must not be negative")
    if args.mix_weight > 0 and args.batch_size < 2 * dist.world_size():  # HEXA: CutMix pairs images of a process
        raise UserError(f"--mix-weight > 0 needs at least 2 images per process; --batch-size is {args.batch_size}")
    dist.print0(f"{METHOD}: {dist.world_size()} process(es) on {device}; {vars(args)}")

    # ============ data ============
    if not 0 < args.crop_min_scale <= 1:
        raise UserError(f"--crop-min-scale {args.crop_min_scale} must be in (0, 1]")
    view = moco_v2_view(args.crop_size, args.crop_min_scale)
    dataset = ImageFolder(os.path.join(args.data, "train"), TwoCrops(view))
    loader = train_loader(dataset, args.batch_size, args.workers, args.seed, device, args.views)
    if args.bn_group_size < 0 or (args.bn_group_size and loader.batch_size % args.bn_group_size):
        raise UserError(
            f"--batch-size {args.batch_size} gives {loader.batch_size} images per process, "
            f"not a multiple of --bn-group-size {args.bn_group_size} (images per BatchNorm group; 0: one per process)"
        )
    # the kNN top-1 of the trunk on DATA/val every --knn-every epochs (common/monitor.py)
    knn = knn_monitor(args, args.crop_size, loader.batch_size, device)

    # ============ model ============
    bn_group = args.bn_group_size or loader.batch_size  # images per BatchNorm group
    model = MoCo(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, bn_group).to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:  # torch.compile of both encoders, in place: the same modules, parameters and checkpoint keys
        model.encoder_q.compile(), model.encoder_k.compile()
    model_without_ddp = model

    # ============ optimizer ============
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)

    # ============ resume ============
    start_epoch = 0
    if resume_path:
        state = ckpt.load(resume_path)
        ckpt.check_kind(state, resume_path, METHOD)
        ckpt.load_state(model_without_ddp, state["model"], resume_path, state["args"])
        ckpt.load_optimizer(optimizer, state["optimizer"], resume_path)
        start_epoch = state["epoch"]
        if not ckpt.restore_rng(state["rng"]):
            dist.print0("note: the number of processes changed; RNG states not restored")
        dist.print0(f"resumed from {resume_path} at epoch {start_epoch}")
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ============ training loop ============
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        lr = adjust_learning_rate(optimizer, epoch, args)
        stats = train_one_epoch(model, loader, optimizer, epoch, args, device)
        if not math.isfinite(stats["train/loss"]):
            raise UserError(f"the loss is not finite in epoch {epoch}; stopped, last good checkpoint kept")
        state = {
            "format": ckpt.FORMAT,
            "method": METHOD,
            "arch": args.arch,
            "epoch": epoch + 1,
            "backbone": ckpt.backbone_of(model_without_ddp.encoder_q),
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "args": vars(args),
            "rng": ckpt.rng_states(),
            "extra": {},
        }
        ckpt.save(state, args.output_dir, keep=(epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs)
        stats["train/embed_spread"] = embedding_spread(model_without_ddp.queue.T)  # the last K keys: K x C
        if knn and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            stats.update(knn(model_without_ddp.encoder_q))
        log_epoch(args.output_dir, {"epoch": epoch + 1, "train/lr": lr, **stats})
        hard = (args.adv_weight + args.mix_weight) * (epoch >= args.hard_start_epoch)  # HEXA: chance of a sum of
        chance = (1 + hard) * math.log(1 + args.moco_k)  # 3 losses once the hard queries start
        check_health(stats, chance, epoch + 1, warmup_epochs=5)
    dist.cleanup()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
