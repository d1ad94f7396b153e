"""DeepCluster-v2: distributed spherical k-means, the prototype and target wiring, the loss, LARS and the schedule,
end-to-end runs, exact resume (memory bank checkpointed), linear evaluation, bad input."""

import argparse
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import DC_TINY, PRETRAINED, load_checked, load_ckpt, main_error, read_log, run_main

from deepcluster_v2 import (
    LARS,
    DeepClusterV2,
    cluster_memory,
    deepcluster_loss,
    lr_schedule,
    m_step,
    nearest_centroid,
    spherical_kmeans,
)


def kmeans_data(n=240, dim=16, clusters=6, seed=0):
    """Unit rows around `clusters` random unit centres (well separated), with shuffled, non-contiguous dataset ids."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    labels = torch.arange(n) % clusters
    x = F.normalize(centres[labels] + 0.05 * torch.randn(n, dim, generator=g), dim=1)
    ids = torch.randperm(3 * n, generator=g)[:n]  # a memory holds some of the dataset's ids, in any order
    return x, ids


def same_partition(a, b):
    """a and b split the items into the same groups (a bijection between their labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_recovers_separated_clusters(process_group, backend):
    x, ids = kmeans_data(clusters=6)
    truth = torch.arange(len(x)) % 6
    # The reference initialisation (random rows, no k-means++) can put two seeds in one cluster; take the first
    # seed whose initial rows cover all 6 clusters, then 10 iterations must recover the clusters exactly.
    seed = next(s for s in range(100) if same_partition(spherical_kmeans(x, ids, 6, 0, s, "torch")[1], truth))
    centroids, assign = spherical_kmeans(x, ids, K=6, iters=10, seed=seed, backend=backend)
    assert same_partition(assign, truth)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(6))
    # Each centroid is the normalised mean of its cluster.
    for k in range(6):
        torch.testing.assert_close(centroids[k], F.normalize(x[assign == k].sum(0), dim=0), atol=1e-5, rtol=1e-5)


def test_initial_centroids_are_rows_of_the_memory(process_group):
    x, ids = kmeans_data()
    centroids, _ = spherical_kmeans(x, ids, K=12, iters=0, seed=5, backend="torch")
    sims = centroids @ x.T  # each initial centroid is one of the rows, and they are distinct rows
    assert torch.allclose(sims.max(dim=1).values, torch.ones(12)) and len(set(sims.argmax(1).tolist())) == 12
    again, _ = spherical_kmeans(x, ids, K=12, iters=0, seed=5, backend="torch")
    assert torch.equal(centroids, again)


def test_empty_cluster_keeps_its_centroid(process_group):
    x = F.normalize(torch.randn(10, 4), dim=1)
    centroids = F.normalize(torch.randn(3, 4), dim=1)
    assign = torch.tensor([0, 0, 0, 2, 2, 0, 2, 0, 2, 2])  # cluster 1 gets nothing
    new = m_step(x, assign, centroids)
    assert torch.equal(new[1], centroids[1])
    torch.testing.assert_close(new[0], F.normalize(x[assign == 0].sum(0), dim=0))
    torch.testing.assert_close(new[2], F.normalize(x[assign == 2].sum(0), dim=0))


def test_faiss_and_torch_backends_agree(process_group):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(3000, 32, generator=g), dim=1)
    c = F.normalize(torch.randn(100, 32, generator=g), dim=1)
    assert torch.equal(nearest_centroid(x, c, "faiss"), nearest_centroid(x, c, "torch", chunk=700))
    ids = torch.arange(3000)
    c_f, a_f = spherical_kmeans(x, ids, K=50, iters=10, seed=2, backend="faiss")
    c_t, a_t = spherical_kmeans(x, ids, K=50, iters=10, seed=2, backend="torch")
    assert torch.equal(a_f, a_t)
    torch.testing.assert_close(c_f, c_t)


def test_one_and_two_processes_agree(process_group, two_processes):
    two = two_processes["kmeans"]
    x, ids = kmeans_data()
    for backend in ("faiss", "torch"):
        centroids, assign = spherical_kmeans(x, ids, K=12, iters=10, seed=3, backend=backend)
        by_id = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        by_id[ids] = assign
        assert torch.equal(two[backend]["assignments"], by_id), backend
        torch.testing.assert_close(two[backend]["centroids"], centroids)


def test_cluster_memory_wiring(process_group):
    """After clustering, each head's prototypes are its centroids, head h clusters bank h mod 2, the assignments
    are those of the final centroids, and the images no process holds are -100."""
    torch.manual_seed(0)
    model = DeepClusterV2("resnet18", feat_dim=8, hidden_mlp=16, nmb_prototypes=[5, 6, 7])
    size_dataset, M = 50, 30
    index = torch.randperm(size_dataset)[:M]
    banks = F.normalize(torch.randn(2, M, 8), dim=2)
    args = argparse.Namespace(nmb_prototypes=[5, 6, 7], seed=0, kmeans_iters=10, kmeans_backend="faiss")
    assignments, centroids = cluster_memory(model, index, banks, size_dataset, args, epoch=3)
    assert assignments.shape == (3, size_dataset)
    unseen = torch.ones(size_dataset, dtype=torch.bool)
    unseen[index] = False
    for h, K in enumerate([5, 6, 7]):
        assert torch.equal(model.prototypes[h].weight, centroids[h]) and centroids[h].shape == (K, 8)
        assert torch.equal(assignments[h, index], nearest_centroid(banks[h % 2], centroids[h], "torch"))
        assert (assignments[h, unseen] == -100).all()
    assert not any(p.requires_grad for p in model.prototypes.parameters())


def test_every_crop_trained_towards_its_image_cluster_and_unseen_ignored():
    H, V, b, K = 2, 3, 4, 5
    scores = [torch.randn(V * b, K, requires_grad=True) for _ in range(H)]
    targets = torch.tensor([[1, -100, 3, 0], [4, -100, -100, 2]])  # H x b; image 1 was seen by no process
    loss = deepcluster_loss(scores, targets, temperature=0.1)
    expected = 0.0
    for h in range(H):  # by hand: crop v of image i (row v*b + i) towards targets[h, i], only valid images
        terms = [
            F.cross_entropy(scores[h][v * b + i] / 0.1, targets[h, i])
            for v in range(V)
            for i in range(b)
            if targets[h, i] != -100
        ]
        expected = expected + torch.stack(terms).mean()
    torch.testing.assert_close(loss, expected / H)
    loss.backward()
    for h in range(H):
        for v in range(V):
            for i in range(b):  # an unseen image's crops get no gradient; a seen one's are pushed to its target
                g = scores[h].grad[v * b + i]
                if targets[h, i] == -100:
                    assert torch.equal(g, torch.zeros(K))
                else:
                    assert g[targets[h, i]] < 0 and (g.sum().abs() < 1e-6)
    # A batch with no valid target at all: zero, finite, and backward still works.
    none = deepcluster_loss([torch.randn(6, 5, requires_grad=True)], torch.full((1, 2), -100), 0.1)
    assert none.item() == 0.0
    none.backward()


def test_multi_resolution_forward():
    torch.manual_seed(0)
    model = DeepClusterV2("resnet18", feat_dim=8, hidden_mlp=16, nmb_prototypes=[5, 7]).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    z, scores = model(crops)
    assert z.shape == (6, 8) and [s.shape for s in scores] == [(6, 5), (6, 7)]
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    with torch.no_grad():  # eval-mode BN: the grouping changes nothing per image, and scores are z C^T
        z_single, _ = model(crops[2])
    torch.testing.assert_close(z[4:], z_single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores[1], z @ model.prototypes[1].weight.T)
    sum(s.sum() for s in scores).backward()
    assert all(p.grad is None for p in model.prototypes.parameters())
    trunk = torchvision.models.resnet18()
    trunk.fc = torch.nn.Identity()
    trunk.load_state_dict(model.backbone.state_dict())  # the trunk is a plain torchvision ResNet


def test_lars_step_matches_apex_larc():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    zero = torch.nn.Parameter(torch.zeros(4))
    opt = LARS([w, zero], lr=0.5, momentum=0.9, weight_decay=0.01)
    w0 = w.detach().clone()
    w.grad, zero.grad = torch.randn(5, 3), torch.ones(4)
    g0 = w.grad.clone()
    opt.step()
    trust = 0.001 * w0.norm() / (g0.norm() + 0.01 * w0.norm() + 1e-8)
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * (g0 + 0.01 * w0))
    torch.testing.assert_close(zero.detach(), -0.5 * torch.ones(4))  # |w| = 0: plain step, no weight decay
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_lr_schedule():
    args = argparse.Namespace(lr=4.8, final_lr=0.0048, start_warmup=0.3, warmup_epochs=10, epochs=100)
    s = lr_schedule(args, steps_per_epoch=7)
    assert len(s) == 700 and s[0] == 0.3 and s[69] == 4.8 and s[70] == 4.8
    assert np.all(np.diff(s[:70]) > 0) and np.all(np.diff(s[70:]) < 0) and 0.0048 < s[-1] < 0.0049


def check_checkpoint(path, epochs, nproc):
    state = load_checked(path, "deepcluster_v2", epochs)
    for k, v in state["backbone"].items():
        assert torch.equal(v, state["model"]["backbone." + k])
    memory = state["extra"]["memory"]  # every process's bank, rank order: 128 images, 2 banks of 16-dim rows
    assert memory["index"].shape == (128,) and memory["embeddings"].shape == (2, 128, 16)
    assert sorted(memory["index"].tolist()) == list(range(128))
    torch.testing.assert_close(memory["embeddings"].norm(dim=2), torch.ones(2, 128))
    for h in range(3):
        torch.testing.assert_close(state["model"][f"prototypes.{h}.weight"].norm(dim=1), torch.ones(20))
    return state


def test_end_to_end(pretrained):
    """One process, the device views: the log, the checkpoint with its memory bank and prototypes, the monitor."""
    out = pretrained("deepcluster_v2.py")
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in log)
    assert all(0 < r["train/largest_cluster"] <= 1 and r["train/embed_spread"] > 0 for r in log)
    assert all(0 <= r["train/empty_clusters"] < 1 and r["train/largest_over_mean"] >= 1 for r in log)
    assert "train/assign_nmi" not in log[0] and 0 <= log[1]["train/assign_changed"] <= 1  # from the second epoch
    assert 0 <= log[-1]["knn/acc1"] <= 100
    check_checkpoint(out / "checkpoint.pth", epochs=2, nproc=1)


def test_two_processes_end_to_end_and_lincls(two_processes):
    """Two processes, the device views (tests/dist_checks.py), then lincls.py in two processes on the checkpoint."""
    out, lin = two_processes["deepcluster_v2"], two_processes["lincls_deepcluster_v2"]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2] and all(r["train/loss"] > 0 for r in log)
    check_checkpoint(out / "checkpoint.pth", epochs=2, nproc=2)
    rec = read_log(lin)[-1]
    assert 0 <= rec["val/acc1"] <= 100 and rec["val/acc5"] >= rec["val/acc1"]
    trunk = load_ckpt(lin / "checkpoint.pth")["backbone"]
    pretrained = load_ckpt(out / "checkpoint.pth")["backbone"]
    assert all(torch.equal(trunk[k], v) for k, v in pretrained.items())


def test_resume_matches_uninterrupted_run(tiny_data, pretrained, tmp_path, capsys):
    # The shared run has a constant lr (no warm-up, cosine from --lr to --final-lr = --lr), so a 1-epoch run is its
    # first epoch; that run's latest checkpoint holds the memory bank, which kept copies leave out. Device views.
    full, resumed = pretrained("deepcluster_v2.py"), tmp_path / "resumed"
    args = [tiny_data, *PRETRAINED["deepcluster_v2.py"], "--views", "device"]
    run_main("deepcluster_v2.py", *args, "--epochs", 1, "--output-dir", resumed)
    assert "memory" in load_ckpt(resumed / "checkpoint.pth")["extra"]
    run_main("deepcluster_v2.py", *args, "--epochs", 2, "--output-dir", resumed, "--resume")
    assert "memory bank rebuilt" not in capsys.readouterr().out
    a, b = load_ckpt(full / "checkpoint.pth"), load_ckpt(resumed / "checkpoint.pth")
    assert b["epoch"] == 2
    for k, v in a["model"].items():  # trunk, head and the prototypes (the centroids of epoch 2)
        assert torch.equal(v, b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    for k in ("index", "embeddings"):
        assert torch.equal(a["extra"]["memory"][k], b["extra"]["memory"][k])
    assert read_log(full)[-1]["train/loss"] == read_log(resumed)[-1]["train/loss"]
    # A kept copy has no memory bank: resuming from it rebuilds the bank with a no-grad pass, and goes on.
    kept = load_ckpt(full / "checkpoint_0002.pth")
    assert "memory" not in kept["extra"] and all(torch.equal(v, a["model"][k]) for k, v in kept["model"].items())
    shutil.copy(full / "checkpoint_0002.pth", tmp_path / "kept.pth")
    run_main(
        "deepcluster_v2.py", *args, "--epochs", 3, "--output-dir", tmp_path / "more", "--resume", tmp_path / "kept.pth"
    )
    assert "memory bank rebuilt" in capsys.readouterr().out and read_log(tmp_path / "more")[-1]["epoch"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--nmb-prototypes", "200"],
            "the memory holds 128 images over all processes, fewer than --nmb-prototypes 200",
        ),
        (["--crops-for-assign", "0", "4"], "--crops-for-assign [0, 4]: crop ids must lie in 0..3"),
        (
            ["--size-crops", "32"],
            "--nmb-crops, --size-crops, --min-scale-crops and --max-scale-crops need the same length",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_data, tmp_path, flags, message):
    assert message in main_error("deepcluster_v2", tiny_data, *DC_TINY, *flags, "--output-dir", tmp_path)
