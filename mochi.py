"""MoCHi: MoCo v2 plus hard negative mixing, MoCHi(N, s, s'): harder negatives synthesised per query.

Paper: Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus, "Hard Negative Mixing for Contrastive Learning",
NeurIPS 2020, arXiv:2010.01028.
Base: moco_v2.py. The deltas, each tagged `# MoCHi:` in the code:
  1. Per query, its N hardest queue negatives, ranked by the logits already computed (Sec. 4).
  2. s synthetic negatives normalize(a n_i + (1-a) n_j), n_i, n_j random among those N, a ~ U(0, 1).
  3. s' synthetic negatives normalize(b q + (1-b) n_j), q detached, b ~ U(0, 0.5).
  4. Synthetics carry no gradient, join only their own query's logits (N x (1+K+s+s'), positive still
     column 0) and never enter the queue.
  5. Mixing from epoch --mix-start-epoch on; before, or with s = s' = 0, a step is exactly MoCo v2's.
  6. Logs train/mochi/hardest_neg_sim and train/mochi/synth_above_pos.

    python mochi.py DATA                          # one process: one GPU, or the CPU for debugging
    torchrun --nproc_per_node=8 mochi.py DATA     # one node, 8 GPUs, global batch 256
"""

import argparse
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
from common.views import TwoCrops, moco_v2_view

METHOD = "mochi"  # MoCHi: names the output folder and the checkpoint kind
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
    # MoCHi: MoCHi(N, s, s') and the warm-up; defaults (1024, 1024, 128) from epoch 15 are our choice, see README
    p.add_argument("--mochi-n", type=int, default=1024, help="N: hardest queue negatives per query (default 1024)")
    p.add_argument("--mochi-s", type=int, default=1024, help="s: mixes of two hard negatives per query (default 1024)")
    p.add_argument("--mochi-s-prime", type=int, default=128, help="s': mixes of query and hard negative (default 128)")
    p.add_argument("--mix-start-epoch", type=int, default=15, help="mix from this epoch on, 0-based (default 15)")
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
        n_hard: int = 1024,  # MoCHi: N, s, s'
        s: int = 1024,
        s_prime: int = 128,
    ):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.n_hard, self.s, self.s_prime = n_hard, s, s_prime  # MoCHi: MoCHi(N, s, s')
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

    # MoCHi: hard negative mixing (H = n_hard, the paper's N; S = s + s')
    @torch.no_grad()
    def _mix_hard_negatives(self, q, l_neg):
        """Sec. 4 of the paper: for each query, s negatives mixing two of its H hardest queue negatives (a ~ U(0, 1))
        and s' mixing the query itself with one of them (b ~ U(0, 0.5)); unit vectors, detached, for this query
        only, never enqueued. q: N x C, l_neg: N x K negative logits. Returns N x S x C, the s pair mixes first."""
        n, s, S = q.shape[0], self.s, self.s + self.s_prime
        hard = l_neg.topk(self.n_hard, dim=1).indices  # queue columns of each query's H hardest: N x H
        pick = hard.gather(1, torch.randint(self.n_hard, (n, 2 * S), device=q.device))  # 2 of them per mix: N x 2S
        pairs = self.queue.T[pick].view(n, S, 2, -1)  # (n_i, n_j): N x S x 2 x C
        first = torch.cat([pairs[:, :s, 0], q[:, None].expand(-1, S - s, -1)], dim=1)  # n_i or q: N x S x C
        coef = torch.rand(n, S, 1, device=q.device)  # a, then b = coef / 2: N x S x 1
        coef[:, s:] *= 0.5
        return F.normalize(coef * first + (1 - coef) * pairs[:, :, 1], dim=2)  # N x S x C

    def forward(self, im_q, im_k, mix: bool = False):  # MoCHi: mix appends S synthetic logits: N x (1+K+S)
        """im_q, im_k: two views of the same N images. Returns logits N x (1+K) (positive in column 0) and
        labels N (zeros). Side effects: the momentum update before the keys, the enqueue after the logits."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)  # queries: N x C
        k = self.keys(im_k)  # keys: N x C, no gradient
        logits = self.contrast(q, k)  # N x (1+K)
        if mix and self.s + self.s_prime > 0:  # MoCHi: append this query's synthetic negatives, in fp32
            with torch.autocast(q.device.type, enabled=False):
                h = self._mix_hard_negatives(q, logits[:, 1:])  # N x S x C, no gradient
                logits = torch.cat([logits, torch.einsum("nc,nsc->ns", q, h) / self.T], dim=1)  # N x (1+K+S)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # the positive is class 0
        self._dequeue_and_enqueue(k)
        return logits, labels


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
    for i, (images, _) in enumerate(loader):
        progress.data_loaded()
        im_q, im_k = (x.to(device, non_blocking=True, memory_format=fmt) for x in images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits, labels = model(im_q, im_k, mix=epoch >= args.mix_start_epoch)  # MoCHi: after the warm-up
        loss = F.cross_entropy(logits, labels)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        acc1 = (logits[:, : 1 + args.moco_k].argmax(dim=1) == labels).float().mean() * 100  # MoCHi: of the 1 + K real
        # MoCHi: cosine of the hardest real negative; fraction of synthetic logits above the positive (0 before mixing)
        pos, neg, syn = logits.detach().split([1, args.moco_k, logits.shape[1] - 1 - args.moco_k], dim=1)
        mochi = {
            "mochi/hardest_neg_sim": neg.amax(dim=1).mean() * args.moco_t,
            "mochi/synth_above_pos": (syn > pos).float().mean().nan_to_num(),
            "mochi/acc1_all": (logits.argmax(dim=1) == labels).float().mean() * 100,  # of all 1 + K + s + s'
        }
        progress.step(i, loss=loss, acc1=acc1, **mochi)
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
    if not 0 < args.mochi_n <= args.moco_k or min(args.mochi_s, args.mochi_s_prime) < 0:  # MoCHi: N within the queue
        raise UserError(f"MoCHi needs 1 <= --mochi-n <= --moco-k {args.moco_k} and --mochi-s, --mochi-s-prime >= 0")
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
    mochi = (args.mochi_n, args.mochi_s, args.mochi_s_prime)  # MoCHi: N, s, s'
    model = MoCo(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, bn_group, *mochi).to(device)
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
        # MoCHi: chance is ln(1 + K + s + s') once the synthetic logits join
        width = 1 + args.moco_k + (args.mochi_s + args.mochi_s_prime) * (epoch >= args.mix_start_epoch)
        check_health(stats, math.log(width), epoch + 1, warmup_epochs=5)
    dist.cleanup()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
