"""The kNN monitor (known answers, no side effects, 1 and 2 processes alike) and the collapse warnings."""

import copy
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import snapshot

from common.cli import UserError
from common.monitor import (
    KNNMonitor,
    assignment_change,
    balanced_subset,
    check_health,
    cluster_sizes,
    embedding_spread,
    knn_predict,
    trunk_features,
)

# The monitor on the tiny folder: 32-px crops, 20 of the 32 training images per class, k = 20 of those 80.
MONITOR = dict(crop_size=32, batch_size=16, workers=0, amp=False, per_class=20, k=20)


def clusters(n, classes, dim=32, noise=0.1, seed=0):
    """Unit rows around `classes` random unit centres, and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.randint(classes, (n,), generator=g)
    return F.normalize(centres[labels] + noise * torch.randn(n, dim, generator=g), dim=1), labels


def accuracy(pred, labels):
    return 100 * (pred == labels).float().mean().item()


def test_knn_separated_classes_near_100():
    x, y = clusters(600, classes=10)
    pred = knn_predict(x[:400], x[400:], y[400:], num_classes=10, chunk=64)  # chunks: also a last, partial one
    assert accuracy(pred, y[:400]) == 100


def test_knn_random_features_near_chance():
    g = torch.Generator().manual_seed(0)
    memory, queries = (F.normalize(torch.randn(2000, 64, generator=g), dim=1) for _ in range(2))
    memory_labels, labels = torch.randint(4, (2000,), generator=g), torch.randint(4, (2000,), generator=g)
    assert 20 < accuracy(knn_predict(queries, memory, memory_labels, num_classes=4), labels) < 30  # chance 25 %


def test_knn_votes_are_weighted_by_exp_sim_over_t():
    # One close neighbour of class 1 (cos 0.9) outvotes two farther ones of class 0 (cos 0.5) at T = 0.07
    # (e^(0.9/0.07) > 2 e^(0.5/0.07)), not at T = 1 (e^0.9 < 2 e^0.5); k = min(200, 3).
    q = torch.tensor([[1.0, 0.0]])
    memory = torch.tensor([[0.9, 0.19**0.5], [0.5, 0.75**0.5], [0.5, -(0.75**0.5)]])
    memory_labels = torch.tensor([1, 0, 0])
    assert knn_predict(q, memory, memory_labels, num_classes=2).item() == 1
    assert knn_predict(q, memory, memory_labels, num_classes=2, t=1.0).item() == 0
    assert knn_predict(q, memory, memory_labels, num_classes=2, k=1, t=1.0).item() == 1  # the nearest alone


def test_balanced_subset():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    keep = balanced_subset(targets, per_class=5, seed=0)
    assert keep == sorted(keep) and len(set(keep)) == len(keep)
    assert [sum(targets[i] == c for i in keep) for c in range(3)] == [5, 3, 5]
    assert keep == balanced_subset(targets, 5, seed=0) and keep != balanced_subset(targets, 5, seed=1)


def test_trunk_features_skip_fc():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    plain = copy.deepcopy(model)
    plain.fc = torch.nn.Identity()
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))  # MoCo's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trunk_features(model, x), plain(x))


@pytest.fixture
def monitor(tiny_data, process_group):
    return KNNMonitor(tiny_data, device=torch.device("cpu"), **MONITOR)


def reference_knn(model, monitor, k, t=0.07):
    """The same top-1 written out plainly: whole-set forwards of the model with fc = Identity, then per val image a
    sort of all similarities and a Python loop over the k nearest."""
    trunk = copy.deepcopy(model).eval()
    trunk.fc = torch.nn.Identity()
    with torch.no_grad():
        memory, queries = (
            F.normalize(trunk(torch.stack([x for x, _ in s])), dim=1) for s in (monitor.train_set, monitor.val_set)
        )
    correct = 0
    for q, label in zip(queries, monitor.val_set.targets):
        sims = memory @ q
        votes = [0.0] * len(monitor.train_set.classes)
        for j in sims.argsort(descending=True)[:k].tolist():
            votes[monitor.train_set.targets[j]] += float(torch.exp(sims[j] / t))
        correct += int(np.argmax(votes) == label)
    return 100 * correct / len(queries)


def test_monitor_matches_reference_and_has_no_side_effects(monitor):
    assert len(monitor.train_set) == 4 * 20 and len(monitor.val_set) == 4 * 8
    assert [monitor.train_set.targets.count(c) for c in range(4)] == [20] * 4
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    model.layer2.eval()  # a mixed state: every module's own flag must come back
    with torch.no_grad():  # move the BN statistics away from their initial values
        model(torch.randn(8, 3, 32, 32))
    flags = {name: m.training for name, m in model.named_modules()}
    before = snapshot(model)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    stats = monitor(model)

    assert set(stats) == {"knn/acc1", "knn/s"} and stats["knn/s"] > 0
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # parameters and every buffer
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert stats["knn/acc1"] == reference_knn(model, monitor, k=20)


def test_random_trunk_reference_is_measured_once_and_changes_nothing(tiny_data, process_group):
    monitor = KNNMonitor(tiny_data, device=torch.device("cpu"), arch="resnet18", **MONITOR)
    torch.manual_seed(1)
    trunk, rng = torchvision.models.resnet18(), torch.get_rng_state()
    first = monitor(trunk)
    assert torch.equal(torch.get_rng_state(), rng)  # the random trunk is drawn under its own seed, then put back
    torch.manual_seed(0)
    expected = monitor.accuracy(torchvision.models.resnet18())  # torchvision's initialisation under seed 0
    assert first["knn/acc1_random"] == expected and monitor(trunk)["knn/acc1_random"] == expected


def test_monitor_without_val_folder(tmp_path, process_group):
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(UserError, match="--knn-every 0"):
        KNNMonitor(str(tmp_path), device=torch.device("cpu"), **MONITOR)


def test_monitor_loaders_do_not_draw_from_the_global_rng(monitor):
    state = torch.get_rng_state()
    for loader in monitor.loaders:
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)


def test_monitor_one_and_two_processes_agree(tiny_data, monitor, two_processes):
    torch.manual_seed(0)
    trunk = torchvision.models.resnet18()  # as check_monitor in tests/dist_checks.py builds it
    one = monitor(trunk)
    with torch.no_grad():
        memory = F.normalize(trunk_features(trunk.eval(), torch.stack([x for x, _ in monitor.train_set])), dim=1)
    two = two_processes["monitor"]
    assert two["stats"]["knn/acc1"] == one["knn/acc1"]
    torch.testing.assert_close(two["memory"], memory, atol=1e-5, rtol=1e-4)  # every image once, in dataset order
    assert two["n_val"] == len(monitor.val_set)


def check_loss(loss, chance, epoch, warmup_epochs):
    return check_health({"train/loss": loss}, chance, epoch, warmup_epochs)


def check_spread(spread):
    return check_health({"train/loss": 0.0, "train/embed_spread": spread}, 1.0, 1, 0)


def check_largest_cluster(fraction):
    return check_health({"train/loss": 0.0, "train/largest_cluster": fraction}, 1.0, 1, 0)


def test_loss_warning(capsys):
    chance = np.log(1 + 65536)
    (line,) = check_loss(0.99 * chance, chance, epoch=12, warmup_epochs=10)
    assert line.startswith("warning: train/loss") and capsys.readouterr().out == line + "\n" and "11.09" in line
    assert check_loss(0.99 * chance, chance, epoch=10, warmup_epochs=10) == []  # still warming up
    assert check_loss(6.9, chance, epoch=100, warmup_epochs=10) == []  # moco #12: normal
    assert check_loss(0.96 * chance, chance, epoch=100, warmup_epochs=10) == []
    assert check_loss(float("nan"), chance, epoch=100, warmup_epochs=10)  # not finite: a warning too
    capsys.readouterr()
    assert check_health({"train/loss": 0.0}, chance, 100, 10) == [] and capsys.readouterr().out == ""


def test_spread_warning(capsys):
    g = torch.Generator().manual_seed(0)
    healthy = F.normalize(torch.randn(4096, 128, generator=g), dim=1)  # a MoCo queue, transposed: K x D
    collapsed = healthy[:1].repeat(4096, 1)
    assert embedding_spread(healthy) == pytest.approx(1, abs=0.02)
    assert embedding_spread(collapsed) < 1e-3
    assert check_spread(embedding_spread(healthy)) == []
    assert capsys.readouterr().out == ""
    (line,) = check_spread(embedding_spread(collapsed))
    assert line.startswith("warning: train/embed_spread") and capsys.readouterr().out == line + "\n"


def largest_cluster(assignments):
    return cluster_sizes(assignments, [0] * len(assignments))["train/largest_cluster"]


def test_largest_cluster_warning(capsys):
    g = torch.Generator().manual_seed(0)
    healthy = torch.randint(30, (3, 1000), generator=g)  # H x N: 3 heads of 30 clusters
    collapsed = healthy.clone()
    collapsed[1, :900] = 7  # head 1: one cluster holds 90 % of the memory
    assert largest_cluster(healthy) < 0.1 and 0.9 <= largest_cluster(collapsed) < 0.92
    assert largest_cluster(torch.tensor([[0, 0, 1, -100, -100, -100]])) == pytest.approx(2 / 3)  # -100: unassigned
    assert check_largest_cluster(largest_cluster(healthy)) == []
    assert capsys.readouterr().out == ""
    (line,) = check_largest_cluster(largest_cluster(collapsed))
    assert line.startswith("warning: train/largest_cluster") and "above 0.5" in line
    assert capsys.readouterr().out == line + "\n"


def test_cluster_diagnostics():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(10, (2, 600), generator=g)  # H x N: 2 heads of 10 clusters
    relabelled = (a + 3) % 10  # the same partition under other cluster ids: nothing moved
    assert assignment_change(a, None) == {}
    assert assignment_change(relabelled, a) == pytest.approx({"train/assign_nmi": 1.0, "train/assign_changed": 0.0})
    moved = relabelled.clone()
    moved[:, :60] = (moved[:, :60] + 1) % 10  # 10 % of the images move to another cluster
    change = assignment_change(moved, a)
    assert 0.08 <= change["train/assign_changed"] <= 0.1 and 0.7 < change["train/assign_nmi"] < 1
    fresh = assignment_change(torch.randint(10, (2, 600), generator=g), a)  # an unrelated partition
    assert fresh["train/assign_changed"] > 0.7 and fresh["train/assign_nmi"] < 0.1
    unassigned = a.clone()
    unassigned[:, :300] = -100  # ignored on either side
    assert assignment_change(unassigned, a)["train/assign_changed"] == 0.0
    sizes = cluster_sizes(torch.tensor([[0, 0, 0, 1, -100], [0, 1, 2, 3, 3]]), [4, 5])
    # head 0: clusters 2 and 3 of 4 empty, the largest 3 of 4 images = 3x the mean of 1; head 1: 1 of 5 empty, 2 x 5 / 5
    assert sizes == pytest.approx(
        {"train/largest_cluster": 0.75, "train/empty_clusters": (0.5 + 0.2) / 2, "train/largest_over_mean": (3 + 2) / 2}
    )
