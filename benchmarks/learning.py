"""Evidence that the methods learn: a short pretraining on generated data, then a linear probe of the pretrained
trunk, next to the same probe on a randomly initialised trunk (the lower reference) and on the same trunk trained
supervised on the labels with the same budget (the upper reference), on three kinds of data and several seeds.

Data (`common/synthetic.py`, `benchmarks/datasets.py`): the generated shapes, glyphs and textures. In all three the
class is in the geometry (which shape; which arrangement of strokes; which element, repeated over the image) while
the position, the size, the grey levels, a tint and the background are random: nuisances that the methods' own
augmentations (crops, colour jitter, grey-scale) teach a network to ignore, so a probe on random features does
poorly and a probe on learned features should do clearly better.

Seeds: seed s draws the dataset (images and, for glyphs, the alphabet), the training run (`--seed s`) and the random
trunk's initialisation; the table gives every seed and the mean +- half the range over seeds.

Probe, the same for every trunk: the pooled trunk features of the centre view (the validation transform),
standardised with the training split's statistics; a multinomial logistic regression whose L2 strength is chosen
by 5-fold cross-validation on the training split only (from 1 down to 1e-5, a decade apart), refitted on the whole
training split; top-1 on the held-out split. Nothing is tuned on the held-out split.

Supervised reference: the same arch from scratch, cross-entropy on the labels, with the same crop size, batch,
epochs and training images as the self-supervised runs (SGD, cosine lr; the training view of the repo's linear and
fine-tuning protocols: random resized crop and flip), then the same probe on its trunk.

    python -m benchmarks.learning [--methods moco_v2 ...] [--datasets shapes glyphs textures] [--seeds 0 1] [--epochs N]
    python -m benchmarks.learning --datasets glyphs:classes=12 --seeds 10 11     # a variant, as name:key=value,...
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.datasets import make_image_folder  # noqa: E402
from common.data import ImageFolder  # noqa: E402
from common.views import eval_train_view, eval_val_view  # noqa: E402

ARCH, CROP, BATCH = "resnet18", 32, 64  # BATCH: the supervised reference's; the recipes set their own
# Generated data: 40-px images, 1,500-1,600 training images; 100 held-out images per class (a probe accuracy's
# standard error is then about 2 points).
DATASETS = {
    "shapes": dict(kind="shapes", classes=6, train_per_class=250, val_per_class=100, size=40),
    "glyphs": dict(kind="glyphs", classes=8, train_per_class=200, val_per_class=100, size=40),
    "textures": dict(kind="textures", classes=8, train_per_class=200, val_per_class=100, size=40),
}
SEEDS = (0, 1)
EPOCHS = 30
COMMON = ["-a", ARCH, "-j", "1", "--print-freq", "1000", "--knn-every", "0"]
# One recipe per family for this scale (the investigation table in BENCHMARKS.md): crops of at least half the
# image (at 32 px a 0.2 crop keeps too little of a shape), a queue of 64 (2 batches; 1,500 images make few
# distinct negatives), batch 32 in BatchNorm groups of 16, lr 0.01; two 32-px crops for DeepCluster-v2, lr 1.2,
# 100 prototypes per head.
MOCO = ["-b", "32", "--bn-group-size", "16", "--lr", "0.01", "--moco-k", "64", "--moco-m", "0.99",
        "--crop-size", str(CROP), "--crop-min-scale", "0.5"]  # fmt: skip
DCLUSTER = ["-b", "64", "--nmb-crops", "2", "--size-crops", str(CROP), "--min-scale-crops", "0.5",
            "--max-scale-crops", "1", "--nmb-prototypes", "100", "100", "100", "--hidden-mlp", "512",
            "--kmeans-backend", "torch", "--lr", "1.2", "--final-lr", "0.0012", "--start-warmup", "0.0375",
            "--warmup-epochs", "1"]  # fmt: skip
RECIPES = {
    "moco_v2": MOCO,
    "mochi": [*MOCO, "--mochi-n", "32", "--mochi-s", "32", "--mochi-s-prime", "8", "--mix-start-epoch", "3"],
    "hexa_moco": MOCO,
    "deepcluster_v2": DCLUSTER,
    "hexa_dcluster": DCLUSTER,
}
BASES = ("moco_v2", "deepcluster_v2")


# ============ data ============


def parse_dataset(spec: str) -> tuple[str, dict]:
    """ "glyphs" or "glyphs:classes=12,train_per_class=100" -> (the spec, make_image_folder's keyword arguments)."""
    name, _, rest = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    kwargs = dict(DATASETS[name])
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in kwargs or key == "kind":
            raise ValueError(f"{spec}: {key!r} is not one of {', '.join(k for k in kwargs if k != 'kind')}")
        kwargs[key] = int(value)
    return spec, kwargs


def make_dataset(spec: str, seed: int, root: str) -> str:
    return make_image_folder(root, seed=seed, **parse_dataset(spec)[1])


# ============ trunks ============


def trunk(arch: str, state: dict | None, seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet without fc: randomly initialised under `seed`, or loaded from a backbone state."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch)
    model.fc = torch.nn.Identity()
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def _run_logged(cmd: list, log_path: str, env: dict | None = None) -> None:
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if done.returncode:
        tail = open(log_path).read()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); the end of {log_path}:\n{tail}")


def pretrain(
    method: str, root: str, out: str, epochs: int = EPOCHS, seed: int = 0, extra=(), env=None
) -> tuple[dict, float]:
    """Run `method`.py on root/train with its benchmark recipe plus `extra` flags (later flags win); the script's
    output goes to out/stdout.log. Returns the trunk's state (the checkpoint's "backbone") and the wall seconds."""
    cmd = [sys.executable, os.path.join(ROOT, f"{method}.py"), root, *COMMON, *RECIPES[method], "--epochs", str(epochs)]
    cmd += ["--seed", str(seed), "--save-freq", str(epochs), "--output-dir", out, *extra]
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    _run_logged(cmd, os.path.join(out, "stdout.log"), env)
    elapsed = time.perf_counter() - t
    state = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
    return state["backbone"], elapsed


def supervised(
    root: str,
    epochs: int = EPOCHS,
    seed: int = 0,
    arch: str = ARCH,
    crop: int = CROP,
    batch: int = BATCH,
    workers: int = 1,
    lr: float = 0.05,
    wd: float = 5e-4,
) -> tuple[dict, float]:
    """The upper reference: `arch` from scratch, cross-entropy on the labels of root/train, with the budget of the
    self-supervised runs (crop, batch, epochs, whole batches only). SGD with momentum 0.9, a cosine lr per step.
    Returns the trunk's state (without fc) and the wall seconds."""
    torch.manual_seed(seed)
    dataset = ImageFolder(os.path.join(root, "train"), eval_train_view(crop))
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, num_workers=workers,
                                         generator=g, persistent_workers=workers > 0)  # fmt: skip
    model = torchvision.models.get_model(arch, num_classes=len(dataset.classes))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    t = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    elapsed = time.perf_counter() - t
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, elapsed


# ============ probe ============


@torch.no_grad()
def features(model, root: str, split: str, crop: int = CROP):
    dataset = ImageFolder(os.path.join(root, split), eval_val_view(crop))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    feats, labels = zip(*[(model(x), y) for x, y in loader])
    return torch.cat(feats), torch.cat(labels)


LAMBDAS = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5)  # L2 strengths, strongest first (each fit warm-starts the next)


def _standardise(x_fit, *xs):
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    return [(x - mean) / std for x in (x_fit, *xs)]


def _logreg_path(x, y, classes: int, lambdas, iters: int = 100):
    """Multinomial logistic regression, mean cross-entropy + lam * |W|^2, by L-BFGS for each lam in turn, each
    fit starting from the previous one. Returns [(W, b)] in the order of `lambdas`."""
    W = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    path = []
    for lam in lambdas:
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ W.T + b, y) + lam * W.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        path.append((W.detach().clone(), b.detach().clone()))
    return path


def _accuracy(Wb, x, y) -> float:
    W, b = Wb
    return 100 * ((x @ W.T + b).argmax(1) == y).float().mean().item()


def linear_probe(train, val, folds: int = 5, lambdas=LAMBDAS) -> tuple[float, float, float]:
    """Standardised features, L2-regularised multinomial logistic regression; the L2 strength by stratified k-fold
    cross-validation on the training split (the best mean fold accuracy; a tie goes to the stronger), refitted on
    the whole training split. Returns (validation top-1 in %, the chosen strength, its cross-validated top-1 in % on
    the training split: a score that never reads the held-out split, for choosing settings)."""
    (xtr, ytr), (xva, yva) = train, val
    classes = int(ytr.max()) + 1
    g = torch.Generator().manual_seed(0)
    fold = torch.empty_like(ytr)
    for c in range(classes):  # stratified: each class spread evenly over the folds
        idx = (ytr == c).nonzero().squeeze(1)
        fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % folds
    scores = np.zeros((folds, len(lambdas)))
    for f in range(folds):
        fit, held = fold != f, fold == f
        x_fit, x_held = _standardise(xtr[fit], xtr[held])
        for j, Wb in enumerate(_logreg_path(x_fit, ytr[fit], classes, lambdas)):
            scores[f, j] = _accuracy(Wb, x_held, ytr[held])
    mean = scores.mean(0)
    best = max(range(len(lambdas)), key=lambda j: (round(float(mean[j]), 6), -j))
    x_fit, x_val = _standardise(xtr, xva)
    acc = _accuracy(_logreg_path(x_fit, ytr, classes, lambdas[: best + 1])[-1], x_val, yva)
    return acc, lambdas[best], float(mean[best])


@torch.no_grad()
def reestimate_bn(model: torch.nn.Module, root: str, crop: int = CROP, batch: int = BATCH, seed: int = 0):
    """Replace the running statistics of every BatchNorm layer of `model` by their average over one pass of the
    training split in the probe's view (centre crops, clean), in train mode without gradients: the cumulative
    average (momentum None) of the batch statistics of `batch` images. Only the running statistics change, and the
    model is left in eval mode. Tells whether a trunk's loss is in its running statistics or in its weights."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    dataset = ImageFolder(os.path.join(root, "train"), eval_val_view(crop))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for x, _ in torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, generator=g):
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def probe(arch: str, state: dict | None, root: str, crop: int = CROP, seed: int = 0, bn: bool = False) -> dict:
    """The linear probe of a trunk (`state`, or a random one initialised under `seed`): "probe" (top-1 %, held-out
    split) and "cv" (cross-validated top-1 %, training split); with `bn`, also "probe_bn" and "cv_bn", the same
    after reestimate_bn."""
    model = trunk(arch, state, seed)
    acc, _, cv = linear_probe(features(model, root, "train", crop), features(model, root, "val", crop))
    out = {"probe": acc, "cv": cv}
    if bn:
        model = reestimate_bn(model, root, crop, seed=seed)
        acc, _, cv = linear_probe(features(model, root, "train", crop), features(model, root, "val", crop))
        out.update(probe_bn=acc, cv_bn=cv)
    return out


# ============ the benchmark ============

# The HEXA study (--study hexa): each variant's settings against its base at the same recipe and learning rate
# (the control: the base's row at that dataset and seed). (label, flags added to the variant's recipe). "" is the
# script's defaults; the former ones put the hard examples in from the first epoch (and, in HEXA-DCluster, the
# adversarial views too). Rows of settings whose flags are gone (the mean loss and the auxiliary BatchNorm) stay in
# the rows files and the tables.
_FORMER = [
    ("from epoch 0 (former default)", ["--hard-start-epoch", "0"]),
    ("adversarial only, from epoch 0", ["--hard-start-epoch", "0", "--mix-weight", "0"]),
    ("cut-mixed only, from epoch 0", ["--hard-start-epoch", "0", "--adv-weight", "0"]),
]
STUDY = {
    "hexa_moco": [("", []), *_FORMER],
    "hexa_dcluster": [
        ("", []),  # cut-mixed views only
        ("adversarial and cut-mixed", ["--adv-weight", "1"]),
        ("adversarial and cut-mixed, from epoch 0 (former default)", ["--adv-weight", "1", "--hard-start-epoch", "0"]),
        ("mix with the other view", ["--mix-partner", "view"]),  # the other large crop of the image as CutMix source
        ("separate BN", ["--hard-bn", "separate"]),  # running statistics from the clean crops only
    ],
}
# The recipe study (--study recipe): each base's recipe against changes of it, the candidates of the DeepCluster-v2
# investigation and the MoCo crop and queue (the control: the base's row with the recipe unchanged).
STUDY["moco_v2"] = [
    ("", []),
    ("crops 0.2-1", ["--crop-min-scale", "0.2"]),
    ("queue 256", ["--moco-k", "256"]),
    ("lr 0.03", ["--lr", "0.03"]),  # HEXA-MoCo's sum of three losses at lr 0.01 takes steps up to 3x as large
]
STUDY["deepcluster_v2"] = [
    ("", []),
    ("30 prototypes", ["--nmb-prototypes", "30", "30", "30"]),
    ("lr 0.3", ["--lr", "0.3", "--final-lr", "0.0003"]),
    ("crops 0.14-1", ["--min-scale-crops", "0.14"]),
    (
        "multi-crop",
        f"--nmb-crops 2 4 --size-crops {CROP} 16 --min-scale-crops 0.5 0.14 --max-scale-crops 1 0.5".split(),
    ),
]
BASE_OF = {"hexa_moco": "moco_v2", "hexa_dcluster": "deepcluster_v2", "mochi": "moco_v2"}
BASE_OF.update({b: b for b in BASES})  # a base is its own control in the recipe study


def jobs_of(methods, reference: bool, study: bool, configs=None) -> list[tuple]:
    """(method, config label, extra flags) for one dataset and seed; with `study`, the STUDY settings (only the
    labels in `configs`, when given) of the variants in `methods` and their controls."""
    if study:
        todo = [(BASE_OF[v], "", []) for v in methods if v in STUDY]  # the controls: the learning table's rows
        todo += [(v, label, flags) for v in methods if v in STUDY for label, flags in STUDY[v]
                 if configs is None or label in configs]  # fmt: skip
    else:
        todo = [(m, "", []) for m in methods]
        todo += [("supervised", "", [])] if reference else []
    return list({(m, c): (m, c, f) for m, c, f in todo}.values())


def read_rows(paths) -> list[dict]:
    """The rows of the JSON-lines files that exist, in order (a later row of the same key replaces an earlier one
    where they are keyed)."""
    return [json.loads(line) for path in paths if os.path.exists(path) for line in open(path) if line.strip()]


def _key(row) -> tuple:
    return row["dataset"], row["seed"], row["method"], row.get("config", "")


def run(methods=BASES, datasets=tuple(DATASETS), seeds=SEEDS, epochs: int = EPOCHS, reference: bool = True,
        work_dir: str | None = None, log=print, jobs: int = 1, rows_paths=(),
        study: bool = False, configs=None, trunks_dir: str | None = None) -> list[dict]:  # fmt: skip
    """Every dataset x seed x method, with the random trunk (method "random") and, with `reference`, the supervised
    trunk (method "supervised") at each dataset and seed; with `study`, the configurations of STUDY and their
    controls instead (only the labels in `configs`, when given). `jobs` runs go at once (each with its share of the
    cores). With `rows_paths` (JSON-lines files), every row is appended to the first as a JSON line when it is done,
    and rows already in any of them are not run again. Rows: dataset, seed, method, config, epochs,
    probe (%), random (the random trunk's probe at that dataset and seed), seconds; cv (the probe's cross-validated
    accuracy on the training split), probe_bn and cv_bn (the same after re-estimating the BatchNorm statistics:
    reestimate_bn). With `trunks_dir`, each run's trunk and log are saved there."""
    rows_path = rows_paths[0] if rows_paths else None
    done = {_key(r): r for r in read_rows(rows_paths) if r["epochs"] in (0, epochs)}
    lock = threading.Lock()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs > 1:
        torch.set_num_threads(threads)

    def keep(row):
        with lock:
            done[_key(row)] = row
            if rows_path:
                with open(rows_path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        roots = {}
        for spec in datasets:
            for seed in seeds:
                roots[spec, seed] = make_dataset(spec, seed, os.path.join(tmp, f"{spec}-{seed}".replace(":", "_")))
                if (spec, seed, "random", "") not in done:
                    p = probe(ARCH, None, roots[spec, seed], seed=seed, bn=True)
                    keep(dict(dataset=spec, seed=seed, method="random", config="", epochs=0, **p, random=p["probe"],
                              seconds=0.0))  # fmt: skip
                log(f"{spec} seed {seed}: random trunk {done[spec, seed, 'random', '']['probe']:.1f} %")
        todo = [
            (spec, seed, *job)
            for spec in datasets
            for seed in seeds
            for job in jobs_of(methods, reference, study, configs)
        ]
        rank = {"supervised": 1, **{m: 0 for m in BASES}}  # the bases (the controls) and the references first
        todo = sorted((t for t in todo if t[:4] not in done), key=lambda t: rank.get(t[2], 2))

        def one(n, spec, seed, method, config, flags):
            root, out = roots[spec, seed], os.path.join(tmp, f"run{n}")
            if method == "supervised":
                state, seconds = supervised(root, epochs, seed)
            else:
                env = {"OMP_NUM_THREADS": str(threads)} if jobs > 1 else {}
                state, seconds = pretrain(method, root, out, epochs, seed, flags, env)
            if trunks_dir:
                os.makedirs(trunks_dir, exist_ok=True)
                name = f"{spec}-s{seed}-{method}-{config or 'default'}.pth".replace(" ", "_").replace(":", "_")
                torch.save(state, os.path.join(trunks_dir, name))
                if os.path.exists(os.path.join(out, "log.jsonl")):  # the run's per-epoch log beside its trunk
                    shutil.copy(os.path.join(out, "log.jsonl"), os.path.join(trunks_dir, name[:-4] + ".jsonl"))
            p = probe(ARCH, state, root, seed=seed, bn=True)
            acc, random_acc = p["probe"], done[spec, seed, "random", ""]["probe"]
            keep(dict(dataset=spec, seed=seed, method=method, config=config, epochs=epochs, **p, random=random_acc,
                      seconds=seconds))  # fmt: skip
            name = f"{method} ({config})" if config else method
            log(f"{spec} seed {seed}: {name} {acc:.1f} % (random {random_acc:.1f} %), {seconds:.0f} s")
            shutil.rmtree(out, ignore_errors=True)

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(one, n, *t) for n, t in enumerate(todo)]:
                f.result()
    want = {(spec, seed) for spec in datasets for seed in seeds}
    return [r for r in done.values() if (r["dataset"], r["seed"]) in want]


def _spread(values) -> str:
    """The mean ± half the range (with two values, the midpoint ± half their difference)."""
    lo, hi = min(values), max(values)
    return f"{float(np.mean(values)):.1f} ± {(hi - lo) / 2:.1f}"


def _data_note(rows) -> str:
    notes = []
    for spec in dict.fromkeys(r["dataset"] for r in rows):
        kw = parse_dataset(spec)[1]
        notes.append(f"{spec}: {kw['kind']}, {kw['classes']} classes (chance {100 / kw['classes']:.1f} %), "
                     f"{kw['train_per_class']} train / {kw['val_per_class']} held-out images per class, "
                     f"{kw['size']} px")  # fmt: skip
    return "Data: " + "; ".join(notes) + "."


def table(rows) -> str:
    """Markdown: one line per dataset and method; the probe at each seed (the random trunk's at that seed in
    brackets), the mean ± half the range over seeds, the smallest gap to the random trunk over seeds, and whether
    that gap exceeds the spread (the range) of the method's probe over seeds."""
    rows = [r for r in rows if not r.get("config")]
    out = [
        "| data | method | epochs | probe at each seed (random trunk) | probe, mean ± half-range | smallest gap "
        "| gap > spread | time per run |",
        "|---|---|---:|---|---:|---:|:---:|---:|",
    ]
    order = {m: i for i, m in enumerate(["random", *RECIPES, "supervised"])}
    for spec in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == spec]
        for method in sorted(dict.fromkeys(r["method"] for r in sub), key=lambda m: order.get(m, 99)):
            rs = sorted((r for r in sub if r["method"] == method), key=lambda r: r["seed"])
            accs = [r["probe"] for r in rs]
            per_seed = ", ".join(f"s{r['seed']}: {r['probe']:.1f} ({r['random']:.1f})" for r in rs)
            if method == "random":
                out.append(f"| {spec} | random trunk | 0 | {per_seed} | {_spread(accs)} | | | |")
                continue
            gaps = [r["probe"] - r["random"] for r in rs]
            ok = "yes" if min(gaps) > max(accs) - min(accs) else "**no**"
            secs = np.mean([r["seconds"] for r in rs])
            out.append(f"| {spec} | {method} | {rs[0]['epochs']} | {per_seed} | {_spread(accs)} | {min(gaps):+.1f} "
                       f"| {ok} | {secs:.0f} s |")  # fmt: skip
    return "\n".join(out) + (
        f"\n\n{_data_note(rows)} {ARCH} at {CROP} px; the recipes of `benchmarks/learning.py`. Seed s draws the "
        "data, the training run and the random trunk. Probe: standardised pooled features, logistic regression with "
        "the L2 strength cross-validated on the training split. Supervised: the same trunk, epochs and crop, trained "
        "on the labels (batch 64)."
    )


def study_table(rows) -> str:
    """Markdown: one line per method and configuration of STUDY that has rows; its probe minus its control's (the
    base with the same recipe and lr, the same dataset and seed) at each dataset and seed, the mean gain ± half its
    range, and the mean gain of the cross-validated training-split score (cv: the score to choose settings by)."""
    out = ["| method | configuration | gain over the control at each dataset, seed | gain, mean ± half-range "
           "| cv gain, mean | probe, mean | time per run |", "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    control = {(r["dataset"], r["seed"], r["method"]): r for r in rows if not r.get("config")}
    shown = set()
    for variant, configs in STUDY.items():
        base = BASE_OF[variant]
        bs = [r for r in control.values() if r["method"] == base]
        if bs and base not in shown:  # each control once
            shown.add(base)
            accs = [r["probe"] for r in bs]
            per = ", ".join(f"{r['dataset']} s{r['seed']}: {r['probe']:.1f}" for r in bs)
            out.append(
                f"| {base} | control | {per} | | | {np.mean(accs):.1f} | {np.mean([r['seconds'] for r in bs]):.0f} s |"
            )
        labels = [c for c, _ in (configs[1:] if variant == base else configs)]
        labels += sorted({r.get("config", "") for r in rows if r["method"] == variant} - set(labels) - {""})
        for label in labels:
            rs = [r for r in rows if r["method"] == variant and r.get("config", "") == label]
            rs = [(r, control[r["dataset"], r["seed"], base]) for r in rs if (r["dataset"], r["seed"], base) in control]
            if not rs:
                continue
            gains = [r["probe"] - c["probe"] for r, c in rs]
            per = ", ".join(f"{r['dataset']} s{r['seed']}: {g:+.1f}" for (r, _), g in zip(rs, gains))
            secs = np.mean([r["seconds"] for r, _ in rs])
            mean = np.mean([r["probe"] for r, _ in rs])
            cv = [r["cv"] - c["cv"] for r, c in rs if "cv" in r and "cv" in c]  # never reads the held-out split
            cv = f"{np.mean(cv):+.1f}" if cv else ""
            out.append(
                f"| {variant} | {label or 'default'} | {per} | {_spread(gains)} | {cv} | {mean:.1f} | {secs:.0f} s |"
            )
    eps = max((r["epochs"] for r in rows), default="?")
    return "\n".join(out) + (
        f"\n\n{_data_note(rows)} {eps} epochs, {ARCH} at {CROP} px, each variant with its base's recipe and lr "
        "(`benchmarks/learning.py`); the probe as in the learning table."
    )


def bn_table(rows) -> str:
    """Markdown: the probe of each trunk that has one with re-estimated BatchNorm statistics (reestimate_bn) beside
    the probe as trained: a loss that the re-estimation recovers was in the running statistics, not the weights."""
    out = ["| data | seed | method | configuration | probe | probe, BatchNorm re-estimated | difference |",
           "|---|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "probe_bn" in r:
            out.append(f"| {r['dataset']} | {r['seed']} | {r['method']} | {r.get('config') or 'default'} "
                       f"| {r['probe']:.1f} | {r['probe_bn']:.1f} | {r['probe_bn'] - r['probe']:+.1f} |")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), help="name or name:key=value,... (see above)")
    p.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--no-supervised", dest="reference", action="store_false", help="skip the supervised reference")
    p.add_argument("--study", choices=["hexa", "recipe"], default=None,
                   help="the settings of STUDY instead: of the HEXA variants, or of the bases' recipes")  # fmt: skip
    p.add_argument("--configs", nargs="*", default=None, help="with --study: only these labels (and the controls)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with its share of the cores (default 1)")
    p.add_argument("--rows", nargs="+", default=None,
                   help="append each row to the first of these JSON-lines files; skip rows already in any")  # fmt: skip
    p.add_argument("--work-dir", default=None, help="where the data and runs go (a temporary folder inside it)")
    p.add_argument("--report", action="store_true", help="print the tables of the --rows files; run nothing")
    p.add_argument("--trunks", default=None, help="save each run's trunk and log.jsonl in this folder")
    a = p.parse_args()
    if a.report:
        rows = list({_key(r): r for r in read_rows(a.rows or [])}.values())  # the latest row of each key
        if not rows:
            sys.exit(f"error: --report needs --rows files with rows, not {a.rows}")
        print(table(rows) + "\n\n" + study_table(rows) + "\n\n" + bn_table(rows))
        sys.exit(0)
    for spec in a.datasets:
        parse_dataset(spec)  # fail early on a bad spec
    kind = {"hexa": STUDY.keys() - set(BASES), "recipe": BASES}.get(a.study, RECIPES)
    methods = [m for m in a.methods if m in kind]
    unknown = set(a.configs or ()) - {label for configs in STUDY.values() for label, _ in configs}
    if unknown:
        sys.exit(f"error: unknown --configs {sorted(unknown)}; see STUDY in {__file__}")
    rows = run(methods, a.datasets, a.seeds, a.epochs, a.reference, a.work_dir, jobs=a.jobs, rows_paths=a.rows or (),
               study=bool(a.study), configs=a.configs, trunks_dir=a.trunks)  # fmt: skip
    print(study_table(rows) if a.study else table(rows))
