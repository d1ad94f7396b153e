"""All the benchmarks in one command: prints markdown tables and writes them to BENCHMARKS.md.

    python -m benchmarks.run --device cpu      # the CPU part of BENCHMARKS.md (the learning runs: hours)
    python -m benchmarks.run --device cuda     # the GPU part: ResNet-50 at 224 px, batches 32 and 64 (minutes)
    python -m benchmarks.run --quick --output /tmp/b.md    # every section at tiny sizes: a dry run in minutes
    python -m benchmarks.run --skip learning   # any of: steps loading kmeans pipelines learning

1. Training step time and peak memory of every pretraining method, on synthetic in-memory batches, next to a plain
   supervised step with the same arch / resolution / batch; ratios method / supervised and variant / base.
2. Data loading: images per second of each view pipeline (Pillow per worker; the device views per core on the CPU,
   and on the GPU with 1 and 2 workers).
3. k-means: one epoch's clustering, FAISS versus plain torch (the same algorithm); on a GPU the ImageNet memory.
4. Pipelines: a real two-epoch run of moco_v2.py and deepcluster_v2.py with each view pipeline: images/s and the
   data wait per step.
5. Learning (CPU part): short pretrainings on generated datasets, linear probes against a random and a supervised
   trunk (benchmarks/learning.py).

BENCHMARKS.md holds a CPU part and a GPU part; a run replaces only its own device's part.
Every figure comes from this run; timings are medians (min / max) after a warm-up; ratios are taken within the run.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import kmeans, learning, loading, pipelines, step  # noqa: E402

# The step table's methods (benchmarks/step.py): moco_v2_8groups is MoCo v2 with 8 BatchNorm groups per process,
# the grouping of the paper's 8-GPU run on one device.
METHODS = ["supervised", "moco_v2", "moco_v2_8groups", "mochi", "hexa_moco", "deepcluster_v2", "hexa_dcluster"]


def marks(device: str) -> tuple:
    return f"<!-- {device} part begins -->", f"<!-- {device} part ends -->"


def with_part(text: str, device: str, part: str) -> str:
    """BENCHMARKS.md's text with the part of `device` (cpu or cuda) replaced by `part`."""
    begin, end = marks(device)
    i, j = text.index(begin) + len(begin), text.index(end)
    return text[:i] + "\n" + part.strip("\n") + "\n" + text[j:]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)} threads" if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU: {cpu}; GPU: {gpu}; torch {torch.__version__}; Python {platform.python_version()}"


def steps(o) -> str:
    rows = {}
    methods = [m for m in METHODS if m == "supervised" or os.path.exists(os.path.join(ROOT, f"{script_of(m)}.py"))]
    common = ["--arch", o.arch, "--size", str(o.size), "--queue", str(o.queue), "--steps", str(o.steps), "--reps",
              str(o.reps), "--device", o.device]  # fmt: skip
    # GPU: one process for every method and batch (the peak is reset for each); CPU: one per method and batch (the
    # peak resident memory is the process's)
    jobs = [(methods, o.batches)] if o.device == "cuda" else [([m], [b]) for m in methods for b in o.batches]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    for names, batches in jobs:
        cmd = [sys.executable, "-m", "benchmarks.step", *names, "--batches", *map(str, batches), *common, "--profile"]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"benchmarks.step {' '.join(names)} failed")
        for line in out.stdout.strip().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[r["method"], r["batch"]] = r
                print(f"  {r['method']} (batch {r['batch']}): {r['step_s'] * 1000:.0f} ms/step", flush=True)
    mem = "peak GPU memory" if o.device == "cuda" else "peak RSS of the process"
    table = "\n\n".join(f"Batch {b} per process:\n\n" + step.markdown([r for (_, n), r in rows.items() if n == b], mem)
                          for b in o.batches)  # fmt: skip
    precision = "bf16 + channels_last" if o.device == "cuda" else "fp32"
    small = max(16, round(o.size * 96 / 224))
    settings = (
        f"{o.arch}, {o.size} px (multi-crop: 2 x {o.size} + 6 x {small}), batch per process as listed, "
        f"MoCo queue {o.queue}, {precision}, {o.reps} repetitions of {o.steps} steps after a warm-up"
    )
    return table + f"\n\nSettings: {settings}; the profile: self time of the operators (torch.profiler)."


def script_of(method: str) -> str:
    return method.removesuffix("_8groups")


PRESETS = {  # per device, and --quick: arch, size, batches, queue, steps, reps, k-means sizes
    "cuda": dict(arch="resnet50", size=224, batches=[32, 64], queue=65536, steps=10, reps=3, kmeans_n=[1_281_167]),
    "cpu": dict(arch="resnet18", size=64, batches=[32], queue=4096, steps=3, reps=5, kmeans_n=[8_000, 64_000]),
    "quick": dict(arch="resnet18", size=32, batches=[16], queue=1024, steps=1, reps=1, kmeans_n=[4_000]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="tiny sizes for every section (a dry run); no learning")
    p.add_argument("--arch", default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="per-process batches of the step table")
    p.add_argument("--queue", type=int, default=None, help="MoCo queue (MoCHi needs >= 1024 at its defaults)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--kmeans-n", type=int, nargs="+", default=None)
    p.add_argument("--skip", nargs="*", default=None, choices=["steps", "loading", "kmeans", "pipelines", "learning"])
    p.add_argument("--output", default=None, help="default BENCHMARKS.md (its part of this device); --quick: none")
    o = p.parse_args()
    o.device = ("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
    for key, value in PRESETS["quick" if o.quick else o.device].items():
        if getattr(o, key) is None:
            setattr(o, key, value)
    if o.skip is None:  # the learning runs are the CPU part's (ResNet-18 at 32 px; about 3 hours on 2 cores)
        o.skip = ["learning"] if o.quick or o.device == "cuda" else []
    if o.quick:
        o.skip = sorted(set(o.skip) | {"learning"})
    o.output = o.output if o.output or o.quick else os.path.join(ROOT, "BENCHMARKS.md")

    sections = []
    if "steps" not in o.skip:
        print("training steps ...", flush=True)
        sections.append(("Training step: time and memory", steps(o)))
    if "loading" not in o.skip:
        print("data loading ...", flush=True)
        n = 8 if o.quick else 64
        rows = loading.run(n, reps=1 if o.quick else 3, device=o.device, gpu_images=64 if o.quick else 1024)
        sections.append(("Data loading", loading.table(rows)))
    if "kmeans" not in o.skip:
        print("k-means ...", flush=True)
        rows = [r for n in o.kmeans_n for r in kmeans.run(n=n, device=o.device, repeats=1 if o.quick else 3)]
        sections.append(("k-means (one epoch: 3 heads x 3000 clusters, 10 iterations, 128-d)", kmeans.markdown(rows)))
    if "pipelines" not in o.skip:
        print("pipelines ...", flush=True)
        sections.append(
            ("Pipelines: a real run with each view pipeline", pipelines.table(pipelines.run(o.device, quick=o.quick)))
        )
    if "learning" not in o.skip:
        print("learning ...", flush=True)
        rows = learning.run(methods=tuple(learning.RECIPES), jobs=2)
        sections.append(("Learning: linear probe after a short pretraining", learning.table(rows)))
    command = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
    title = "GPU" if o.device == "cuda" else "CPU"
    part = f"## {title}\n\n{datetime.date.today()}; {machine()}.\n\nCommand: `{command}`\n"
    part += "".join(f"\n### {heading}\n\n{body}\n" for heading, body in sections)
    print(part)
    if o.output is None:
        return
    if os.path.abspath(o.output) == os.path.join(ROOT, "BENCHMARKS.md"):
        text = with_part(open(o.output).read(), o.device, part)
        with open(o.output, "w") as f:
            f.write(text)
    else:
        with open(o.output, "w") as f:
            f.write(f"# Benchmarks\n\n{part}")


if __name__ == "__main__":
    main()
