"""One epoch's clustering of DeepCluster-v2 (every head, --kmeans-iters iterations): FAISS vs plain torch.

Times `deepcluster_v2.cluster_memory` on random unit vectors, once with the FAISS nearest-centroid search (GPU index
on CUDA when faiss has GPU support, CPU index otherwise) and once with the chunked torch matmul + argmax. Both run
the same algorithm (same initial rows, same M-step), so only the E-step differs.

    python benchmarks/kmeans.py                              # a quick CPU-sized memory (n = 8000)
    python benchmarks/kmeans.py --n 1281167 --device cuda    # the ImageNet memory: 1.28M x 128 into 3 x 3000
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import dist  # noqa: E402
from deepcluster_v2 import DeepClusterV2, cluster_memory  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends(device: torch.device) -> list[str]:
    """The backends worth timing: faiss where it is installed, and on a GPU only with its GPU support (a CPU index
    would copy the whole memory to the host at every E-step); the torch search always."""
    try:
        import faiss
    except ImportError:
        print("  faiss is not installed: its rows are left out", flush=True)
        return ["torch"]
    if device.type == "cuda" and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        print("  this faiss has no GPU support: its rows are left out on the GPU", flush=True)
        return ["torch"]
    return ["faiss", "torch"]


def run(n=8_000, dim=128, heads=3, k=3000, iters=10, device=None, repeats=3, n_banks=2) -> list[dict]:
    """Median (min, max) seconds of one epoch's k-means over a memory of n x dim per bank, `heads` heads of k
    clusters, for each backend; rows: {"backend", "n", "dim", "heads", "k", "iters", "device", "median_s",
    "min_s", "max_s", "ratio_vs_torch"}. Creates a one-process group if none exists (and removes it after)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    own_group = not torch_dist.is_initialized()
    if own_group:
        device = dist.init_distributed(device.type)
    try:
        g = torch.Generator().manual_seed(0)
        index = torch.randperm(n, generator=g).to(device)  # M dataset ids
        banks = F.normalize(torch.randn(n_banks, n, dim, generator=g), dim=2).to(device)  # n_banks x M x D
        model = DeepClusterV2("resnet18", feat_dim=dim, hidden_mlp=0, nmb_prototypes=[k] * heads).to(device)
        rows = []
        for backend in backends(device):
            args = argparse.Namespace(nmb_prototypes=[k] * heads, seed=0, kmeans_iters=iters, kmeans_backend=backend)
            if device.type == "cuda":
                cluster_memory(model, index, banks, n, args, epoch=0)  # warm-up: faiss GPU resources, kernels
            times = []
            for r in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                cluster_memory(model, index, banks, n, args, epoch=r)
                _sync(device)
                times.append(time.perf_counter() - t0)
            rows.append(
                dict(
                    backend=backend,
                    n=n,
                    dim=dim,
                    heads=heads,
                    k=k,
                    iters=iters,
                    device=str(device),
                    median_s=statistics.median(times),
                    min_s=min(times),
                    max_s=max(times),
                )  # fmt: skip
            )
        for row in rows:
            row["ratio_vs_torch"] = rows[-1]["median_s"] / row["median_s"]  # > 1: faster than plain torch
        return rows
    finally:
        if own_group:
            dist.cleanup()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backend | memory | clusters | device | median s | min s | max s | torch / this |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['n']} x {r['dim']} | {r['heads']} x {r['k']}, {r['iters']} it | {r['device']} "
            f"| {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['ratio_vs_torch']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8_000, help="memory rows per bank (ImageNet: 1281167; default 8000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--k", type=int, default=3000)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    a = p.parse_args()
    print(markdown(run(a.n, a.dim, a.heads, a.k, a.iters, a.device, a.repeats)))
