"""The batched device views (common/device_views.py) on CPU tensors: each op against torchvision's functional op,
the drawn parameters against the Pillow pipeline's distributions, decoding, determinism, and the loader."""

import io
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F1
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T

from common import device_views as dv
from common.cli import UserError
from common.data import ImageFolder, read_bytes, train_loader
from common.synthetic import make_image_folder
from common.views import MEAN, STD, MultiCrop, TwoCrops, eval_train_view, eval_val_view, moco_v2_view

CPU = torch.device("cpu")
ALPHA_KS = 1.95  # Kolmogorov-Smirnov critical coefficient at alpha = 0.001


def ks_2samp(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_uniform(x, lo, hi) -> float:
    """One-sample Kolmogorov-Smirnov statistic against U(lo, hi)."""
    x = np.sort((np.asarray(x, dtype=np.float64) - lo) / (hi - lo))
    i = np.arange(1, len(x) + 1) / len(x)
    return float(max((i - x).max(), (x - (i - 1 / len(x))).max()))


def ks_critical(n, m=None) -> float:
    return ALPHA_KS * math.sqrt(1 / n + 1 / m) if m else ALPHA_KS / math.sqrt(n)


def images(n=4, h=40, w=50, seed=0):
    """N x 3 x H x W in [0, 1], with a grey image and a grey band (no hue) and ties between channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[0] = x[0, :1]
    x[1, :, : h // 4] = 0.5
    x[2, 0] = x[2, 1]
    return x


# ============ each op equals torchvision's functional op for fixed parameters ============


# The single ops, as the pipeline runs them (a blend, a separable blur, a jitter plan), one parameter per image.
def adjust_brightness(x, factor):
    return dv._blend(x, dv._per_image(factor, x))


def adjust_contrast(x, factor):  # blend each image with the mean of its grayscale image
    f = dv._per_image(factor, x)
    return dv._blend(x, f, c=1 - f)


def adjust_saturation(x, factor):  # blend each image with its grayscale image
    f = dv._per_image(factor, x)
    return dv._blend(x, f, b=1 - f)


def gaussian_blur(x, sigma, kernel_size):
    return dv._blur(x, dv.gaussian_kernels(torch.as_tensor(sigma, dtype=torch.float32).expand(len(x)), kernel_size))


def step(spec, kind):
    """The step of this kind in a view's specification (None without one)."""
    return next((s for s in spec.steps if isinstance(s, kind)), None)


def color_jitter(x, factors, order, applied, hue=True):
    """Per-image factors (N, 4), op order (N, 4) and whether the jitter applies (N,), as DeviceViews runs them."""
    plan, host = dv._jitter_plan(factors, order, applied, hue)
    return dv._run_jitter(x, plan, dv._send(host, x.device))


def test_resized_crop_matches_torchvision():
    """Antialiased resized crop, down and up, square and not: equal to TF.resized_crop (antialias=True), atol 1e-6."""
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, 60, 80, generator=g) for _ in range(4)]
    boxes = torch.tensor([[0, 0, 60, 80], [5, 7, 20, 30], [10, 3, 40, 50], [59, 79, 1, 1]])
    for size in [(24, 24), (32, 20), (96, 96)]:
        out = dv.resized_crops(imgs, boxes, size)
        assert out.shape == (4, 3, *size)
        for img, box, y in zip(imgs, boxes.tolist(), out):
            torch.testing.assert_close(y, TF.resized_crop(img, *box, list(size), antialias=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "ours, theirs, factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 1.0, 1.8]),
        (adjust_contrast, TF.adjust_contrast, [0.0, 0.3, 1.0, 1.8]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.3, 1.0, 1.8]),
        (dv.adjust_hue, TF.adjust_hue, [-0.5, -0.2, 0.0, 0.5]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_ops_match_torchvision(ours, theirs, factors):
    """One factor per image in one batched call, equal to torchvision's op image by image: atol 1e-6 (hue 1e-5, the
    closed-form HSV inverse rounds differently from the six-sector table)."""
    x = images()
    out = ours(x, torch.tensor(factors))
    atol = 1e-5 if ours is dv.adjust_hue else 1e-6
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(x[i], f), atol=atol, rtol=0)


def test_grayscale_flip_normalize_match_torchvision():
    """Grayscale (3 channels) and normalisation: atol 1e-6; flip: exact, only where the mask says."""
    x = images()
    torch.testing.assert_close(dv.rgb_to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    mask = torch.tensor([True, False, True, False])
    flipped = dv.hflip(x, mask)
    for i in range(4):
        assert torch.equal(flipped[i], TF.horizontal_flip(x[i]) if mask[i] else x[i])
    torch.testing.assert_close(dv.normalize(x.clone(), MEAN, STD), TF.normalize(x, MEAN, STD), atol=1e-6, rtol=0)


def test_gaussian_blur_matches_torchvision():
    """A true Gaussian per image, kernel 13 (2 ceil(3 * 2) + 1), reflect padding: equal to TF.gaussian_blur with the
    same kernel size and sigma, atol 1e-6 (separable here, one 2-D kernel there)."""
    x = images()
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    assert dv.Blur((0.1, 2.0), 0.5).kernel_size == 13
    out = gaussian_blur(x, sigma, 13)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [13, 13], [s, s]), atol=1e-6, rtol=0)


def test_color_jitter_applies_each_images_own_order():
    """The batched jitter equals, per image, torchvision's four ops applied in that image's order (and nothing where
    it is not applied): atol 1e-5."""
    x = images(6, seed=3)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.6, 1.4, 0.5, -0.1], [1.8, 0.2, 1.7, 0.2]]).repeat(2, 1)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1], [1, 0, 3, 2], [3, 0, 2, 1], [0, 1, 2, 3]])
    applied = torch.tensor([True, True, True, True, True, False])
    out = color_jitter(x, factors, order, applied)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        ref = x[i]
        for o in order[i].tolist() if applied[i] else []:
            ref = ops[o](ref, float(factors[i, o]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_fixed_crop_and_flip_match_the_pillow_view():
    """With jitter, grey and blur off, a view equals the Pillow path's (crop, resize, flip, ToTensor, Normalize) on
    the same box within 1.5/255 in pixel space: Pillow rounds its resize to uint8, the tensor path does not."""
    img = Image.open(io.BytesIO(_jpeg(_picture(120, 160)))).convert("RGB")
    views = dv.from_transform(TwoCrops(moco_v2_view(32)))
    boxes = torch.tensor([[10, 20, 90, 100], [0, 0, 120, 160]])
    flip = torch.tensor([False, True])
    params = [
        {
            "crop": boxes,
            "jitter": torch.zeros(2, dtype=torch.bool),
            "factors": torch.ones(2, 4),
            "order": torch.arange(4).repeat(2, 1),
            "gray": torch.zeros(2, dtype=torch.bool),
            "blur": torch.zeros(2, dtype=torch.bool),
            "sigma": torch.ones(2),
            "flip": flip,
        }
    ]
    q, k = views.augment([torch.from_numpy(np.array(img)).permute(2, 0, 1)], params)
    for y, box, f in zip([q[0], k[0]], boxes.tolist(), flip.tolist()):
        pil = F1.resized_crop(img, *box, [32, 32])
        pil = F1.hflip(pil) if f else pil
        ref = F1.to_tensor(pil)
        unnorm = y * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        assert (unnorm - ref).abs().max() <= 1.5 / 255


# ============ the drawn parameters follow the Pillow pipeline's distributions ============


def _crop_stats(boxes, H, W):
    top, left, h, w = boxes.double().unbind(1)
    return {
        "area": (h * w / (H * W)).numpy(),
        "log_aspect": torch.log(w / h).numpy(),
        "centre_y": ((top + h / 2) / H).numpy(),
        "centre_x": ((left + w / 2) / W).numpy(),
    }


@pytest.mark.parametrize(
    "H, W, scale",
    [(375, 500, (0.2, 1.0)), (375, 500, (0.05, 0.14)), (48, 48, (0.14, 1.0)), (100, 300, (0.2, 1.0))],
    ids=["moco", "small-crop", "tiny-image", "elongated-fallback"],
)
def test_crop_distribution_matches_torchvision_get_params(H, W, scale):
    """Area fraction, log aspect ratio and crop centre of 3000 vectorised draws against 3000 draws of torchvision's
    RandomResizedCrop.get_params on an image of the same size: two-sample KS below the alpha = 0.001 critical value
    (0.050). The elongated 100 x 300 image makes the fallback (centred 100 x 133 box) trigger in about 15 % of the
    draws; its rate must agree within 4 binomial sigmas. The same statistic must reject a wrong scale range and one
    draw shared by a batch of 64, so the test has the power to catch them."""
    n, ratio = 3000, (3 / 4, 4 / 3)
    torch.manual_seed(0)
    ours = dv.draw_crops(torch.full((n,), H), torch.full((n,), W), scale, ratio)
    dummy = torch.empty(1, H, W)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(n)])
    top, left, h, w = ours.unbind(1)
    assert ((top >= 0) & (left >= 0) & (h > 0) & (w > 0) & (top + h <= H) & (left + w <= W)).all()
    a, b = _crop_stats(ours, H, W), _crop_stats(theirs, H, W)
    crit = ks_critical(n, n)
    for key in a:
        assert ks_2samp(a[key], b[key]) < crit, key
    fallback = torch.tensor([(H - 100) // 2, (W - 133) // 2, 100, 133]) if (H, W) == (100, 300) else None
    if fallback is not None:
        rate_ours, rate_theirs = (ours == fallback).all(1).double().mean(), (theirs == fallback).all(1).double().mean()
        assert 0.05 < rate_theirs < 0.3
        assert abs(rate_ours - rate_theirs) < 4 * math.sqrt(2 * rate_theirs * (1 - rate_theirs) / n)
    # Power: a wrong scale range and one draw per batch of 64 both fail the same test.
    wrong = dv.draw_crops(
        torch.full((n,), H), torch.full((n,), W), (scale[0] + (scale[1] - scale[0]) / 4, scale[1]), ratio
    )
    shared = ours[: n // 64].repeat_interleave(64, 0)
    assert ks_2samp(_crop_stats(wrong, H, W)["area"], b["area"]) > crit
    assert max(ks_2samp(_crop_stats(shared, H, W)[k], b[k]) for k in b) > crit


def test_crop_fallback_on_a_very_elongated_image():
    """No try fits a 20 x 1000 image: every draw is torchvision's fallback, the centred 20 x 27 box."""
    torch.manual_seed(0)
    boxes = dv.draw_crops(torch.full((200,), 20), torch.full((200,), 1000), (0.2, 1.0), (3 / 4, 4 / 3))
    expected = T.RandomResizedCrop.get_params(torch.empty(1, 20, 1000), [0.2, 1.0], [3 / 4, 4 / 3])
    assert expected == (0, 486, 20, 27)
    assert (boxes == torch.tensor(expected)).all()


@pytest.mark.parametrize("family", ["moco_v2", "multi-crop"])
def test_rates_ranges_and_order_match_the_pillow_views(family):
    """20000 draws: flip, jitter, grey and blur rates within 4 binomial sigmas of the transform's p (0.014 at p 0.5);
    brightness / contrast / saturation / hue factors and blur sigma uniform over the transform's ranges (one-sample
    KS below the alpha = 0.001 critical value 0.014, every draw inside the range); the jitter order a permutation per
    image, uniform over the 24 permutations (chi-square, 23 degrees of freedom, below 49.7 = alpha 0.001)."""
    transform = (
        TwoCrops(moco_v2_view(224)) if family == "moco_v2" else MultiCrop([2, 6], [224, 96], [0.14, 0.05], [1, 0.14])
    )
    x = 0.4 if family == "moco_v2" else 0.8
    hue = 0.1 if family == "moco_v2" else 0.2
    (spec, _), *_ = dv.from_transform(transform).groups
    n = 20000
    torch.manual_seed(0)
    p = dv.draw_params(spec, torch.full((n,), 375), torch.full((n,), 500))
    for key, rate in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)]:
        assert abs(p[key].double().mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n), key
    ranges = [(1 - x, 1 + x)] * 3 + [(-hue, hue)]
    for j, (lo, hi) in enumerate(ranges):
        f = p["factors"][:, j]
        assert lo <= f.min() and f.max() <= hi
        assert ks_uniform(f, lo, hi) < ks_critical(n), j
    assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0 and ks_uniform(p["sigma"], 0.1, 2.0) < ks_critical(n)
    order = p["order"]
    assert (order.sort(1).values == torch.arange(4)).all()
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([perms[tuple(o)] for o in order.tolist()], minlength=24)
    assert ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7


def test_every_image_and_every_view_gets_its_own_parameters():
    """Two images of one batch, and two views of one image, never share a draw (crop box, factors, sigma)."""
    b = 16
    hw = torch.full((b,), 375), torch.full((b,), 500)
    for transform, n_views in [
        (TwoCrops(moco_v2_view(224)), 2),
        (MultiCrop([2, 6], [224, 96], [0.14, 0.05], [1, 0.14]), 8),
    ]:
        torch.manual_seed(0)
        groups = dv.from_transform(transform).draw(*hw)
        crops = torch.cat([g["crop"] for g in groups])  # n_views * b, view-major
        factors = torch.cat([g["factors"] for g in groups])
        sigma = torch.cat([g["sigma"] for g in groups])
        assert len(crops) == n_views * b
        assert len(set(map(tuple, crops.tolist()))) == len(crops)
        assert len(set(map(tuple, factors.tolist()))) == len(factors)
        assert len(set(sigma.tolist())) == len(sigma)


# ============ decoding ============


def _picture(h, w, seed=0):
    """A smooth colour picture with some noise (uint8, H x W x 3)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    rgb = np.stack([128 + 90 * np.sin(xx / 9), 128 + 90 * np.cos(yy / 7), 128 + 70 * np.sin((xx + yy) / 13)], -1)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def _jpeg(array, mode="RGB", fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_decode_every_kind_of_file_joins_the_batch(tmp_path):
    """RGB, CMYK and grayscale JPEGs and a PNG named .JPEG decode in one batch, each equal to Pillow's RGB conversion
    (within 1 level for the fast decoder, exactly for the files Pillow decodes), and all of them get their views."""
    files = {
        "rgb.JPEG": _jpeg(_picture(40, 50)),
        "cmyk.JPEG": _jpeg(_picture(30, 44, 1), "CMYK"),
        "gray.JPEG": _jpeg(_picture(36, 36, 2), "L"),
        "png.JPEG": _jpeg(_picture(33, 47, 3), fmt="PNG"),
    }
    paths = []
    for name, data in files.items():
        paths.append(str(tmp_path / name))
        with open(paths[-1], "wb") as f:
            f.write(data)
    blobs = [read_bytes(p) for p in paths]
    decoded = dv.decode(blobs, paths, CPU)
    for path, img in zip(paths, decoded):
        ref = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert img.dtype == torch.uint8 and img.shape == ref.shape
        assert (img.int() - ref.int()).abs().max() <= 1, path
    q, k = dv.from_transform(TwoCrops(moco_v2_view(32)))(blobs, paths, CPU)
    assert q.shape == k.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_decode_corrupt_file_is_a_user_error(tmp_path, kind):
    """An unreadable file among good ones: UserError("cannot read image <path>: ..."), as the Pillow path."""
    good = _jpeg(_picture(40, 50))
    bad = {"garbage": b"not an image at all" * 10, "truncated": good[: len(good) // 2], "empty": b""}[kind]
    paths = [str(tmp_path / "good.JPEG"), str(tmp_path / "bad.JPEG")]
    for path, data in zip(paths, [good, bad]):
        with open(path, "wb") as f:
            f.write(data)
    with pytest.raises(UserError, match=f"^cannot read image {paths[1]}: "):
        dv.decode([read_bytes(p) for p in paths], paths, CPU)


# ============ the pipeline ============


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("dv")), classes=2, train_per_class=8, val_per_class=1)


def _encoded_batch(folder, n=8):
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(folder, "train")) for f in fs)[:n]
    return [read_bytes(p) for p in paths], paths


def test_same_seed_same_views_normalised_float32(folder):
    """Both families: the same seed gives bit-identical views; a different seed different ones; float32, B x 3 x S x
    S per view in the Pillow path's order; un-normalised the pixels lie in [0, 1] (up to 1e-6 of rounding)."""
    blobs, paths = _encoded_batch(folder)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for transform, sizes in [
        (TwoCrops(moco_v2_view(32)), [32, 32]),
        (MultiCrop([2, 3], [32, 16], [0.14, 0.05], [1, 0.14]), [32, 32, 16, 16, 16]),
    ]:
        views = dv.from_transform(transform)
        torch.manual_seed(0)
        a = views(blobs, paths, CPU)
        torch.manual_seed(0)
        b = views(blobs, paths, CPU)
        c = views(blobs, paths, CPU)
        assert [tuple(v.shape) for v in a] == [(8, 3, s, s) for s in sizes]
        assert all(v.dtype == torch.float32 for v in a)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not any(torch.equal(x, y) for x, y in zip(a, c))
        for v in a:
            pixels = v * std + mean
            assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_from_transform_reads_the_pillow_transform_and_refuses_unknown_ops():
    views = dv.from_transform(MultiCrop([2, 6], [224, 96], [0.14, 0.05], [1, 0.14]))
    assert [(spec.size, spec.scale, n) for spec, n in views.groups] == [
        ((224, 224), (0.14, 1), 2),
        ((96, 96), (0.05, 0.14), 6),
    ]
    spec = views.groups[0][0]
    jitter = step(spec, dv.Jitter)
    assert [jitter.brightness, jitter.contrast, jitter.saturation] == [pytest.approx((0.2, 1.8))] * 3
    assert (jitter.hue, jitter.p) == ((-0.2, 0.2), 0.8)
    assert step(spec, dv.Grayscale).p == 0.2 and step(spec, dv.Blur) == dv.Blur((0.1, 2.0), 0.5)
    assert (spec.mean, spec.std) == (MEAN, STD)
    assert dv.from_transform(eval_train_view(32)).single
    with pytest.raises(ValueError, match="no batched equivalent of RandomRotation"):
        dv.from_transform(T.Compose([T.RandomResizedCrop(32), T.RandomRotation(10), T.ToTensor()]))
    with pytest.raises(ValueError, match="must start with RandomResizedCrop"):
        dv.from_transform(eval_val_view(32))


# ============ the loader ============


def _structure(batch):
    """Types, shapes, dtypes and devices of a batch, view by view."""
    return [
        [(tuple(v.shape), v.dtype, v.device) for v in x] if isinstance(x, list) else (tuple(x.shape), x.dtype)
        for x in batch
    ]


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("with_index", [False, True], ids=["targets", "with_index"])
def test_train_loader_device_views_yield_the_pillow_structure(process_group, folder, workers, with_index):
    """train_loader(views="device") yields what the Pillow loader yields (types, shapes, dtypes, order of the
    fields), forwards len / sampler / batch_size / dataset, and draws the same views from the same seed."""
    root = os.path.join(folder, "train")

    def make():  # the clustering family's dataset is with_index, the contrastive family's is not
        return MultiCrop([2, 2], [32, 16], [0.14, 0.05], [1, 0.14]) if with_index else TwoCrops(moco_v2_view(32))

    pil = train_loader(ImageFolder(root, make(), with_index=with_index), 4, workers, 0, CPU, views="pil")
    dataset = ImageFolder(root, make(), with_index=with_index)
    loader = train_loader(dataset, 4, workers, 0, CPU, views="device")
    assert isinstance(pil, DataLoader) and not isinstance(loader, DataLoader)
    assert len(loader) == len(pil) == 4 and loader.batch_size == 4 and loader.dataset is dataset
    assert isinstance(loader.sampler, DistributedSampler)
    loader.sampler.set_epoch(1)
    torch.manual_seed(0)
    batches = list(loader)
    assert len(batches) == 4
    assert _structure(batches[0]) == _structure(next(iter(pil)))
    torch.manual_seed(0)
    again = next(iter(loader))
    views, ints = (1, 0) if with_index else (0, 1)
    assert all(torch.equal(x, y) for x, y in zip(batches[0][views], again[views]))
    assert torch.equal(batches[0][ints], again[ints])


@pytest.mark.parametrize("workers", [0, 1])
def test_train_loader_device_views_name_the_unreadable_file(process_group, tmp_path, workers):
    """The batch knows each sample's path (also while workers prefetch): a corrupt file fails as the Pillow path
    does, naming that file; "auto" on the CPU is the Pillow loader; an unknown `views` is an error."""
    root = make_image_folder(str(tmp_path), classes=2, train_per_class=8, val_per_class=1)
    bad = os.path.join(root, "train", "disc", "disc_5.JPEG")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 broken")
    dataset = ImageFolder(os.path.join(root, "train"), TwoCrops(moco_v2_view(32)))
    loader = train_loader(dataset, 4, workers, 0, CPU, "device")
    with pytest.raises(UserError, match=f"^cannot read image {bad}: "):
        list(loader)
    assert isinstance(
        train_loader(ImageFolder(os.path.join(root, "train"), eval_train_view(32)), 4, 0, 0, CPU, "auto"), DataLoader
    )
    with pytest.raises(ValueError, match="views must be"):
        train_loader(ImageFolder(os.path.join(root, "train"), eval_train_view(32)), 4, 0, 0, CPU, "gpu")
