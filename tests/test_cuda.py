"""On a CUDA GPU: every script with its CUDA defaults (bf16 autocast, channels_last, the device views; SyncBN and
FAISS where the script uses them), the evaluation scripts on their checkpoints, resume, bf16 against fp32, a
compiled step (--compile) against an eager one, k-means on the GPU against the CPU, device views on the GPU against
the CPU, and GPU memory that stays flat across epochs.

Skipped where CUDA is absent (CI). `benchmarks/gpu_check.sh OUT` runs them (`pytest -m cuda`), then the GPU
benchmark. Where faiss is not installed, the DeepCluster family runs with --kmeans-backend torch (on the GPU).
"""

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import load_checked, load_ckpt, read_log, run_main

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)"),
]

HAS_FAISS = importlib.util.find_spec("faiss") is not None
KMEANS = [] if HAS_FAISS else ["--kmeans-backend", "torch"]
# The default arch (resnet50) at 64 px: the bottleneck blocks in bf16 and channels_last, in seconds.
MOCO = ["-a", "resnet50", "--crop-size", "64", "-b", "32", "-j", "2", "--moco-k", "256", "--print-freq", "2"]
DC = ["-a", "resnet50", "-b", "32", "-j", "2", "--print-freq", "2", "--nmb-crops", "2", "4", "--size-crops", "64", "32",
      "--nmb-prototypes", "30", "30", "30", "--hidden-mlp", "512", "--warmup-epochs", "1", *KMEANS]  # fmt: skip
FLAGS = {
    "moco_v2.py": [*MOCO, "--save-freq", "1"],
    "mochi.py": [*MOCO, "--mochi-n", "64", "--mochi-s", "32", "--mochi-s-prime", "8", "--mix-start-epoch", "1"],
    "hexa_moco.py": MOCO,
    "deepcluster_v2.py": [*DC, "--warmup-epochs", "0", "--lr", "0.3", "--final-lr", "0.3"],  # constant: resume
    "hexa_dcluster.py": DC,
}
EPOCHS = {"moco_v2.py": 3}  # three epochs for the memory check, two for the others


@pytest.fixture
def cuda_group():
    """A one-process NCCL group in this process, as the scripts make on a GPU (the collectives take CUDA tensors)."""
    from common import dist

    dist.init_distributed("cuda")
    yield
    dist.cleanup()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from common.synthetic import make_image_folder

    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=48, val_per_class=8,
                             size=72)  # fmt: skip


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """script -> output folder of its run on the GPU (made on first use)."""
    root, done = tmp_path_factory.mktemp("cuda_runs"), {}

    def get(script):
        if script not in done:
            out = root / script.removesuffix(".py")
            run_main(script, data, *FLAGS[script], "--epochs", EPOCHS.get(script, 2), "--output-dir", out)
            done[script] = out
        return done[script]

    return get


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_script_on_cuda(runs, script):
    out = runs(script)
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS.get(script, 2) + 1))
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) and r["train/loss"] > 0 for r in log)
    assert all(r["train/max_mem_gib"] > 0 and r["train/data_s"] >= 0 for r in log)
    state = load_checked(out / "checkpoint.pth", script.removesuffix(".py"), len(log), arch="resnet50")
    assert state["args"]["amp"] and state["args"]["views"] == "auto"  # bf16, channels_last, device views


def test_gpu_memory_stays_flat_across_epochs(runs):
    """The peak GPU memory of epochs 2 and 3 is that of epoch 1 (no growth: nothing accumulates across steps)."""
    peaks = [r["train/max_mem_gib"] for r in read_log(runs("moco_v2.py"))]
    assert max(peaks[1:]) <= peaks[0] * 1.02 + 0.01, peaks


@pytest.mark.parametrize("script", ["moco_v2.py", "deepcluster_v2.py"])
def test_evaluation_scripts_on_cuda(runs, data, tmp_path, script):
    checkpoint = runs(script) / "checkpoint.pth"
    flags = ["-a", "resnet50", "--crop-size", "64", "-b", "32", "-j", "2", "--epochs", "1", "--pretrained", checkpoint]
    run_main("lincls.py", data, *flags, "--output-dir", tmp_path / "lincls")
    run_main("finetune.py", data, *flags, "--labels-perc", "100", "--output-dir", tmp_path / "finetune")
    for name in ("lincls", "finetune"):
        rec = read_log(tmp_path / name)[-1]
        assert 0 <= rec["val/acc1"] <= rec["val/acc5"] <= 100 and torch.isfinite(torch.tensor(rec["train/loss"]))
    trunk, pretrained = load_ckpt(tmp_path / "lincls" / "checkpoint.pth")["backbone"], load_ckpt(checkpoint)["backbone"]
    assert all(torch.equal(trunk[k], v) for k, v in pretrained.items())  # lincls: frozen, BN statistics included


def test_resume_on_cuda(runs, data, tmp_path):
    """Resumed runs continue: the epoch counter, the queue pointer and the memory bank's images as in the
    uninterrupted run; values close (cuDNN is not bitwise deterministic)."""
    full = runs("moco_v2.py")
    os.makedirs(tmp_path / "moco")
    run_main("moco_v2.py", data, *FLAGS["moco_v2.py"], "--epochs", 3, "--output-dir", tmp_path / "moco",
             "--resume", full / "checkpoint_0002.pth")  # fmt: skip
    a, b = load_ckpt(full / "checkpoint.pth"), load_ckpt(tmp_path / "moco" / "checkpoint.pth")
    assert b["epoch"] == 3 and torch.equal(a["model"]["queue_ptr"], b["model"]["queue_ptr"])
    torch.testing.assert_close(b["model"]["encoder_q.conv1.weight"], a["model"]["encoder_q.conv1.weight"],
                               atol=2e-3, rtol=0.05)  # fmt: skip
    full, part = runs("deepcluster_v2.py"), tmp_path / "dc"
    run_main("deepcluster_v2.py", data, *FLAGS["deepcluster_v2.py"], "--epochs", 1, "--output-dir", part)
    run_main("deepcluster_v2.py", data, *FLAGS["deepcluster_v2.py"], "--epochs", 2, "--output-dir", part, "--resume")
    a, b = load_ckpt(full / "checkpoint.pth"), load_ckpt(part / "checkpoint.pth")
    assert b["epoch"] == 2 and torch.equal(a["extra"]["memory"]["index"], b["extra"]["memory"]["index"])
    cos = F.cosine_similarity(a["extra"]["memory"]["embeddings"], b["extra"]["memory"]["embeddings"], dim=2)
    assert cos.mean() > 0.9, float(cos.mean())


def test_bf16_against_fp32(cuda_group):
    """MoCo v2's logits and loss under bf16 autocast and channels_last against fp32, same weights and batch."""
    from moco_v2 import MoCo

    torch.manual_seed(0)
    fp32 = MoCo("resnet50", dim=128, K=1024, m=0.999, T=0.2, bn_group_size=16).cuda().train()
    bf16 = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    im_q, im_k = torch.randn(2, 32, 3, 96, 96, device="cuda")
    torch.manual_seed(1)
    logits32, labels = fp32(im_q, im_k)
    torch.manual_seed(1)  # the same shuffle permutation
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cl = torch.channels_last
        logits16, _ = bf16(im_q.contiguous(memory_format=cl), im_k.contiguous(memory_format=cl))
    assert logits16.dtype == torch.float32  # the logits are computed in fp32 under autocast too
    torch.testing.assert_close(logits16, logits32, atol=0.15, rtol=0.05)  # bf16: 8 bits of mantissa, x 1/T = 5
    loss32, loss16 = F.cross_entropy(logits32, labels), F.cross_entropy(logits16, labels)
    assert abs(float(loss16 - loss32)) < 0.02 * float(loss32)


def test_compiled_step_matches_eager(cuda_group):
    """--compile: one MoCo v2 forward and backward with both encoders compiled against eager, same weights and batch
    (fp32: the difference is the compiler's reordering of float operations)."""
    from moco_v2 import MoCo

    torch.manual_seed(0)
    eager = MoCo("resnet50", dim=128, K=1024, m=0.999, T=0.2, bn_group_size=16).cuda().train()
    compiled = copy.deepcopy(eager)
    compiled.encoder_q.compile(), compiled.encoder_k.compile()
    im_q, im_k = torch.randn(2, 32, 3, 96, 96, device="cuda")
    grads = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same shuffle permutation
        logits, labels = model(im_q, im_k)
        F.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-3, atol=1e-3)
    assert F.cosine_similarity(grads[1][1], grads[0][1], dim=0) > 0.999


def test_kmeans_on_gpu_matches_cpu():
    """The GPU k-means (the FAISS GPU index when faiss has GPU support, else the torch search on CUDA) gives the CPU's
    assignments on well-separated data (the CPU run under gloo, the GPU run under NCCL, as the scripts do)."""
    import torch.distributed as torch_dist
    from test_deepcluster_v2 import kmeans_data, same_partition

    from common import dist
    from deepcluster_v2 import spherical_kmeans

    x, ids = kmeans_data(n=3000, dim=128, clusters=30)
    truth = torch.arange(len(x)) % 30
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        seed = next(s for s in range(100) if same_partition(spherical_kmeans(x, ids, 30, 0, s, "torch")[1], truth))
        _, cpu = spherical_kmeans(x, ids, K=30, iters=10, seed=seed, backend="torch")
    finally:
        dist.cleanup()
    dist.init_distributed("cuda")
    try:
        for backend in ["faiss", "torch"] if HAS_FAISS else ["torch"]:
            c, gpu = spherical_kmeans(x.cuda(), ids.cuda(), K=30, iters=10, seed=seed, backend=backend)
            assert gpu.is_cuda and c.is_cuda and same_partition(gpu.cpu(), cpu), backend
    finally:
        dist.cleanup()


def test_device_views_on_cuda_match_cpu(tmp_path):
    """The same files and seed give the same views on the GPU (nvJPEG, CUDA kernels) as on the CPU, up to the
    decoders' rounding; CMYK, grayscale and PNG files join the batch there too."""
    from PIL import Image

    from common import device_views
    from common.data import read_bytes
    from common.synthetic import SHAPES, draw
    from common.views import MultiCrop, TwoCrops, moco_v2_view

    rng = __import__("numpy").random.default_rng(0)
    paths = []
    for i, mode in enumerate(["RGB"] * 5 + ["CMYK", "L", "PNG"]):
        img, path = draw(SHAPES[i % len(SHAPES)], 160, rng), str(tmp_path / f"{i}.JPEG")
        (img.save(path, format="PNG") if mode == "PNG" else img.convert(mode).save(path, quality=90))
        paths.append(path)
    blobs = [read_bytes(p) for p in paths]
    for transform in (TwoCrops(moco_v2_view(64)), MultiCrop([2, 2], [64, 32], [0.14, 0.05], [1, 0.14])):
        views = device_views.from_transform(transform)
        torch.manual_seed(0)
        cpu = views(blobs, paths, torch.device("cpu"))
        torch.manual_seed(0)
        gpu = views(blobs, paths, torch.device("cuda"))
        for c, g in zip(cpu, gpu):
            assert g.is_cuda and g.shape == c.shape and g.dtype == torch.float32
            assert (g.cpu() - c).abs().mean() < 0.05, float((g.cpu() - c).abs().mean())  # normalised units
    assert Image.open(paths[-1]).format == "PNG"


def test_torchvision_trunk_loads_strictly_from_cuda_checkpoints(runs):
    for script in ("hexa_moco.py", "hexa_dcluster.py"):
        model = torchvision.models.resnet50()
        model.fc = torch.nn.Identity()
        model.load_state_dict(load_ckpt(runs(script) / "checkpoint.pth")["backbone"], strict=True)
