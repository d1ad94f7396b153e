"""MoCo v2: queue, momentum update, shuffle-BN and BatchNorm groups, end-to-end runs (one process and two, the
device views), exact resume (both view pipelines), linear evaluation, bad flags."""

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import MOCO_TINY, PRETRAINED, load_checked, load_ckpt, main_error, read_log, run_main

from moco_v2 import MoCo, SplitBatchNorm2d


def tiny_moco(K=12, dim=8, m=0.99):
    torch.manual_seed(0)
    return MoCo("resnet18", dim=dim, K=K, m=m, T=0.2, mlp=True)


def test_enqueue_and_wrap_around(process_group):
    model = tiny_moco(K=12, dim=8)
    batches = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(4)]
    for i, keys in enumerate(batches[:3]):
        model._dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == (4 * (i + 1)) % 12
        assert torch.equal(model.queue[:, 4 * i : 4 * i + 4], keys.T)
    old = model.queue.clone()
    model._dequeue_and_enqueue(batches[3])  # wraps: overwrites the oldest batch, columns 0..3
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], batches[3].T)
    assert torch.equal(model.queue[:, 4:], old[:, 4:])


def test_momentum_update_moves_only_key_parameters(process_group):
    model = tiny_moco(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    k_buffers = [b.clone() for b in model.encoder_k.buffers()]
    model._momentum_update_key_encoder()
    for pq, pk, new in zip(q, k, model.encoder_k.parameters()):
        torch.testing.assert_close(new, 0.9 * pk + 0.1 * pq)
        assert torch.equal(new, pk.clone().mul_(0.9).add_(pq, alpha=1 - 0.9))  # the per-parameter loop, bit for bit
        assert not new.requires_grad
    for p, old in zip(model.encoder_q.parameters(), q):
        assert torch.equal(p, old)
    for b, old in zip(model.encoder_k.buffers(), k_buffers):
        assert torch.equal(b, old)


def test_shuffle_unshuffle_is_identity_and_keys_match(process_group):
    model = tiny_moco().train()
    x = torch.randn(8, 3, 32, 32)
    x_shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
    assert not torch.equal(x_shuffled, x)  # a permutation of 8 leaves them in order with prob 1/8!
    assert torch.equal(model._batch_unshuffle_ddp(x_shuffled, idx_unshuffle), x)
    # Train-mode BatchNorm over one process's batch is permutation invariant: the keys computed through the
    # shuffle equal the keys of the unshuffled batch.
    with torch.no_grad():
        k = model._batch_unshuffle_ddp(model.encoder_k(x_shuffled), idx_unshuffle)
        torch.testing.assert_close(k, model.encoder_k(x), atol=1e-5, rtol=1e-4)


def test_split_batchnorm_is_batchnorm_per_group():
    torch.manual_seed(0)
    split, plain = SplitBatchNorm2d(5, group_size=4), torch.nn.BatchNorm2d(5)
    assert split.state_dict().keys() == plain.state_dict().keys()  # loads into a torchvision ResNet
    x = torch.randn(12, 5, 6, 6) * 3 + 1
    out = split(x)
    groups = []
    for x_g in x.split(4):  # each group of 4 through its own BatchNorm from the same start
        bn = torch.nn.BatchNorm2d(5)
        groups.append((bn(x_g), bn))
    torch.testing.assert_close(out, torch.cat([o for o, _ in groups]))
    torch.testing.assert_close(split.running_mean, torch.stack([bn.running_mean for _, bn in groups]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([bn.running_var for _, bn in groups]).mean(0))
    assert int(split.num_batches_tracked) == 1
    torch.testing.assert_close(split(x[:4]), plain(x[:4]))  # one group: BatchNorm
    split.eval(), plain.eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain(x))  # eval: the running statistics, as BatchNorm
    with pytest.raises(ValueError, match="does not split into BatchNorm groups of 4"):
        split.train()(x[:10])


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_split_batchnorm_one_call_equals_a_loop_over_groups(groups):
    """The single batch_norm call over the groups side by side equals a loop of BatchNorm over consecutive groups
    (each from a copy of the running statistics, their updates averaged): outputs, input and affine gradients,
    running statistics; with track_running_stats off, batch statistics and no update; channels_last is kept."""
    g = torch.Generator().manual_seed(groups)
    x = (torch.randn(4 * groups, 6, 5, 5, generator=g) * 3 + 1).requires_grad_()
    split = SplitBatchNorm2d(6, group_size=4)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2, generator=g), split.bias.normal_(generator=g)
        split.running_mean.normal_(generator=g), split.running_var.uniform_(0.5, 2, generator=g)
    loops = [copy.deepcopy(split) for _ in range(groups)]  # plain BatchNorm2d behaviour: one group each
    out = split(x)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.cat([torch.nn.BatchNorm2d.forward(bn, x_g) for bn, x_g in zip(loops, x_ref.split(4))])
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name in ("weight", "bias"):
        summed = sum(getattr(bn, name).grad for bn in loops)
        torch.testing.assert_close(getattr(split, name).grad, summed, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var"):
        mean = torch.stack([getattr(bn, name) for bn in loops]).mean(0)
        torch.testing.assert_close(getattr(split, name), mean, rtol=1e-5, atol=1e-6)
    assert int(split.num_batches_tracked) == 1
    frozen = {k: v.clone() for k, v in split.state_dict().items()}
    split.track_running_stats = False  # what HEXA's running_stats_frozen does for a hard pass
    torch.testing.assert_close(split(x.detach()), out.detach(), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, split.state_dict()[k]) for k, v in frozen.items())
    split.track_running_stats = True
    if groups > 1:
        cl = x.detach().contiguous(memory_format=torch.channels_last)
        assert split(cl).is_contiguous(memory_format=torch.channels_last)


def test_one_process_in_groups_trains_as_two_processes(process_group, two_processes):
    """The equivalence that makes one GPU train the 8-GPU method: 1 process x 2 BatchNorm groups of 8 gives the
    first step's logits, loss, updated weights and queue of 2 processes x 8 images (fp32 on the CPU: equal up to
    the order of the gradient sums: atol 1e-5 on logits and loss, 5e-5 on the weights after a step of lr 0.5)."""
    from dist_checks import first_step

    two, one = two_processes["split_batchnorm"], first_step(bn_group_size=8)
    torch.testing.assert_close(one["logits"], two["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one["loss"], two["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one["queue"], two["queue"], atol=1e-6, rtol=1e-5)
    for k, w in one["weights"].items():
        torch.testing.assert_close(w, two["weights"][k], atol=5e-5, rtol=1e-5, msg=k)
    whole = first_step(bn_group_size=16)  # one BatchNorm batch of 16: not the two-process method
    assert (whole["logits"] - two["logits"]).abs().max() > 1e-2


def test_key_groups_hold_a_chance_share_of_their_queries(process_group):
    """Image i's query is normalised with its query group, its key with the key group the shuffle puts it in. The
    other images of that key group fall into i's query group only by chance, (g - 1) / (N - 1) of them on average
    (1/9 here), where without the shuffle all of them would."""
    model, N, g = tiny_moco(), 64, 8
    ids = torch.arange(N).float().view(N, 1, 1, 1)  # image i holds the number i
    shares = []
    for _ in range(40):
        key_order = model._batch_shuffle_ddp(ids)[0].flatten().long()  # images in key order: groups of g
        for group in key_order.view(-1, g):
            same = (group[:, None] // g == group[None, :] // g).float()  # same query group, pairwise
            shares.append((same.sum(1) - 1) / (g - 1))  # per image: share of the others in its query group
    share = torch.cat(shares).mean().item()
    assert abs(share - (g - 1) / (N - 1)) < 0.02, share


def test_forward_logits_labels(process_group):
    model = tiny_moco(K=12)
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queue_before = model.queue.clone()
    logits, labels = model(im_q, im_k)
    assert logits.shape == (4, 13) and torch.equal(labels, torch.zeros(4, dtype=torch.long))
    # Negative logits use the queue as it was before this batch was enqueued.
    q = F.normalize(model.encoder_q(im_q), dim=1)
    torch.testing.assert_close(logits[:, 1:], q @ queue_before / 0.2, atol=1e-5, rtol=1e-4)
    assert int(model.queue_ptr) == 4


def test_two_processes_shuffle_and_queue(two_processes):
    result = two_processes["moco"]
    assert result["unshuffle_identity"] and result["keys_match_unshuffled"]
    assert result["queue_equal_across_ranks"] and result["queue_ptr"] == [8, 8]
    assert result["slices_mix_ranks"]


def check_checkpoint(path, epochs, steps, K=64, batch=16):
    state = load_checked(path, "moco_v2", epochs)
    assert int(state["model"]["queue_ptr"]) == (epochs * steps * batch) % K
    for k, v in state["backbone"].items():
        assert torch.equal(v, state["model"]["encoder_q." + k])
    return state


def test_end_to_end(pretrained):
    """One process, the device views: the log, the checkpoint schema and queue pointer, the kNN monitor."""
    out = pretrained("moco_v2.py")
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) and r["train/loss"] > 0 for r in log)
    assert all(0 < r["train/embed_spread"] <= 1.5 for r in log)
    assert all(0 <= r["knn/acc1"] <= 100 and r["knn/s"] > 0 for r in log)  # --knn-every 1
    assert log[0]["knn/acc1_random"] == log[1]["knn/acc1_random"]  # the random trunk's, measured once
    check_checkpoint(out / "checkpoint.pth", epochs=2, steps=128 // 16)


def test_two_processes_end_to_end_and_lincls(two_processes):
    """Two processes, the device views (tests/dist_checks.py), then lincls.py in two processes on the checkpoint."""
    out, lin = two_processes["moco_v2"], two_processes["lincls_moco_v2"]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2] and all(r["train/loss"] > 0 for r in log)
    check_checkpoint(out / "checkpoint.pth", epochs=2, steps=128 // 16)
    rec = read_log(lin)[-1]
    assert 0 <= rec["val/acc1"] <= 100 and rec["val/acc5"] >= rec["val/acc1"]
    trunk = load_ckpt(lin / "checkpoint.pth")["backbone"]
    pretrained = load_ckpt(out / "checkpoint.pth")["backbone"]
    assert all(torch.equal(trunk[k], v) for k, v in pretrained.items())  # frozen, BN statistics included


@pytest.mark.parametrize("views", ["pil", "device"])
def test_resume_matches_uninterrupted_run(tiny_data, pretrained, tmp_path, views):
    """A run resumed from its epoch-1 checkpoint ends bit for bit where the uninterrupted run ends. Pillow views with
    a loader worker (its seed comes from the restored RNG), and the device views (drawn in this process). The shared
    device run calls the kNN monitor after each epoch, the resumed run does not (--knn-every 0): that they still end
    alike shows that the monitor leaves training as it was."""
    if views == "device":
        full = pretrained("moco_v2.py")
        args = [tiny_data, *PRETRAINED["moco_v2.py"], "--views", "device", "--knn-every", 0]
    else:
        full, args = tmp_path / "full", [tiny_data, *MOCO_TINY, "-j", 1, "--save-freq", 1, "--views", "pil"]
        run_main("moco_v2.py", *args, "--epochs", 2, "--output-dir", full)
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.copy(full / "checkpoint_0001.pth", resumed / "epoch1.pth")  # the run as it was after epoch 1
    run_main("moco_v2.py", *args, "--epochs", 2, "--output-dir", resumed, "--resume", resumed / "epoch1.pth")
    a, b = load_ckpt(full / "checkpoint.pth"), load_ckpt(resumed / "checkpoint.pth")
    assert load_ckpt(resumed / "epoch1.pth")["epoch"] == 1 and b["epoch"] == 2
    assert [r["epoch"] for r in read_log(resumed)] == [2]  # only the second epoch ran again
    for k, v in a["model"].items():  # both encoders, the queue and its pointer
        assert torch.equal(v, b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    assert read_log(full)[-1]["train/loss"] == read_log(resumed)[-1]["train/loss"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--moco-k", 60], "--moco-k 60 must be a multiple of the global --batch-size 16"),
        (["--bn-group-size", 6], "--batch-size 16 gives 16 images per process, not a multiple of --bn-group-size 6"),
        (["--crop-min-scale", 0], "--crop-min-scale 0.0 must be in (0, 1]"),
    ],
)
def test_queue_or_groups_not_dividing_the_batch_is_an_error(tiny_data, tmp_path, flags, message):
    assert message in main_error("moco_v2", tiny_data, *MOCO_TINY, *flags, "--output-dir", tmp_path)
