"""End to end: a real run of a pretraining script with each view pipeline, on ImageNet-sized JPEG files.

The step benchmark (benchmarks/step.py) times a step on batches already in memory; this one runs the script itself
(`python moco_v2.py DATA ...`) for two epochs on generated 500 x 375 JPEGs and reads its second epoch from log.jsonl:
images/s with everything included, and the mean wait for data per step (`train/data_s`), for --views pil with
--pil-workers loader processes and for --views device with 2. A data wait near zero means the loader keeps up.

    python -m benchmarks.pipelines [--device cuda] [--images 1536]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.loading import make_folder  # noqa: E402

KMEANS = [] if importlib.util.find_spec("faiss") else ["--kmeans-backend", "torch"]  # faiss is optional


def presets(device: str, quick: bool = False) -> dict:
    """Per script: the flags of its run. GPU: ResNet-50 at 224 px, MoCo v2 at the paper's single-GPU batch (256, in
    8 BatchNorm groups of 32) and DeepCluster-v2's 2 x 224 + 6 x 96 crops at 128; CPU: a small run that only shows the
    pipelines work (ResNet-18, 64 px)."""
    if device == "cuda" and not quick:
        moco = ["-a", "resnet50", "-b", "256", "--moco-k", "4096"]
        dc = ["-a", "resnet50", "-b", "128", "--nmb-prototypes", "300", "300", "300", *KMEANS]
    else:
        moco = ["-a", "resnet18", "-b", "16", "--crop-size", "64", "--moco-k", "256", "--bn-group-size", "16"]
        dc = ["-a", "resnet18", "-b", "16", "--size-crops", "64", "28", "--nmb-prototypes", "30", "30", "30",
              "--hidden-mlp", "512", *KMEANS]  # fmt: skip
    return {"moco_v2": moco, "deepcluster_v2": dc}


def run_script(script: str, data: str, out: str, flags: list, device: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), data, *flags, "--epochs", "2", "--knn-every", "0",
           "--print-freq", "1000", "--device", device, "--output-dir", out]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f][-1]  # the second epoch: warmed up


def run(device: str | None = None, images: int | None = None, pil_workers: int | None = None, quick=False) -> list:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    images = images or (1536 if device == "cuda" and not quick else 96)
    pil_workers = pil_workers or min(8, max(2, (os.cpu_count() or 2) - 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.dirname(make_folder(tmp, images))  # DATA/train/c0/*.JPEG
        for script, flags in presets(device, quick).items():
            for views, workers in (("pil", pil_workers), ("device", 2)):
                out = os.path.join(tmp, f"{script}_{views}")
                rec = run_script(script, data, out, [*flags, "--views", views, "-j", str(workers)], device)
                batch = int(flags[flags.index("-b") + 1])
                rows.append(dict(script=script, views=views, workers=workers, batch=batch,
                                 img_s=rec["train/img_per_s"], data_s=rec["train/data_s"],
                                 step_s=batch / rec["train/img_per_s"], flags=" ".join(flags)))  # fmt: skip
    return rows


def table(rows) -> str:
    out = [
        "| script | views | loader workers | batch | img/s | data wait per step | step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    out += [f"| {r['script']} | {r['views']} | {r['workers']} | {r['batch']} | {r['img_s']:.1f} | "
            f"{r['data_s'] * 1e3:.1f} ms | {r['step_s'] * 1e3:.1f} ms |" for r in rows]  # fmt: skip
    flags = "; ".join(sorted({f"{r['script']}: `{r['flags']}`" for r in rows}))
    return "\n".join(out) + f"\n\nThe second of two epochs of each run; flags: {flags}; 500 x 375 JPEGs."


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--images", type=int, default=None, help="JPEG files (default 1536 on a GPU, 96 on the CPU)")
    p.add_argument(
        "--pil-workers", type=int, default=None, help="workers of the Pillow runs (default: cores - 2, <= 8)"
    )
    p.add_argument("--quick", action="store_true", help="the small CPU presets")
    a = p.parse_args()
    print(table(run(a.device, a.images, a.pil_workers, a.quick)))
