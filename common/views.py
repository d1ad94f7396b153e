"""Augmented views: MoCo v2 "aug-plus" two-crop views, SwAV-style multi-crop views, and the evaluation
transforms. Parameters and op order follow the reference code: the MoCo repository's main_moco.py (--aug-plus) and
moco/loader.py, and the SwAV repository's src/multicropdataset.py (one difference: its std, noted at STD)."""

import random

from PIL import Image, ImageFilter
from torchvision import transforms as T

from common.cli import UserError, reason

# ImageNet statistics. The SwAV repository writes std 0.228 for red, a typo for 0.229; we use 0.229 everywhere.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_rgb(file, name: str | None = None) -> Image.Image:
    """An image file (a path, or a file object named `name`) as an RGB Pillow image; a UserError if unreadable."""
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except Exception as err:  # a missing, truncated, corrupt or unreadable file
        raise UserError(f"cannot read image {name or file}: {reason(err)}") from None


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from [sigma_min, sigma_max] (SimCLR / MoCo v2)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCrops:
    """Two independent draws of the same transform: [query view, key view]."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return [self.transform(img), self.transform(img)]


def moco_v2_view(crop_size: int = 224, min_scale: float = 0.2) -> T.Compose:
    """MoCo v2 aug-plus, its crop scale (min_scale, 1) (0.2 published)."""
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size, scale=(min_scale, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


class MultiCrop:
    """SwAV-repo multi-crop: nmb_crops[i] crops of size_crops[i], scale (min_scale[i], max_scale[i]), in that order."""

    def __init__(self, nmb_crops, size_crops, min_scale_crops, max_scale_crops):
        self.transforms = []
        for n, size, lo, hi in zip(nmb_crops, size_crops, min_scale_crops, max_scale_crops):
            t = T.Compose(
                [
                    T.RandomResizedCrop(size, scale=(lo, hi)),
                    T.RandomHorizontalFlip(p=0.5),
                    T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
                    T.RandomGrayscale(p=0.2),
                    T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
                    T.ToTensor(),
                    T.Normalize(MEAN, STD),
                ]
            )
            self.transforms += [t] * n

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def eval_train_view(crop_size: int = 224) -> T.Compose:
    """Training view of the linear and fine-tuning protocols: random resized crop (0.08-1) and flip."""
    return T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_val_view(crop_size: int = 224) -> T.Compose:
    """Validation view: resize the short side to crop_size * 256/224, centre crop."""
    return T.Compose(
        [T.Resize(round(crop_size * 256 / 224)), T.CenterCrop(crop_size), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
