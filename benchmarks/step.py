"""Training-step time and peak memory of one method on synthetic in-memory batches.

Runs the method's own `train_one_epoch` on a loader that yields the same batch again and again, so the figure
is the cost of the step itself: no decoding, no augmentation. Prints one JSON line per method and batch. On the
CPU benchmarks/run.py starts one process per method and batch (the peak resident memory is the process's); on a GPU
one process measures them all (the peak GPU memory is reset for each).

    python -m benchmarks.step moco_v2 --arch resnet18 --size 96 --batches 32 --steps 5 --reps 5
    python -m benchmarks.step supervised moco_v2 mochi --batches 32 64     # on a GPU: one process, peaks reset
"""

import argparse
import contextlib
import gc
import io
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402


class RepeatLoader:
    """`steps` times the same batch; a stand-in for a DataLoader (len, iteration, batch_size)."""

    def __init__(self, batch, steps, batch_size=None):
        self.batch, self.steps, self.batch_size = batch, steps, batch_size

    def __len__(self):
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


def images(n, size, device):
    return torch.randn(n, 3, size, size, device=device)


def supervised(o, device):
    """The yardstick: one forward-backward of the plain classifier, same arch, resolution and batch."""
    model = torchvision.models.get_model(o.arch, num_classes=1000).to(device)
    fmt = torch.channels_last if o.amp else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    x = images(o.batch, o.size, device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (o.batch,), device=device)

    def epoch(steps):
        model.train()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=o.amp):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        float(loss.detach())  # wait for the device

    return epoch


def moco_family(name, extra, groups=0):
    """moco_v2 and its variants: the script's own MoCo class, optimizer and train_one_epoch. BatchNorm groups: the
    script's --bn-group-size when it divides the batch, else one group; with `groups`, that many per process."""

    def build(o, device):
        mod = __import__(name)
        args = mod.get_args_parser().parse_args(
            ["x", "-a", o.arch, "-b", str(o.batch), "--crop-size", str(o.size), "--moco-k", str(o.queue), "-p",
             "1000000", "--amp", "on" if o.amp else "off", *extra]
        )  # fmt: skip
        args.lr = 0.03 * args.batch_size / 256
        if groups:  # BatchNorm in `groups` groups per process, as one GPU runs the paper's 8 x 32 images
            args.bn_group_size = o.batch // groups
        mochi = (args.mochi_n, args.mochi_s, args.mochi_s_prime) if name == "mochi" else ()
        bn_group = args.bn_group_size if args.bn_group_size and o.batch % args.bn_group_size == 0 else o.batch
        model = mod.MoCo(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, bn_group, *mochi)
        if args.compile:  # as main(): both encoders, in place
            model.encoder_q.compile(), model.encoder_k.compile()
        views = [images(o.batch, o.size, "cpu") for _ in range(2)]
        batch = (views, torch.zeros(o.batch, dtype=torch.long))
        model, optimizer = _wrap(model, model.encoder_q.parameters(), args, device, torch.optim.SGD)

        def epoch(steps):
            with contextlib.redirect_stdout(io.StringIO()):
                mod.train_one_epoch(model, RepeatLoader(batch, steps), optimizer, 0, args, device)

        return epoch

    return build


def dcluster_family(name, extra=()):
    """deepcluster_v2 and hexa_dcluster: the script's model, LARS, schedule and train_one_epoch, with the memory
    bank and the assignments in place (the per-epoch k-means is timed by benchmarks/kmeans.py)."""

    def build(o, device):
        mod = __import__(name)
        small = max(16, round(o.size * 96 / 224))  # the 96-px crops, scaled with --size
        args = mod.get_args_parser().parse_args(
            ["x", "-a", o.arch, "-b", str(o.batch), "--size-crops", str(o.size), str(small), "-p", "1000000",
             "--amp", "on" if o.amp else "off", *extra]
        )  # fmt: skip
        args.lr = 4.8 * args.batch_size / 4096
        model = mod.DeepClusterV2(args.arch, args.feat_dim, args.hidden_mlp, args.nmb_prototypes)
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.compile:  # as main(): the trunk, in place
            model.backbone.compile()
        views = [images(o.batch, s, "cpu") for n, s in zip(args.nmb_crops, args.size_crops) for _ in range(n)]
        batch = (torch.arange(o.batch), views)
        model, optimizer = _wrap(model, [p for p in model.parameters() if p.requires_grad], args, device, mod.LARS)
        n_banks, H = len(args.crops_for_assign), len(args.nmb_prototypes)
        assignments = torch.stack([torch.randint(k, (o.batch,)) for k in args.nmb_prototypes]).to(device)  # H x N

        def epoch(steps):
            memory = (torch.zeros(steps * o.batch, dtype=torch.long, device=device),
                      torch.zeros(n_banks, steps * o.batch, args.feat_dim, device=device))  # fmt: skip
            schedule = [args.lr] * steps
            loader = RepeatLoader(batch, steps, o.batch)
            with contextlib.redirect_stdout(io.StringIO()):
                mod.train_one_epoch(model, loader, optimizer, schedule, memory, assignments, 0, args, device)

        assert H == assignments.shape[0]
        return epoch

    return build


def _wrap(model, params, args, device, optim):
    """As the scripts' main(): to the device (channels_last under amp on CUDA), the optimizer, then DDP."""
    model = model.to(device)
    args.amp = args.amp == "on"  # as main() resolves it
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim(params, args.lr, momentum=0.9, weight_decay=args.wd)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, optimizer


METHODS = {
    "supervised": supervised,
    "moco_v2": moco_family("moco_v2", []),
    "moco_v2_groups": moco_family("moco_v2", [], groups=4),
    "moco_v2_8groups": moco_family("moco_v2", [], groups=8),
    "moco_v2_compiled": moco_family("moco_v2", ["--compile"]),
    "mochi": moco_family("mochi", ["--mix-start-epoch", "0"]),
    "hexa_moco": moco_family("hexa_moco", ["--hard-start-epoch", "0"]),  # the steps with hard queries
    "deepcluster_v2": dcluster_family("deepcluster_v2"),
    "hexa_dcluster": dcluster_family("hexa_dcluster", ["--hard-start-epoch", "0", "--adv-weight", "1"]),  # both kinds
    "deepcluster_v2_compiled": dcluster_family("deepcluster_v2", ["--compile"]),
}


# What a step should cost, in forwards F of one batch at the crop size (a backward ~ 2 F; the attack's backward only
# computes input gradients, ~ 1 F): the yardstick of the profile.
ARITHMETIC = {
    "supervised": (3, "fwd+bwd 3F"),
    "moco_v2": (4, "query fwd+bwd 3F + key fwd 1F"),
    "moco_v2_groups": (4, "as moco_v2"),
    "moco_v2_8groups": (4, "as moco_v2"),
    "moco_v2_compiled": (4, "as moco_v2"),
    "deepcluster_v2_compiled": (3 * (2 + 6 * (96 / 224) ** 2), "as deepcluster_v2"),
    "mochi": (4, "as moco_v2, + mixing (small)"),
    "hexa_moco": (12, "keys 1F + attack 2F + 3 queries x 3F"),
    "deepcluster_v2": (3 * (2 + 6 * (96 / 224) ** 2), "3F x (2 + 6 x 0.18) crops"),
    "hexa_dcluster": (
        3 * (2 + 6 * (96 / 224) ** 2) + 2 * 2 + 4 * 3,
        "as deepcluster_v2 + attack 2 x 2F + 4 hard crops x 3F",
    ),
}
FAMILIES = [  # operator name fragments -> family, first match wins
    ("convolution", ("conv", "mkldnn_convolution")),
    ("batch norm", ("batch_norm",)),
    ("matmul", ("mm", "einsum", "linear", "matmul", "bmm")),
    ("optimizer", ("_foreach", "sgd", "lars")),
    ("copy / layout", ("copy_", "cat", "clone", "contiguous", "_to_copy", "stack", "index", "repeat", "transpose")),
    ("communication", ("c10d", "gloo", "nccl", "all_gather", "broadcast", "allreduce", "all_reduce")),
    ("pooling / activation", ("pool", "relu", "threshold")),
    ("elementwise / reduction", ("add", "mul", "div", "sub", "sum", "mean", "norm", "exp", "log", "max", "where",
                                 "sign", "clamp", "minimum", "softmax", "nll", "cross_entropy", "fill", "zero")),
]  # fmt: skip


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")


def profile(method: str, o, device: torch.device) -> dict:
    """ms per step by operator family (self time of the aten ops, torch.profiler) over o.steps steps after a
    warm-up; on a GPU, device time."""
    torch.manual_seed(0)
    epoch = METHODS[method](o, device)
    epoch(2)
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    with torch.profiler.profile(activities=acts) as prof:
        epoch(o.steps)
    out = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and not e.key.startswith(("ProfilerStep", "autograd::engine", "Optimizer.")):
            out[family(e.key)] = out.get(family(e.key), 0.0) + t / 1e3 / o.steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


BASE = {"mochi": "moco_v2", "hexa_moco": "moco_v2", "hexa_dcluster": "deepcluster_v2"}
BASE.update({m: m.split("_v2")[0] + "_v2" for m in METHODS if m.startswith(("moco_v2_", "deepcluster_v2_"))})


def markdown(rows, memory: str | None = None) -> str:
    """Markdown of measure()'s rows at one batch: ms per step, the ratios to the supervised step and to the base
    beside the ratios the arithmetic (ARITHMETIC) predicts, and, for rows with a profile, ms per step by operator
    family. `memory`: the header of a peak-memory column (rows from one process each), or none."""
    by = {r["method"]: r for r in rows}

    def ratio(r, other):
        if other is None:
            return ""
        f, g = ARITHMETIC[r["method"]][0], ARITHMETIC[other["method"]][0]
        return f"{r['step_s'] / other['step_s']:.2f} ({f / g:.2f})"

    mem = f" {memory} |" if memory else ""
    out = [f"| method | arithmetic, F = a forward of the batch | ms / step (min / max) | img/s |{mem} "
           "/ supervised (arithmetic) | / base (arithmetic) | warm-up (2 steps) |",
           "|---|---|---:|---:|" + "---:|" * (3 + bool(memory))]  # fmt: skip
    for m, r in by.items():
        f, what = ARITHMETIC[m]
        cells = [f"{what}: {f:.1f}F", f"{r['step_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f} / {r['max_s'] * 1e3:.1f})",
                 f"{r['img_s']:.1f}", *([f"{r['peak_gib']:.2f} GiB"] if memory else []),
                 ratio(r, by.get("supervised")) if m != "supervised" else "1.00",
                 ratio(r, by.get(BASE.get(m))), f"{r['warmup_s']:.1f} s"]  # fmt: skip
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    profiled = [r for r in by.values() if "profile_ms" in r]
    families = sorted(
        {k for r in profiled for k in r["profile_ms"]}, key=lambda k: -max(r["profile_ms"].get(k, 0) for r in profiled)
    )
    if profiled:
        out += ["", "| ms / step by operator family | " + " | ".join(families) + " | all |",
                "|---|" + "---:|" * (len(families) + 1)]  # fmt: skip
        for r in profiled:
            p = r["profile_ms"]
            out.append(
                f"| {r['method']} | "
                + " | ".join(f"{p.get(k, 0):.1f}" for k in families)
                + f" | {sum(p.values()):.1f} |"
            )
    return "\n".join(out)


def measure(method: str, o, device: torch.device) -> dict:
    """One method at o.batch images per process: median (min, max) seconds per step over o.reps repetitions of
    o.steps steps after a warm-up, images/s and the peak memory of the timed steps (GPU) or of the process (CPU)."""
    torch.manual_seed(0)
    epoch = METHODS[method](o, device)
    t = time.perf_counter()
    epoch(2)  # warm-up: allocator, cuDNN autotuning, lazy initialisation, torch.compile
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(o.reps):
        t = time.perf_counter()
        epoch(o.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / o.steps)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (includes the Python and torch baseline)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    step_s = statistics.median(times)
    return dict(method=method, batch=o.batch, step_s=step_s, min_s=min(times), max_s=max(times), img_s=o.batch / step_s,
                peak_gib=peak, warmup_s=warmup_s)  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="*", help=f"one or more of {sorted(METHODS)} (on a GPU, one process for all)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[32], help="per-process batches (default 32)")
    p.add_argument("--queue", type=int, default=65536, help="MoCo queue size")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up repetition)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--profile", action="store_true", help="also ms per step by operator family (torch.profiler)")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="bf16, channels_last (auto: on CUDA)")
    p.add_argument(
        "--table", nargs="+", default=None, help="print the markdown of these JSON-lines outputs; run nothing"
    )
    o = p.parse_args()
    if o.table:
        print(markdown([json.loads(line) for path in o.table for line in open(path) if line.startswith("{")]))
        return
    if not o.methods or set(o.methods) - set(METHODS):
        p.error(f"give one or more methods of {sorted(METHODS)}, or --table")
    device = dist.init_distributed(o.device)
    o.amp = o.amp == "on" or (o.amp == "auto" and device.type == "cuda")
    for method in o.methods:
        for batch in o.batches:
            o.batch = batch
            row = measure(method, o, device)
            if o.profile:
                row["profile_ms"] = profile(method, o, device)
            print(json.dumps(row), flush=True)
            gc.collect()  # the method's model and optimizer go before the next one's peak is measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dist.cleanup()


if __name__ == "__main__":
    main()
