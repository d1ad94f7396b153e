"""HEXA-MoCo: the attack (budget, loss raised, no side effects, no DDP all-reduce), CutMix's exact lambda, the
reduction to MoCo v2 at zero weights, end-to-end runs with linear evaluation, and the diff against moco_v2.py."""

import ast
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import (
    MOCO_TINY,
    ROOT,
    assert_harmless_attack,
    diff_report,
    load_checked,
    main_error,
    read_log,
    snapshot,
)
from torch.nn.parallel import DistributedDataParallel

import hexa_moco
import moco_v2
from common import ckpt
from common.views import MEAN, STD
from hexa_moco import MoCo, adversarial_view, cutmix

# changed lines of `diff moco_v2.py hexa_moco.py`: 133 at landing, 136 with the BatchNorm groups, 172 with --hard-bn
# and the helpers pixel_stats and buffers_kept (the HEXA study); keep it under 180, grow it only with a reason
DIFF_BUDGET = 215  # raised during the HEXA study (its candidate flags); back to 180 when the losing ones go
MEAN_, STD_ = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)


def tiny_moco(K=32, dim=8):
    torch.manual_seed(0)
    return MoCo("resnet18", dim=dim, K=K, m=0.99, T=0.2, mlp=True).train()


def images(n=8, size=32, seed=1):
    """Normalised views of random pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) - MEAN_) / STD_


def moco_loss(model, k):
    """The loss train_one_epoch attacks: the queries' MoCo loss against their own keys and the queue."""
    zeros = torch.zeros(k.shape[0], dtype=torch.long)
    return lambda x: F.cross_entropy(model.contrast(F.normalize(model.encoder_q(x).float(), dim=1), k), zeros)


@pytest.mark.parametrize("eps,step,steps,random_start", [(2, 2, 1, False), (8, 2, 3, True)])
def test_attack_budget_loss_and_no_side_effects(process_group, eps, step, steps, random_start):
    model = tiny_moco()
    im_q, im_k = images(seed=1), images(seed=2)
    k = model.keys(im_k)  # the step's keys, as in train_one_epoch: before the attack
    loss_fn = moco_loss(model, k)
    before = snapshot(model)  # both encoders, BN running statistics, num_batches_tracked, the queue and pointer
    im_adv = adversarial_view(model.encoder_q, loss_fn, im_q, eps / 255, step / 255, steps, random_start)
    assert_harmless_attack(model, before, loss_fn, im_q, im_adv, eps)


def test_attack_restores_bn_statistics_it_would_have_changed(process_group):
    model = tiny_moco()
    bn = model.encoder_q.bn1
    mean, tracked = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    im_q, k = images(), model.keys(images(seed=2))
    adversarial_view(model.encoder_q, moco_loss(model, k), im_q, 2 / 255, 2 / 255, 1)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, tracked)
    model.encoder_q(im_q)  # whereas a train-mode forward does move them
    assert not torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == int(tracked) + 1


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_cutmix_lambda_is_the_exact_own_area(h, w):
    torch.manual_seed(0)
    x = torch.randn(6, 3, h, w)  # continuous values: a pixel equals the partner's only where it was pasted
    lams = []
    for _ in range(50):
        mixed, partner, lam = cutmix(x)
        assert sorted(partner.tolist()) == list(range(6)) and (partner != torch.arange(6)).all()
        pasted = (mixed != x).any(dim=1)  # N x H x W
        assert torch.equal(mixed[:, :, pasted[0]], x[partner][:, :, pasted[0]])
        assert (pasted == pasted[0]).all(), "one box for the whole batch"
        rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
        if len(rows):  # the pasted pixels form one rectangle
            assert pasted[0].sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert lam == 1 - int(pasted[0].sum()) / (h * w)  # exact, no tolerance
        assert torch.equal(mixed[~pasted.unsqueeze(1).expand_as(x)], x[~pasted.unsqueeze(1).expand_as(x)])
        lams.append(lam)
    assert min(lams) < 0.5 < max(lams) <= 1.0


def run_epoch(module, model, loader, flags):
    args = module.get_args_parser().parse_args(["DATA", "-b", "4", "--print-freq", "100", *flags])
    args.lr, args.amp = 0.03, False  # as main() resolves --amp auto on the CPU
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(5)  # shuffle-BN's permutation and, for HEXA, the CutMix draws
    return module.train_one_epoch(model, loader, optimizer, 0, args, torch.device("cpu"))


def test_zero_weights_is_moco_v2(process_group):
    loader = [([images(4, seed=10 + i), images(4, seed=20 + i)], None) for i in range(3)]
    torch.manual_seed(0)
    base = DistributedDataParallel(moco_v2.MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2))
    torch.manual_seed(0)
    hexa = DistributedDataParallel(hexa_moco.MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2))
    stats_base = run_epoch(moco_v2, base, loader, [])
    stats_hexa = run_epoch(hexa_moco, hexa, loader, ["--adv-weight", "0", "--mix-weight", "0"])
    assert stats_hexa["train/loss"] == stats_base["train/loss"]
    assert not any(key.startswith("train/hexa/") for key in stats_hexa)
    a, b = base.module.state_dict(), hexa.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # and with the default weights the hard queries do enter the loss
    torch.manual_seed(0)
    hexa = DistributedDataParallel(hexa_moco.MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2))
    stats = run_epoch(hexa_moco, hexa, loader, [])
    assert stats["train/loss"] > stats_base["train/loss"] and stats["train/hexa/adv_loss"] > 0
    assert stats["train/hexa/mix_loss"] > 0


def hard_forward(hard_bn, im_q, k, im_adv, im_mix, partner):
    torch.manual_seed(0)
    model = hexa_moco.MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2, bn_group_size=4, hard_bn=hard_bn).train()
    logits, _, hard = model(im_q, k, im_adv, im_mix, partner)
    return model, logits, hard


def test_hard_queries_batchnorm_modes(process_group):
    """--hard-bn: "own" and "separate" normalise each kind of query in groups of its own (the same logits); only
    "own" lets the hard queries move the running statistics; "shared" mixes the kinds in each group."""
    im_q, im_adv, im_mix = images(8, seed=1), images(8, seed=2), images(8, seed=3)
    k, partner = F.normalize(torch.randn(8, 8), dim=1), torch.arange(8).roll(1)
    own, logits_own, hard_own = hard_forward("own", im_q, k, im_adv, im_mix, partner)
    separate, logits_sep, hard_sep = hard_forward("separate", im_q, k, im_adv, im_mix, partner)
    shared, logits_shared, hard_shared = hard_forward("shared", im_q, k, im_adv, im_mix, partner)
    torch.testing.assert_close(logits_sep, logits_own)
    for name in ("adv", "mix"):
        torch.testing.assert_close(hard_sep[name], hard_own[name])
        assert (hard_shared[name] - hard_own[name]).abs().max() > 1e-3
    assert (logits_shared - logits_own).abs().max() > 1e-3
    clean_only, _, _ = hard_forward("own", im_q, k, None, None, None)  # the running statistics of the clean pass
    buffers = dict(separate.encoder_q.named_buffers())
    for name, b in clean_only.encoder_q.named_buffers():
        assert torch.equal(buffers[name], b), name
    assert not torch.equal(own.encoder_q.bn1.running_mean, clean_only.encoder_q.bn1.running_mean)
    # the cut-mixed query against its partner's key: the same negatives, the positive logit of the partner's key
    mix, against_partner = hard_own["mix"]
    assert torch.equal(against_partner[:, 1:], mix[:, 1:])
    with torch.no_grad():
        q_mix = F.normalize(own.encoder_q(torch.cat([im_q, im_adv, im_mix])), dim=1)[-8:]
    torch.testing.assert_close(against_partner[:, 0], (q_mix * k[partner]).sum(1) / 0.2)


def test_aux_batchnorm_keeps_the_evaluated_trunk_clean(process_group):
    """--hard-bn aux: the hard queries pass through BatchNorm layers of their own (AdvProp): the clean logits and
    encoder_q's running statistics are those of a clean-only forward, the auxiliary layers' statistics moved and
    their affine parameters take the hard losses' gradient; the saved backbone is a torchvision ResNet."""
    im_q, im_adv, im_mix = images(8, seed=1), images(8, seed=2), images(8, seed=3)
    k, partner = F.normalize(torch.randn(8, 8), dim=1), torch.arange(8).roll(1)
    aux, logits_aux, hard_aux = hard_forward("aux", im_q, k, im_adv, im_mix, partner)
    clean_only, logits_clean, _ = hard_forward("own", im_q, k, None, None, None)
    torch.testing.assert_close(logits_aux, logits_clean)
    buffers = dict(aux.encoder_q.named_buffers())
    for name, b in clean_only.encoder_q.named_buffers():
        assert torch.equal(buffers[name], b), name
    assert len(aux.aux_bn.layers) == 20 and all(int(bn.num_batches_tracked) == 1 for bn in aux.aux_bn.layers)
    (hard_aux["adv"].logsumexp(1) + hard_aux["mix"][0].logsumexp(1)).sum().backward()
    assert aux.aux_bn.layers[0].weight.grad.abs().sum() > 0 and aux.encoder_q.conv1.weight.grad.abs().sum() > 0
    assert aux.encoder_q.bn1.weight.grad.abs().sum() == 0  # the evaluated BatchNorm: no gradient from hard queries
    resnet = torchvision.models.resnet18()
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(ckpt.backbone_of(aux.encoder_q))  # strict: no auxiliary key in the trunk
    assert any(name.startswith("aux_bn.layers.") for name in aux.state_dict())  # but in the method state (resume)


@pytest.mark.parametrize("flags", [["--hard-loss", "mean"], ["--hard-start-epoch", "1"], ["--hard-bn", "aux"]])
def test_hard_loss_schedule_and_aux_in_an_epoch(process_group, flags):
    """--hard-loss mean: the weighted mean of the clean and hard losses; --hard-start-epoch 1: epoch 0 is MoCo v2's;
    --hard-bn aux: an epoch trains with the auxiliary BatchNorm under DDP."""
    loader = [([images(4, seed=10 + i), images(4, seed=20 + i)], None) for i in range(2)]
    torch.manual_seed(0)
    hexa = DistributedDataParallel(hexa_moco.MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2, hard_bn=flags[-1]
                                                  if "aux" in flags else "own"))  # fmt: skip
    stats = run_epoch(hexa_moco, hexa, loader, flags)
    if "--hard-start-epoch" in flags:
        torch.manual_seed(0)
        base = run_epoch(moco_v2, DistributedDataParallel(moco_v2.MoCo("resnet18", dim=8, K=16, m=0.99, T=0.2)),
                         loader, [])  # fmt: skip
        assert stats["train/loss"] == base["train/loss"] and "train/hexa/clean_loss" not in stats
        return
    parts = [stats[f"train/hexa/{k}_loss"] for k in ("clean", "adv", "mix")]
    expected = sum(parts) / 3 if "mean" in flags else sum(parts)
    assert stats["train/loss"] == pytest.approx(expected, rel=1e-5) and min(parts) > 0


def test_pixel_stats_are_made_once():
    assert hexa_moco.pixel_stats(torch.device("cpu")) is hexa_moco.pixel_stats(torch.device("cpu"))


def test_two_processes_attack_does_not_all_reduce(two_processes):
    result = two_processes["attack"]
    assert result["reductions_after_attack"] == [0, 0] and result["grad_none_after_attack"] == [True, True]
    assert result["reductions"] > 0 and result["grads_equal"] == [True, True]  # the training step still syncs
    assert result["queue_ptr"] == 2 * 8 % 16 and result["queue_equal"]  # clean keys only, once per step
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def check_run(out):
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        losses = torch.tensor([r["train/loss"], r["train/hexa/adv_loss"], r["train/hexa/mix_loss"]])
        assert torch.isfinite(losses).all() and (losses > 0).all()
    state = load_checked(out / "checkpoint.pth", "hexa_moco", 2)
    assert int(state["model"]["queue_ptr"]) == (2 * 8 * 16) % 64  # one enqueue of the clean keys per step


def test_end_to_end(pretrained):
    check_run(pretrained("hexa_moco.py"))


def test_two_processes_end_to_end(two_processes):
    check_run(two_processes["hexa_moco"])  # tests/dist_checks.py


def test_bad_flags_are_one_line_errors(tiny_data, tmp_path):
    assert "must not be negative" in main_error(
        "hexa_moco", tiny_data, *MOCO_TINY, "--adv-eps", -1, "--output-dir", tmp_path
    )


def test_diff_against_moco_v2_is_small_and_tagged():
    size, untagged = diff_report("moco_v2.py", "hexa_moco.py", "HEXA")
    assert size <= DIFF_BUDGET, f"{size} changed lines, budget {DIFF_BUDGET}"
    assert not untagged, "changed blocks without a `# HEXA:` tag:\n" + "\n".join(untagged)


# the same text in both HEXA scripts
HARD_EXAMPLE_CODE = ("pixel_stats", "running_stats_frozen", "AuxBatchNorm", "adversarial_view", "cutmix")


def function_sources(name):
    with open(os.path.join(ROOT, name)) as f:
        text = f.read()
    tree = ast.parse(text)
    return {
        node.name: ast.get_source_segment(text, node)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in HARD_EXAMPLE_CODE
    }


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "hexa_dcluster.py")), reason="hexa_dcluster.py not yet")
def test_hard_example_code_reads_the_same_in_hexa_dcluster():
    assert function_sources("hexa_dcluster.py") == function_sources("hexa_moco.py")
