"""All the benchmarks in one command: prints markdown tables and writes them to BENCHMARKS.md.

    python -m benchmarks.run                 # sizes for the machine at hand (full size on a GPU, small on a CPU)
    python -m benchmarks.run --skip learning # any of: steps loading kmeans learning

1. Training step time and peak memory of every pretraining method, on synthetic in-memory batches, next to a plain
   supervised step with the same arch / resolution / batch; ratios method / supervised and variant / base.
2. Data loading: images per second per worker of each view pipeline (decode + augmentation).
3. k-means: one epoch's clustering, FAISS versus plain torch (the same algorithm).
4. Learning: a short pretraining, then the same linear probe on the pretrained and on a random trunk.

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
from benchmarks import kmeans, learning, loading  # noqa: E402

METHODS = ["supervised", "moco_v2", "moco_v2_groups", "mochi", "hexa_moco", "deepcluster_v2", "hexa_dcluster"]
BASE = {"moco_v2_groups": "moco_v2", "mochi": "moco_v2", "hexa_moco": "moco_v2", "hexa_dcluster": "deepcluster_v2"}
VIEWS = {  # what one "image" of the batch costs the method, for reading the ratios
    "supervised": "1 x S fwd+bwd",
    "moco_v2": "2 x S (query fwd+bwd, key fwd)",
    "moco_v2_groups": "as moco_v2, BatchNorm in 4 groups per process",
    "mochi": "as moco_v2, + mixing",
    "hexa_moco": "as moco_v2, + attack, + 2 hard queries",
    "deepcluster_v2": "2 x S + 6 small crops (0.18 S each)",
    "hexa_dcluster": "as deepcluster_v2, + attack, + 4 hard crops",
}


README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- BENCHMARKS.md begins -->", "<!-- BENCHMARKS.md ends -->"


def readme_block(text: str) -> str:
    """BENCHMARKS.md's text as the README shows it: without the title, its sections one heading level down."""
    return text.split("\n", 1)[1].strip("\n").replace("\n## ", "\n#### ")


def update_readme(text: str, path: str = README) -> None:
    """Put the new table between the README's two markers, so the README always shows the latest one."""
    s = open(path).read()
    i, j = s.index(BEGIN) + len(BEGIN), s.index(END)
    with open(path, "w") as f:
        f.write(s[:i] + "\n\n" + readme_block(text) + "\n\n" + s[j:])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)} threads" if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU: {cpu}; GPU: {gpu}; torch {torch.__version__}; Python {platform.python_version()}"


def steps(o) -> str:
    rows = {}
    for method in METHODS:
        if method != "supervised" and not os.path.exists(os.path.join(ROOT, f"{method.split('_groups')[0]}.py")):
            continue
        cmd = [sys.executable, "-m", "benchmarks.step", method, "--arch", o.arch, "--size", str(o.size), "--batch",
               str(o.batch), "--queue", str(o.queue), "--steps", str(o.steps), "--reps", str(o.reps)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"benchmarks.step {method} failed")
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {method}: {rows[method]['step_s'] * 1000:.0f} ms/step", flush=True)
    mem = "peak GPU memory" if torch.cuda.is_available() else "peak RSS of the process"
    lines = [f"| method | per image | ms / step (min / max) | img/s | {mem} | / supervised | / base |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    sup = rows["supervised"]["step_s"]
    for m, r in rows.items():
        base = f"{r['step_s'] / rows[BASE[m]]['step_s']:.2f}" if m in BASE and BASE[m] in rows else ""
        lines.append(
            f"| {m} | {VIEWS[m]} | {r['step_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f} / {r['max_s'] * 1e3:.1f}) "
            f"| {r['img_s']:.1f} | {r['peak_gib']:.2f} GiB | {r['step_s'] / sup:.2f} | {base} |"
        )
    precision = "bf16 + channels_last" if torch.cuda.is_available() else "fp32"
    small = max(16, round(o.size * 96 / 224))
    settings = (f"{o.arch}, {o.size} px (multi-crop: 2 x {o.size} + 6 x {small}), batch {o.batch} per process, "
                f"MoCo queue {o.queue}, {precision}, {o.reps} repetitions of {o.steps} steps after a warm-up, "
                "one process per method")  # fmt: skip
    return "\n".join(lines) + f"\n\nSettings: {settings}. S = one forward of the batch at {o.size} px."


def main():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50" if gpu else "resnet18")
    p.add_argument("--size", type=int, default=224 if gpu else 64)
    p.add_argument("--batch", type=int, default=32, help="per-process batch")
    p.add_argument("--queue", type=int, default=65536 if gpu else 4096, help="MoCo queue (MoCHi needs >= 1024)")
    p.add_argument("--steps", type=int, default=20 if gpu else 3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kmeans-n", type=int, nargs="+", default=[100_000, 1_281_167] if gpu else [8_000])
    p.add_argument("--learning-epochs", type=int, default=learning.EPOCHS)
    p.add_argument("--learning-methods", nargs="*", default=list(learning.RECIPES), choices=list(learning.RECIPES))
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "loading", "kmeans", "learning"])
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    o = p.parse_args()

    sections = []
    if "steps" not in o.skip:
        print("training steps ...", flush=True)
        sections.append(("Training step: time and memory", steps(o)))
    if "loading" not in o.skip:
        print("data loading ...", flush=True)
        sections.append(("Data loading", loading.table(loading.run())))
    if "kmeans" not in o.skip:
        print("k-means ...", flush=True)
        rows = [r for n in o.kmeans_n for r in kmeans.run(n=n)]
        sections.append(("k-means (one epoch: 3 heads x 3000 clusters, 10 iterations, 128-d)", kmeans.markdown(rows)))
    if "learning" not in o.skip:
        print("learning ...", flush=True)
        rows = learning.run(o.learning_methods, o.learning_epochs)
        sections.append(("Learning: linear probe after a short pretraining", learning.table(rows)))
    command = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
    header = f"# Benchmarks\n\n{datetime.date.today()}; {machine()}.\n\nCommand: `{command}`\n"
    text = header + "".join(f"\n## {title}\n\n{body}\n" for title, body in sections)
    print(text)
    with open(o.output, "w") as f:
        f.write(text)
    if os.path.abspath(o.output) == os.path.join(ROOT, "BENCHMARKS.md"):
        update_readme(text)


if __name__ == "__main__":
    main()
