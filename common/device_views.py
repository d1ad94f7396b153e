"""Augmented views made on the training device, batched: the workers only read the file bytes; each batch is decoded
together (batched nvJPEG on CUDA) and augmented with batched ops, random parameters per image and per view, read from
the Pillow transform (`from_transform`). `common.data.train_loader(..., views="device")` wires it in. How it works and
how it differs from Pillow: docs/data-loading.md.
"""

import io
import itertools
import math
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from common.views import GaussianBlur, MultiCrop, TwoCrops, load_rgb

# torchvision's tensor grayscale weights (ITU-R 601 luma; Pillow uses 0.299 for red).
LUMA = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op ids, as in its random order


# ============ the view specification, read from the Pillow transform ============
# One step per op of the view, in its order; p: its probability. Jitter: ColorJitter's factor ranges (lo, hi), None
# for an op that is off. Blur: one kernel size for the batch, wide enough for the largest sigma.
Jitter = namedtuple("Jitter", "brightness contrast saturation hue p")
Grayscale = namedtuple("Grayscale", "p")
Flip = namedtuple("Flip", "p")
ViewSpec = namedtuple("ViewSpec", "size scale ratio steps mean std")  # crop, steps, Normalize (mean None: none)


class Blur(namedtuple("Blur", "sigma p")):
    kernel_size = property(lambda self: 2 * math.ceil(3 * self.sigma[1]) + 1)


def from_transform(transform) -> "DeviceViews":
    """The device pipeline equal in distribution to a Pillow view transform: `TwoCrops(compose)` (two views),
    `MultiCrop(...)` (its crops, grouped by resolution in the given order) or one `Compose` (one tensor, not a list).
    Raises ValueError for an op without a batched equivalent."""
    if isinstance(transform, TwoCrops):
        return DeviceViews([(_spec(transform.transform), 2)], single=False)
    if isinstance(transform, MultiCrop):
        # MultiCrop repeats one Compose object n times per resolution: consecutive repeats form one group.
        groups = [(_spec(t), len(list(g))) for t, g in itertools.groupby(transform.transforms)]
        return DeviceViews(groups, single=False)
    if isinstance(transform, T.Compose):
        return DeviceViews([(_spec(transform), 1)], single=True)
    raise ValueError(f"device views: no batched equivalent of the view transform {_one_line(transform)}")


def _one_line(t) -> str:
    return " ".join(repr(t).split())


def _spec(compose) -> ViewSpec:
    ops = list(compose.transforms) if isinstance(compose, T.Compose) else [compose]
    crop, steps, mean, std, tensor = ops.pop(0) if ops else None, [], None, None, False
    if not isinstance(crop, T.RandomResizedCrop) or crop.interpolation != T.InterpolationMode.BILINEAR:
        raise ValueError(f"device views: a view must start with RandomResizedCrop (bilinear), got {_one_line(crop)}")
    for op in ops:
        inner, p = (op.transforms, op.p) if isinstance(op, T.RandomApply) else ([op], 1.0)
        t = inner[0] if len(inner) == 1 and mean is None else None  # one op per RandomApply, none after Normalize
        if isinstance(t, T.ColorJitter):
            steps.append(Jitter(t.brightness, t.contrast, t.saturation, t.hue, p))
        elif isinstance(t, GaussianBlur):
            steps.append(Blur(tuple(float(s) for s in t.sigma), p))
        elif isinstance(t, T.RandomGrayscale) and p == 1.0:
            steps.append(Grayscale(t.p))
        elif isinstance(t, T.RandomHorizontalFlip) and p == 1.0:
            steps.append(Flip(t.p))
        elif isinstance(t, T.ToTensor) and p == 1.0:
            tensor = True
        elif isinstance(t, T.Normalize) and p == 1.0 and tensor:
            mean, std = tuple(map(float, t.mean)), tuple(map(float, t.std))
        else:
            raise ValueError(f"device views: no batched equivalent of {_one_line(op)} in {_one_line(compose)}")
    if not tensor or len({type(s) for s in steps}) != len(steps):
        raise ValueError(f"device views: a view needs ToTensor and each op once, got {_one_line(compose)}")
    return ViewSpec(tuple(crop.size), tuple(crop.scale), tuple(crop.ratio), tuple(steps), mean, std)


# ============ random parameters, drawn on the host ============
def draw_crops(heights: torch.Tensor, widths: torch.Tensor, scale, ratio, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop.get_params for N images at once: (N, 4) int64 boxes (top, left, height, width). Up to
    `tries` attempts per image, all drawn up front (the first accepted one has the same distribution): area
    H*W*U(scale), aspect exp(U(log ratio)), w and h rounded half to even; the first with 0 < w <= W and 0 < h <= H
    wins, its corner uniform over the valid positions; without one, the centred largest box within the ratio range."""
    n = len(heights)
    H, W = heights.double(), widths.double()  # N
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    u_area = torch.empty(n, tries).uniform_(scale[0], scale[1])  # N x tries, float32 draws as torchvision's
    u_log = torch.empty(n, tries).uniform_(float(log_ratio[0]), float(log_ratio[1]))
    target = (H * W)[:, None] * u_area.double()
    aspect = torch.exp(u_log).double()
    w = torch.sqrt(target * aspect).round()  # torch.round is half to even, like Python's round
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])  # N x tries
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first accepted try (0 if none)
    found = ok.any(1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # Fallback: the image's own ratio clamped into the range, centred.
    lo, hi = min(ratio), max(ratio)
    in_ratio = W / H
    fw = torch.where(in_ratio > hi, (H * hi).round(), W)
    fh = torch.where(in_ratio < lo, (W / lo).round(), H)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, (torch.rand(n, dtype=torch.float64) * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(found, (torch.rand(n, dtype=torch.float64) * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([top, left, h, w], 1).long()


def draw_params(spec: ViewSpec, heights: torch.Tensor, widths: torch.Tensor) -> dict:
    """The random parameters of one view for N images of these sizes, from torch's default CPU generator, as host
    tensors: crop (N, 4); per step of the spec: jitter (N,) bool, factors (N, 4) brightness / contrast / saturation /
    hue, order (N, 4) op ids in the order applied; gray (N,) bool; blur (N,) bool, sigma (N,); flip (N,) bool."""
    n = len(heights)
    params = {"crop": draw_crops(heights, widths, spec.scale, spec.ratio)}
    for step in spec.steps:
        if isinstance(step, Jitter):
            ranges = [step.brightness or (1.0, 1.0), step.contrast or (1.0, 1.0), step.saturation or (1.0, 1.0)]
            lo, hi = torch.tensor(ranges + [step.hue or (0.0, 0.0)]).T  # 4 ops each
            params["jitter"] = torch.rand(n) < step.p
            params["factors"] = lo + (hi - lo) * torch.rand(n, 4)  # U[lo, hi] per op, as ColorJitter.get_params
            params["order"] = torch.rand(n, 4).argsort(1)  # a uniformly random permutation per image
        elif isinstance(step, Grayscale):
            params["gray"] = torch.rand(n) < step.p
        elif isinstance(step, Blur):
            params["blur"] = torch.rand(n) < step.p
            params["sigma"] = step.sigma[0] + (step.sigma[1] - step.sigma[0]) * torch.rand(n)
        elif isinstance(step, Flip):
            params["flip"] = torch.rand(n) < step.p
    return params


# ============ batched ops (x: N x 3 x H x W float in [0, 1] unless stated) ============
def _per_image(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or an (N,) tensor of per-image values as an N x 1 x 1 x 1 tensor on x's device."""
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def resized_crops(images: list, boxes: torch.Tensor, size) -> torch.Tensor:
    """Box k (top, left, height, width; host ints) of images[k] (3 x H x W float), resized to `size` (h, w) as
    torchvision's resized_crop(antialias=True): N x 3 x h x w."""
    out = []
    for img, (top, left, h, w) in zip(images, boxes.tolist()):
        crop = img[None, :, top : top + h, left : left + w]  # 1 x 3 x h x w, a view
        out.append(F.interpolate(crop, size=tuple(size), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out)


def _luma(x: torch.Tensor) -> torch.Tensor:
    # N x 3 x H x W -> N x 1 x H x W; the same arithmetic as torchvision's rgb_to_grayscale.
    return x[:, 0:1].mul(LUMA[0]).add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])


def _blend(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None, c: torch.Tensor | None = None):
    """clamp(a * x + b * gray(x) + c * mean(gray(x)), 0, 1) with a, b, c per image (N x 1 x 1 x 1): brightness is
    (f, 0, 0), contrast (f, 0, 1 - f), saturation (f, 1 - f, 0), nothing exactly (1, 0, 0), so one call serves a batch
    of mixed ops."""
    out = x * a
    if b is not None or c is not None:
        gray = _luma(x)  # N x 1 x H x W
        if b is not None:
            out.addcmul_(gray, b)
        if c is not None:
            out.add_(gray.mean((1, 2, 3), keepdim=True) * c)  # contrast blends with the mean grey level per image
    return out.clamp_(0, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma replicated to 3 channels."""
    return _luma(x).expand_as(x).contiguous()


def adjust_hue(x: torch.Tensor, factor) -> torch.Tensor:
    """Rotate the hue by `factor` turns (in [-0.5, 0.5]) per image, as torchvision's tensor adjust_hue: RGB ->
    (hue in sixths of a turn, max, max - min) and back by the closed form channel = max - (max - min) * clamp(min(k,
    4 - k), 0, 1), k = (n + hue) mod 6, n = 5, 3, 1 for R, G, B (the six-sector table, continuous, in [min, max])."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    minc, maxc = x.aminmax(dim=1, keepdim=True)  # N x 1 x H x W
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))  # grey pixels have no hue; avoid 0 / 0
    # Hue sector from the channel that holds the maximum (red first, then green, as torchvision and Pillow).
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (hue + 6 * _per_image(factor, x)).remainder_(6)  # N x 1 x H x W, in [0, 6)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (hue + n).remainder_(6)  # N x 3 x H x W
    return maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N,) sigmas -> N x K normalised 1-D Gaussian kernels (torchvision's _get_gaussian_kernel1d, per image)."""
    pos = torch.arange(kernel_size, dtype=torch.float32, device=sigma.device) - (kernel_size - 1) / 2
    pdf = torch.exp(-0.5 * (pos / sigma.float()[:, None]) ** 2)  # N x K
    return pdf / pdf.sum(1, keepdim=True)


def _blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    # x: n x 3 x H x W, kernels: n x K. Reflect padding as torchvision's gaussian_blur, then the separable kernel as
    # two depthwise convolutions over all n*3 channels at once (one launch per direction).
    n, c, h, w = x.shape
    k = kernels.shape[1]
    xp = F.pad(x, [k // 2] * 4, mode="reflect").reshape(1, n * c, h + k - 1, w + k - 1)
    weight = kernels.to(x.dtype).repeat_interleave(c, 0)  # n*3 x K
    xp = F.conv2d(xp, weight.view(n * c, 1, 1, k), groups=n * c)  # 1 x n*3 x H+K-1 x W
    xp = F.conv2d(xp, weight.view(n * c, 1, k, 1), groups=n * c)  # 1 x n*3 x H x W
    return xp.view(n, c, h, w)


def hflip(x: torch.Tensor, mask) -> torch.Tensor:
    """Flip left-right the images where `mask` (N,) is true."""
    return torch.where(torch.as_tensor(mask, device=x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, in place, as torchvision's Normalize."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


# ============ per-batch plans: host tensors in, one copy to the device ============
def _send(tensors: dict, device: torch.device) -> dict:
    """Host tensors to `device` as one pinned, non-blocking copy per dtype (no sync, few transfers)."""
    if device.type == "cpu":
        return tensors
    out = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
        names = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in names]).pin_memory().to(device, non_blocking=True)
        for k, part in zip(names, flat.split([tensors[k].numel() for k in names])):
            out[k] = part.view(tensors[k].shape)
    return out


def _jitter_plan(factors, order, applied, hue: bool):
    """Host side of the jitter: at position k of its order each image does one op. Brightness, contrast and
    saturation at position k are one blend over the batch (identity coefficients for images doing hue or nothing);
    the hue rotation runs only on the images whose op at position k is hue. Returns (plan, host tensors)."""
    op = torch.where(applied[:, None], order, -1)  # N x 4, -1: jitter not applied
    f = factors.float().gather(1, order)  # N x 4, the factor of the op at each position
    blend = (op >= 0) & (op != HUE)
    a = torch.where(blend, f, 1.0)
    b = torch.where(op == SATURATION, 1 - f, 0.0)
    c = torch.where(op == CONTRAST, 1 - f, 0.0)
    host, plan = {}, []
    for k in range(4):
        host[f"abc{k}"] = torch.stack([a[:, k], b[:, k], c[:, k]])  # 3 x N
        idx = (op[:, k] == HUE).nonzero()[:, 0] if hue else torch.zeros(0, dtype=torch.long)
        host[f"hue_idx{k}"], host[f"hue_f{k}"] = idx, f[idx, k]
        # What position k needs, decided on the host: skip what no image of the batch uses.
        plan.append((bool((a[:, k] != 1).any()), bool(b[:, k].any()), bool(c[:, k].any()), len(idx)))
    return plan, host


def _run_jitter(x: torch.Tensor, plan, dev: dict) -> torch.Tensor:
    for k, (any_a, any_b, any_c, n_hue) in enumerate(plan):
        if any_a or any_b or any_c:
            a, b, c = dev[f"abc{k}"].view(3, -1, 1, 1, 1)
            x = _blend(x, a, b if any_b else None, c if any_c else None)
        if n_hue:
            idx = dev[f"hue_idx{k}"]  # an index tensor, not a mask: indexing with it needs no host sync
            x[idx] = adjust_hue(x[idx], dev[f"hue_f{k}"])
    return x


# ============ decoding ============
def _jpeg_components(blob: torch.Tensor) -> int:
    """Colour components in a JPEG's frame header (3: YCbCr); 0 if not a JPEG or no frame header before the scan."""
    data = memoryview(blob.numpy())
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return 0
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return 0
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame: P, Y, X, Nf
            return data[pos + 9] if pos + 9 < len(data) else 0
        elif marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return 0
        else:
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return 0


def decode(blobs: list, paths: list, device: torch.device) -> list:
    """Encoded files (1-D uint8 host tensors) -> 3 x H x W uint8 RGB images on `device`, in order: three-component
    JPEGs in one batched `decode_jpeg` call (nvJPEG on CUDA); other files (CMYK or grey JPEG, PNG, ...) and any it
    refuses with Pillow, as the Pillow path does. A file nobody can read is a UserError naming it."""
    device = torch.device(device)
    out = [None] * len(blobs)
    fast = [i for i, b in enumerate(blobs) if _jpeg_components(b) == 3]
    if fast:
        try:
            images = decode_jpeg([blobs[i] for i in fast], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: retry one by one, the rest go to Pillow below
            images = []
            for i in fast:
                try:
                    images.append(decode_jpeg(blobs[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
        for i, img in zip(fast, images):
            out[i] = img
    for i, img in enumerate(out):
        if img is None:
            rgb = np.array(load_rgb(io.BytesIO(blobs[i].numpy().tobytes()), paths[i]))  # as the Pillow path does
            rgb = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # 3 x H x W uint8
            out[i] = rgb if device.type == "cpu" else rgb.pin_memory().to(device, non_blocking=True)
    return out


# ============ the pipeline ============
class DeviceViews:
    """Batched views: `groups` is a list of (ViewSpec, number of views), each group's views made together.
    `views(blobs, paths, device)` decodes and augments a batch, `augment(images)` decoded images; `draw(heights,
    widths)` gives the parameters `augment` would use (per group, view-major: entry v*B + b is view v of image b)."""

    def __init__(self, groups: list, single: bool):
        self.groups, self.single = groups, single

    def draw(self, heights: torch.Tensor, widths: torch.Tensor) -> list:
        return [draw_params(spec, heights.repeat(n), widths.repeat(n)) for spec, n in self.groups]

    def augment(self, images: list, params: list | None = None):
        """Decoded images (3 x H x W uint8, one device) -> list of V views (B x 3 x S x S float32, normalised), or one
        tensor for a single-view transform. Draws the parameters unless given."""
        if params is None:
            sizes = torch.tensor([img.shape[-2:] for img in images]).view(-1, 2)  # B x 2, host ints (no sync)
            params = self.draw(sizes[:, 0], sizes[:, 1])
        floats = [img.float() for img in images]  # 0..255; one conversion per image, shared by its views
        views = []
        for (spec, n), p in zip(self.groups, params):
            views += self._group(floats * n, spec, p).chunk(n)
        return views[0] if self.single else views

    def __call__(self, blobs: list, paths: list, device: torch.device):
        return self.augment(decode(blobs, paths, device))

    @staticmethod
    def _group(images: list, spec: ViewSpec, p: dict) -> torch.Tensor:
        # N = n views x B images, view-major; S = the group's output size.
        x = resized_crops(images, p["crop"], spec.size).div_(255)  # N x 3 x S x S in [0, 1], as ToTensor
        host, plans = {}, {}
        for step in spec.steps:
            if isinstance(step, Jitter):
                plans["jitter"], jitter = _jitter_plan(p["factors"], p["order"], p["jitter"], step.hue is not None)
                host.update(jitter)
            elif isinstance(step, Grayscale):
                host["gray_idx"] = p["gray"].nonzero()[:, 0]
            elif isinstance(step, Blur):
                idx = p["blur"].nonzero()[:, 0]
                host["blur_idx"], host["blur_k"] = idx, gaussian_kernels(p["sigma"][idx], step.kernel_size)
            elif isinstance(step, Flip):
                host["flip"] = p["flip"]
        if spec.mean is not None:
            host["mean"], host["std"] = torch.tensor(spec.mean), torch.tensor(spec.std)
        dev = _send(host, x.device)
        for step in spec.steps:  # in the Pillow transform's order
            if isinstance(step, Jitter):
                x = _run_jitter(x, plans["jitter"], dev)
            elif isinstance(step, Grayscale) and len(host["gray_idx"]):
                x[dev["gray_idx"]] = rgb_to_grayscale(x[dev["gray_idx"]])
            elif isinstance(step, Blur) and len(host["blur_idx"]):
                x[dev["blur_idx"]] = _blur(x[dev["blur_idx"]], dev["blur_k"])
            elif isinstance(step, Flip):
                x = hflip(x, dev["flip"])
        if spec.mean is not None:
            x = normalize(x, dev["mean"], dev["std"])
        return x
