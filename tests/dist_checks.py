"""Everything the suite runs in two processes, in one torchrun launch (starting processes is most of its cost):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_checks.py DATA OUT

Each check_* function runs on both processes; rank 0 saves its result to OUT/<name>.pt. Then each run of `runs`
goes end to end, its script's main() called in turn in these two processes, on this launch's process group, into
OUT/<name>/. The tests read both through the `two_processes`
fixture of conftest.py. `first_step` also runs in one process (test_moco_v2.py)."""

import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from common.monitor import KNNMonitor  # noqa: E402

SPLIT_BATCH = 16  # global batch of the BatchNorm-groups equivalence


def check_moco(data):
    """Shuffle-BN and the queue across processes (test_moco_v2.py)."""
    from moco_v2 import MoCo

    torch.manual_seed(0)
    model = MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2)  # the same weights on both processes (same seed)
    torch.manual_seed(100 + dist.rank())  # different images on each process
    x = torch.randn(4, 3, 32, 32)
    x_shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
    unshuffle_identity = torch.equal(model._batch_unshuffle_ddp(x_shuffled, idx_unshuffle), x)
    gathered = dist.concat_all_gather(x)  # did this process get images of the other one? (the shuffle is global)
    own = (torch.arange(4) + 4 * dist.rank()).tolist()
    from_rows = [int((gathered == row).flatten(1).all(1).nonzero()) for row in x_shuffled]
    mixes = torch.tensor([float(any(r not in own for r in from_rows))])
    model.eval()  # eval-mode BatchNorm: each key depends on its own image only, so the shuffle must not matter
    with torch.no_grad():
        k_shuffled = model._batch_unshuffle_ddp(model.encoder_k(x_shuffled), idx_unshuffle)
        keys_match = torch.allclose(k_shuffled, model.encoder_k(x), atol=1e-5)
    model.train()
    model(x, torch.randn(4, 3, 32, 32))
    queues = dist.concat_all_gather(model.queue[None])
    flags = dist.all_reduce_sum(torch.tensor([float(unshuffle_identity), float(keys_match)]))
    return {
        "unshuffle_identity": flags[0].item() == 2,
        "keys_match_unshuffled": flags[1].item() == 2,
        "queue_equal_across_ranks": torch.equal(queues[0], queues[1]),
        "queue_ptr": dist.concat_all_gather(model.queue_ptr).tolist(),
        "slices_mix_ranks": dist.all_reduce_sum(mixes).item() > 0,
    }


def first_step(bn_group_size: int = 8) -> dict:
    """The first MoCo v2 step (forward, loss, backward, SGD) of SPLIT_BATCH images split over the processes, with
    the same weights, images and shuffle permutation at any process count (test_moco_v2.py)."""
    from moco_v2 import MoCo

    W, r = dist.world_size(), dist.rank()
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=8, K=32, m=0.99, T=0.2, mlp=True, bn_group_size=bn_group_size)
    im_q, im_k = torch.randn(2, SPLIT_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mine = slice(r * SPLIT_BATCH // W, (r + 1) * SPLIT_BATCH // W)  # this process's images
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), 0.5, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(2)  # rank 0 draws the shuffle permutation for all processes
    logits, labels = ddp(im_q[mine], im_k[mine])
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {
        "logits": dist.concat_all_gather(logits.detach()),  # SPLIT_BATCH x (1+K), in image order
        "loss": dist.all_reduce_sum(loss.detach().clone()) / W,  # the mean over all images
        "weights": {k: p.detach().clone() for k, p in model.encoder_q.named_parameters()},  # after the step
        "queue": model.queue.clone(),
    }


def check_split_batchnorm(data):
    """2 processes x 8 images, BatchNorm groups of 8 (one per process): to compare with 1 x 16 in 2 groups."""
    return first_step(bn_group_size=8)


def check_kmeans(data):
    """Distributed k-means on a memory split over the processes (test_deepcluster_v2.py): each process holds a
    different shuffled part of the same rows; the centroids and the assignments by dataset id."""
    from test_deepcluster_v2 import kmeans_data

    from deepcluster_v2 import spherical_kmeans

    x, ids = kmeans_data()
    mine = torch.randperm(len(ids), generator=torch.Generator().manual_seed(7))[dist.rank() :: dist.world_size()]
    out = {}
    for backend in ("faiss", "torch"):
        centroids, assign = spherical_kmeans(x[mine], ids[mine], K=12, iters=10, seed=3, backend=backend)
        by_id = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        by_id[dist.concat_all_gather(ids[mine])] = dist.concat_all_gather(assign)
        out[backend] = {"centroids": centroids, "assignments": by_id}
    return out


def check_attack(data):
    """HEXA-MoCo's attack under DDP (test_hexa_moco.py): no gradient all-reduce and no parameter .grad from the
    attack; the training step still synchronises; the queue gets the clean keys once per step."""
    from hexa_moco import MoCo, adversarial_view, cutmix

    torch.manual_seed(0)
    model = DistributedDataParallel(MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2, bn_group_size=4))
    moco = model.module
    reductions = []
    model.register_comm_hook(None, lambda state, bucket: reductions.append(1) or allreduce_hook(None, bucket))
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    torch.manual_seed(100 + dist.rank())  # different images on each process
    result = {"grad_none_after_attack": [], "reductions_after_attack": [], "grads_equal": [], "losses": []}
    for step in range(2):
        im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
        k = moco.keys(im_k)
        zeros = torch.zeros(4, dtype=torch.long)

        def loss_fn(x):
            return F.cross_entropy(moco.contrast(F.normalize(moco.encoder_q(x).float(), dim=1), k), zeros)

        n = len(reductions)
        im_adv = adversarial_view(moco.encoder_q, loss_fn, im_q, 2 / 255, 2 / 255, 2)
        result["reductions_after_attack"].append(len(reductions) - n)
        result["grad_none_after_attack"].append(all(p.grad is None for p in model.parameters()))
        im_mix, partner, lam = cutmix(im_q)
        logits, labels, hard = model(im_q, k, im_adv, im_mix, partner)
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(hard["adv"], labels)
        mix = [F.cross_entropy(logits_mix, labels) for logits_mix in hard["mix"]]
        loss = loss + lam * mix[0] + (1 - lam) * mix[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        grads = torch.cat([p.grad.flatten() for p in moco.encoder_q.parameters()])
        result["grads_equal"].append(torch.equal(*dist.concat_all_gather(grads[None])))
        result["losses"].append(loss.item())
        optimizer.zero_grad(set_to_none=True)
    result["reductions"] = len(reductions)
    result["queue_ptr"] = int(moco.queue_ptr)
    result["queue_equal"] = torch.equal(*dist.concat_all_gather(moco.queue[None]))
    return result  # the DDP model and its Python comm hook are freed here, not at interpreter exit (gloo aborts)


def check_monitor(data):
    """The kNN monitor with its images split over the processes (test_monitor.py)."""
    from test_monitor import MONITOR

    torch.manual_seed(0)
    trunk = torchvision.models.resnet18()  # the same weights on both processes (same seed)
    monitor = KNNMonitor(data, device=torch.device("cpu"), **MONITOR)
    stats = monitor(trunk)
    train_loader, val_loader = monitor.loaders
    memory = monitor._gather(monitor._embed(trunk.eval(), train_loader), len(monitor.train_set))
    n_val = dist.all_reduce_sum(torch.tensor([len(val_loader.dataset)]))
    return {"stats": stats, "memory": memory, "n_val": int(n_val)}


CHECKS = {name[len("check_") :]: f for name, f in list(globals().items()) if name.startswith("check_")}


def runs(out):
    """(output folder, script, flags): the end-to-end runs in two processes, with the device views; the evaluation
    scripts run on the checkpoints of the runs before them."""
    from conftest import DC_TINY, MOCO_TINY, PRETRAINED, TINY
    from test_amp import AMP_RUNS

    def ckpt(name):
        return os.path.join(out, name, "checkpoint.pth")

    device, two = ["--views", "device"], ["--epochs", "2"]
    return [
        ("moco_v2", "moco_v2", [*MOCO_TINY, *device, *two]),
        ("mochi", "mochi", [*PRETRAINED["mochi.py"], *device, *two]),
        ("hexa_moco", "hexa_moco", [*MOCO_TINY, *device, *two]),
        ("deepcluster_v2", "deepcluster_v2", [*DC_TINY, *device, *two]),
        ("hexa_dcluster", "hexa_dcluster", [*DC_TINY, "--adv-weight", "1", *device, *two]),
        ("lincls_moco_v2", "lincls", [*TINY, "--epochs", "1", "--pretrained", ckpt("moco_v2")]),
        ("lincls_deepcluster_v2", "lincls", [*TINY, "--epochs", "1", "--pretrained", ckpt("deepcluster_v2")]),
        ("finetune_moco_v2", "finetune", [*TINY, "-b", "4", *two, "--schedule", "1", "--pretrained", ckpt("moco_v2")]),
        # the bf16 path on the CPU (test_amp.py): one epoch of the tiny data, --amp on
        *[(f"amp_{name}", name, [*flags, *device, "--epochs", "1", "--amp", "on"]) for name, flags in AMP_RUNS.items()],
        ("amp_lincls", "lincls", [*TINY, "--epochs", "1", "--amp", "on", "--pretrained", ckpt("moco_v2")]),
    ]


if __name__ == "__main__":
    import importlib

    data, out = sys.argv[1:3]
    device = dist.init_distributed("cpu")
    for name, check in CHECKS.items():
        result = check(data)
        if dist.is_main():
            torch.save(result, os.path.join(out, f"{name}.pt"))
    # The runs share this launch's process group: a group destroyed and created again in the same processes can
    # read the previous group's addresses from the store. So each main() finds the group it would have made.
    init, cleanup = dist.init_distributed, dist.cleanup
    dist.init_distributed, dist.cleanup = (lambda *_: device), (lambda: None)
    for name, script, flags in runs(out):
        mod = importlib.import_module(script)
        mod.main(mod.get_args_parser().parse_args([data, *flags, "--output-dir", os.path.join(out, name)]))
        torch.distributed.barrier()
    cleanup()
