"""Semi-supervised (1 %, 10 % of the labels) and full fine-tuning of a pretrained trunk plus a new classifier.

The SwAV-repository protocol (eval_semisup.py): SGD momentum 0.9, wd 0, 20 epochs, lr x0.2 at 12 and 16, global
batch 256, trunk/head lr 0.02/5 for 1 %, 0.01/0.2 for 10 % (our choice for 100 %: 0.01/0.1). Top-1/top-5 on
the whole validation set. Reads the same checkpoints as lincls.py, strictly.
Base: lincls.py. Deltas:
  1. the training images: a SimCLR subset list (--subset-file) or a seeded class-balanced draw (--labels-perc),
     written to OUTPUT_DIR/subset.txt (common/subsets.py);
  2. the whole network trains, in train mode (BatchNorm statistics update; SyncBN on CUDA): no frozen trunk,
     no sanity check;
  3. two lrs (trunk --lr, head --lr-head) set by --labels-perc, decayed by --gamma at --schedule.

    python finetune.py DATA --pretrained runs/moco_v2/checkpoint.pth --labels-perc 1 --subset-file 1percent.txt
    torchrun --nproc_per_node=8 finetune.py DATA --pretrained runs/moco_v2/checkpoint.pth --labels-perc 10
"""

import argparse
import math
import os

import torch
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

from common import ckpt, dist, subsets
from common.cli import UserError, run
from common.data import ImageFolder, eval_loader, train_loader
from common.meters import Progress, log_epoch
from common.views import eval_train_view, eval_val_view

METHOD = "finetune"
ARCHS = sorted(n for n in torchvision.models.list_models(torchvision.models) if "resne" in n)
RECIPES = {  # per --labels-perc: trunk lr, head lr (SwAV repository; 100 % is our choice)
    1: dict(lr=0.02, lr_head=5.0),
    10: dict(lr=0.01, lr_head=0.2),
    100: dict(lr=0.01, lr_head=0.1),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="ImageNet-style root with DATA/train and DATA/val")
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, help="torchvision ResNet (default resnet50)")
    p.add_argument("--epochs", type=int, default=20, help="total epochs (default 20)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="global batch over all processes (default 256)")
    p.add_argument("--lr", type=float, default=None, help="trunk lr (default: 0.02, 0.01, 0.01 for 1, 10, 100 %%)")
    p.add_argument("--lr-head", type=float, default=None, help="fc lr (default: 5, 0.2, 0.1 for 1, 10, 100 %%)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay (default 0)")
    p.add_argument("--cos", action=argparse.BooleanOptionalAction, default=False, help="cosine lr (default: steps)")
    p.add_argument("--schedule", type=int, nargs="*", default=[12, 16], help="lr x--gamma at these epochs (--no-cos)")
    p.add_argument("--gamma", type=float, default=0.2, help="lr factor at each --schedule epoch (default 0.2)")
    p.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process (default 8)")
    p.add_argument("--crop-size", type=int, default=224, help="side of the training and validation crops")
    p.add_argument("--seed", type=int, default=0, help="seed; process r uses seed + r (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: CUDA if available")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="bf16, channels_last (auto: on CUDA)")
    p.add_argument("--output-dir", default=f"runs/{METHOD}", help=f"checkpoints and log.jsonl (default runs/{METHOD})")
    p.add_argument("--resume", nargs="?", const="latest", help="checkpoint path; alone: the latest in --output-dir")
    p.add_argument("--save-freq", type=int, default=10, help="keep checkpoint_<epoch>.pth every N epochs (default 10)")
    p.add_argument("-p", "--print-freq", type=int, default=10, help="progress line every N steps (default 10)")
    # evaluation
    p.add_argument("--pretrained", default=None, help="pretraining checkpoint: ours, public MoCo or SwAV-repo")
    p.add_argument("--labels-perc", type=int, default=10, choices=sorted(RECIPES), help="%% of labels (default 10)")
    p.add_argument("--subset-file", default=None, help="SimCLR list of training file names (default: seeded draw)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only validate the --resume checkpoint")
    return p


def adjust_learning_rate(optimizer, epoch: int, args) -> float:
    """Set once per epoch: cosine to 0, or x--gamma at each --schedule milestone (SwAV repository), for the
    trunk (args.lr) and the head (args.lr_head) alike; returns the trunk's lr."""
    if args.cos:
        scale = 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    else:
        scale = args.gamma ** sum(epoch >= m for m in args.schedule)
    for group, lr in zip(optimizer.param_groups, (args.lr, args.lr_head)):
        group["lr"] = lr * scale
    return args.lr * scale


def train_one_epoch(model, loader, optimizer, epoch: int, args, device) -> dict:
    # The whole network trains, BatchNorm statistics included (synchronised over processes on CUDA).
    model.train()
    progress = Progress(epoch, len(loader), args.batch_size, args.print_freq)
    fmt = torch.channels_last if args.amp else torch.contiguous_format
    for i, (images, target) in enumerate(loader):
        progress.data_loaded()
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            output = model(images)
        loss = F.cross_entropy(output.float(), target)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        acc1 = (output.argmax(dim=1) == target).float().mean() * 100
        progress.step(i, loss=loss, acc1=acc1)
    return progress.summary()


@torch.no_grad()
def validate(model, loader, args, device) -> dict:
    """Top-1 / top-5 over the whole validation set (each process takes a disjoint share, summed)."""
    model.eval()
    fmt = torch.channels_last if args.amp else torch.contiguous_format
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    for images, target in loader:
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            output = model(images).float()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5 == target[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(output, target, reduction="sum"),
                hits[:, 0].sum(),
                hits.sum(),
                torch.tensor(len(target), device=device),
            ]
        ).double()
    loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()
    return {"val/loss": loss / n, "val/acc1": 100 * top1 / n, "val/acc5": 100 * top5 / n}


def main(args):
    # ============ setup ============
    device = dist.init_distributed(args.device)
    args.amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")  # bf16 autocast, channels_last
    ckpt.prepare_output_dir(args.output_dir, args.resume)
    resume_path = ckpt.resolve_resume(args.resume, args.output_dir)
    ckpt.seed_all(args.seed + dist.rank())
    for key, value in RECIPES[args.labels_perc].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.evaluate and not resume_path:
        raise UserError("--evaluate needs --resume with a finetune checkpoint")
    if not args.pretrained and not resume_path:
        raise UserError("--pretrained is required (a pretraining checkpoint)")
    dist.print0(f"{METHOD}: {dist.world_size()} process(es) on {device}; {vars(args)}")
    if args.batch_size != 256:  # as in the upstream scripts: no linear scaling rule
        dist.print0(
            f"note: the lr of this recipe is fixed (lr {args.lr:g} at batch 256); --batch-size is {args.batch_size}"
        )

    # ============ data ============
    train_set = ImageFolder(os.path.join(args.data, "train"), eval_train_view(args.crop_size))
    if args.subset_file or args.labels_perc < 100:  # the labelled images only: a SimCLR list or a seeded draw
        subsets.select(train_set, args.subset_file, args.labels_perc, args.seed)
        subsets.write(os.path.join(args.output_dir, "subset.txt"), train_set)
        dist.print0(f"training on {len(train_set)} labelled images, listed in {args.output_dir}/subset.txt")
    val_set = ImageFolder(os.path.join(args.data, "val"), eval_val_view(args.crop_size))
    if val_set.classes != train_set.classes:
        raise UserError(f"{args.data}/val and {args.data}/train do not have the same class folders")
    loader = train_loader(train_set, args.batch_size, args.workers, args.seed, device)
    val_loader = eval_loader(val_set, args.batch_size, args.workers, device)

    # ============ model ============
    model = torchvision.models.get_model(args.arch, num_classes=len(train_set.classes))
    reference = ckpt.load_trunk(args.pretrained, args.arch) if args.pretrained else None
    if reference is not None:
        model.load_state_dict(reference, strict=False)  # strictness checked in load_trunk: only fc is missing
    torch.nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(model.fc.bias)
    model = model.to(device)
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model

    # ============ optimizer ============
    trunk = [p for name, p in model.named_parameters() if not name.startswith("fc.")]
    params = [{"params": trunk, "lr": args.lr}, {"params": model.fc.parameters(), "lr": args.lr_head}]
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.wd)

    # ============ resume ============
    start_epoch, best_acc1 = 0, 0.0
    if resume_path:
        state = ckpt.load(resume_path)
        ckpt.check_kind(state, resume_path, METHOD)
        ckpt.load_state(model_without_ddp, state["model"], resume_path, state["args"])
        ckpt.load_optimizer(optimizer, state["optimizer"], resume_path)
        start_epoch, best_acc1 = state["epoch"], state["extra"]["best_acc1"]
        if not ckpt.restore_rng(state["rng"]):
            dist.print0("note: the number of processes changed; RNG states not restored")
        dist.print0(f"resumed from {resume_path} at epoch {start_epoch}")
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if args.evaluate:
        stats = validate(model, val_loader, args, device)
        dist.print0(" ".join(f"{k} {v:.3f}" for k, v in stats.items()))
        dist.cleanup()
        return stats

    # ============ training loop ============
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        lr = adjust_learning_rate(optimizer, epoch, args)
        stats = train_one_epoch(model, loader, optimizer, epoch, args, device)
        if not math.isfinite(stats["train/loss"]):
            raise UserError(f"the loss is not finite in epoch {epoch}; stopped, last good checkpoint kept")
        stats.update(validate(model, val_loader, args, device))
        best_acc1 = max(best_acc1, stats["val/acc1"])
        state = {
            "format": ckpt.FORMAT,
            "method": METHOD,
            "arch": args.arch,
            "epoch": epoch + 1,
            "backbone": ckpt.backbone_of(model_without_ddp),
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "args": vars(args),
            "rng": ckpt.rng_states(),
            "extra": {"best_acc1": best_acc1},
        }
        ckpt.save(state, args.output_dir, keep=(epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs)
        log_epoch(args.output_dir, {"epoch": epoch + 1, "train/lr": lr, **stats, "val/best_acc1": best_acc1})
    dist.cleanup()
    return stats


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
