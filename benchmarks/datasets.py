"""The learning benchmark's generated data besides the shapes of common/synthetic.py: glyphs and textures.

- "glyphs": each class is a procedurally generated glyph, a fixed set of strokes between the points of a 3 x 3 grid
  (an alphabet drawn from the seed, so every seed has its own glyphs; no two glyphs of an alphabet, or one and the
  other's mirror image, overlap by more than half, since the views are flipped). The class is in the arrangement of
  the strokes. The nuisances: the glyph's position, size (50-85 % of the image side), a small rotation (+-10 deg),
  a jitter of every stroke end, the stroke width, the ink colour and the background (each a random luminance with a
  tint of random hue; the background also shaded linearly in a random direction, and pixel noise); the ink is
  lighter or darker than the background by a luminance contrast of 50 to 100 / 255.
- "textures": each class is one kind of element (bars of one orientation, crosses, dots, rings, corners, ...)
  repeated over the whole image on a jittered lattice, with the glyphs' kind of ink and background.

Like the shapes, they put the class in the geometry, which the methods' crops and colour jitter keep, and draw the
nuisances from what those augmentations vary (position, scale, colour, brightness).

    python -m benchmarks.datasets OUT [--kind shapes|glyphs|textures] [--classes 4] [--train-per-class 32]
                                      [--val-per-class 8] [--size 48] [--seed 0]
"""

import argparse
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import synthetic  # noqa: E402

KINDS = ("shapes", "glyphs", "textures")
MAX_GLYPHS = 32
# The glyphs' geometry: strokes per glyph, largest overlap between two glyphs, box side (fraction of the image),
# rotation (degrees), jitter of the stroke ends (grid units), stroke width (fraction of the box side).
GLYPH = dict(strokes=(4, 5), iou=0.5, side=(0.5, 0.85), rotation=10, jitter=0.05, width=(0.12, 0.2))


# ============ glyphs ============

# The strokes a glyph may use: the 20 segments between 8-neighbours of the 3 x 3 grid {-1, 0, 1}^2.
_POINTS = [(x, y) for y in (-1, 0, 1) for x in (-1, 0, 1)]
_SEGMENTS = [
    (p, q) for i, p in enumerate(_POINTS) for q in _POINTS[i + 1 :] if max(abs(p[0] - q[0]), abs(p[1] - q[1])) == 1
]


def _glyph_mask(strokes, res: int = 15) -> np.ndarray:
    """A coarse binary raster of a glyph (res x res), to compare glyphs."""
    img = Image.new("L", (res, res))
    d = ImageDraw.Draw(img)
    f = (res - 1) / 2 * 0.8
    for (x0, y0), (x1, y1) in strokes:
        d.line(((res - 1) / 2 + f * x0, (res - 1) / 2 + f * y0, (res - 1) / 2 + f * x1, (res - 1) / 2 + f * y1),
               fill=1, width=3)  # fmt: skip
    return np.asarray(img, dtype=bool)


def glyph_alphabet(classes: int, seed: int) -> list[list]:
    """`classes` glyphs, each 4 or 5 strokes (grid segments) that span the whole 3 x 3 grid. A new glyph is kept when
    its raster overlaps (intersection over union) every earlier glyph and every earlier glyph's mirror image by at
    most 0.5, so the classes differ in shape also under the views' horizontal flips."""
    rng = np.random.default_rng([seed, 7919])  # its own stream: the alphabet does not shift the images' draws
    glyphs, masks = [], []
    while len(glyphs) < classes:
        n = int(rng.integers(GLYPH["strokes"][0], GLYPH["strokes"][1] + 1))
        strokes = [_SEGMENTS[i] for i in rng.choice(len(_SEGMENTS), n, replace=False)]
        xs = {c for s in strokes for p in s for c in (p[0],)}
        ys = {c for s in strokes for p in s for c in (p[1],)}
        if xs != {-1, 0, 1} or ys != {-1, 0, 1}:
            continue  # the glyph fills its box, so its size is the drawn size and nothing else
        m = _glyph_mask(strokes)
        iou = [(m & o).sum() / (m | o).sum() for mo in masks for o in (mo, mo[:, ::-1])]
        if max(iou, default=0) <= GLYPH["iou"]:
            glyphs.append(strokes)
            masks.append(m)
    return glyphs


def _luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _colour(rng: np.random.Generator, lum: float, chroma: float = 30.0) -> np.ndarray:
    """An RGB colour of luminance about `lum` with a tint of random hue and a chroma up to `chroma`."""
    h = rng.uniform(0, 2 * math.pi)
    c = rng.uniform(0, chroma)
    # A direction in RGB orthogonal to grey, rotated by the hue.
    u, v = np.array([1, -1, 0]) / math.sqrt(2), np.array([1, 1, -2]) / math.sqrt(6)
    rgb = lum + c * (math.cos(h) * u + math.sin(h) * v)
    return np.clip(rgb - (_luminance(rgb) - lum), 0, 255)


def draw_glyph(strokes, size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """One image of a glyph: random position, size, rotation, stroke jitter and width, ink and background."""
    # Background: a random colour, a linear shading in a random direction, pixel noise.
    bg = _colour(rng, rng.uniform(40, 215))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    shade = rng.uniform(0, 60) * (np.cos(angle) * xx + np.sin(angle) * yy)  # +-30 at the corners, at most
    canvas = bg + shade[..., None] + rng.normal(0, 10, (size, size, 3))
    # Ink: any colour whose luminance differs from the background's by at least 50.
    lum = _luminance(bg)
    contrast = rng.choice([-1, 1]) * rng.uniform(50, 100)
    if not 0 <= lum + contrast <= 255:
        contrast = -contrast
    ink = _colour(rng, lum + contrast)
    # Geometry: box side 50-85 % of the image, anywhere inside it, rotated +-10 deg; stroke ends jittered.
    side = rng.uniform(*GLYPH["side"]) * size
    half = side / 2
    cx, cy = rng.uniform(half, size - half, 2)
    t = math.radians(rng.uniform(-GLYPH["rotation"], GLYPH["rotation"]))
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    jitter = {p: rng.normal(0, GLYPH["jitter"], 2) for p in _POINTS}
    width = rng.uniform(*GLYPH["width"]) * side
    S = size * supersample
    mask = Image.new("L", (S, S))
    d = ImageDraw.Draw(mask)
    w = max(1.5, width) * supersample
    for p, q in strokes:
        a, b = (supersample * (np.array([cx, cy]) + 0.85 * half * rot @ (np.array(v) + jitter[v])) for v in (p, q))
        d.line((*a, *b), fill=255, width=int(round(w)))
        for e in (a, b):  # round ends, so strokes join cleanly
            d.ellipse((e[0] - w / 2, e[1] - w / 2, e[0] + w / 2, e[1] + w / 2), fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
    img = (1 - alpha) * canvas + alpha * (ink + rng.normal(0, 6, (size, size, 3)))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ============ textures ============

# Each texture class is one kind of element, repeated over the whole image on a jittered lattice. The kinds differ
# in orientation structure and form, and none changes class under a horizontal flip (the views flip).
TEXTONS = ("horizontal", "vertical", "diagonals", "plus", "saltire", "dot", "ring", "corner")
# The textures' geometry: lattice step (fraction of the image side), element size (fraction of the step), jitter
# of each element's position (fraction of the step) and orientation (degrees), stroke width (pixels).
TEXTURE = dict(period=(0.18, 0.28), element=(0.55, 0.8), jitter=0.15, rotation=12, width=(1.3, 2.2))


def _texton(d, kind: str, c: np.ndarray, r: float, t: float, w: float, rng: np.random.Generator, fill=255) -> None:
    """Draw one element of `kind` centred at c (pixels), half-size r, turned by t radians, strokes w pixels wide."""

    def seg(a, b):  # a stroke from angle-free offsets a to b, turned by t
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        p, q = c + rot @ np.asarray(a, float), c + rot @ np.asarray(b, float)
        d.line((*p, *q), fill=fill, width=max(1, int(round(w))))

    if kind == "horizontal":
        seg((-r, 0), (r, 0))
    elif kind == "vertical":
        seg((0, -r), (0, r))
    elif kind == "diagonals":  # one diagonal, either way
        seg((-r, -r), (r, r)) if rng.random() < 0.5 else seg((-r, r), (r, -r))
    elif kind == "plus":
        seg((-r, 0), (r, 0))
        seg((0, -r), (0, r))
    elif kind == "saltire":
        seg((-r, -r), (r, r))
        seg((-r, r), (r, -r))
    elif kind == "dot":
        d.ellipse((c[0] - r / 2, c[1] - r / 2, c[0] + r / 2, c[1] + r / 2), fill=fill)
    elif kind == "ring":
        d.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), outline=fill, width=max(1, int(round(w))))
    elif kind == "corner":  # an L at any of its 4 right-angle orientations
        sx, sy = rng.choice([-1, 1], 2)
        seg((-r * sx, -r * sy), (-r * sx, r * sy))
        seg((-r * sx, r * sy), (r * sx, r * sy))


def draw_texture(kind: str, size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """One image of a texture: elements of `kind` on a jittered lattice over the whole image, with a random step
    (18-28 % of the side: 4 to 6 elements across), element size, position and orientation jitter (+-12 deg), stroke
    width, ink and background (as the glyphs': random luminances and tints, the background shaded and noisy)."""
    bg = _colour(rng, rng.uniform(40, 215))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    shade = rng.uniform(0, 60) * (np.cos(angle) * xx + np.sin(angle) * yy)
    canvas = bg + shade[..., None] + rng.normal(0, 10, (size, size, 3))
    lum = _luminance(bg)
    contrast = rng.choice([-1, 1]) * rng.uniform(50, 100)
    if not 0 <= lum + contrast <= 255:
        contrast = -contrast
    ink = _colour(rng, lum + contrast)
    step = rng.uniform(*TEXTURE["period"]) * size
    r = rng.uniform(*TEXTURE["element"]) * step / 2
    w = rng.uniform(*TEXTURE["width"])
    S = size * supersample
    mask = Image.new("L", (S, S))
    d = ImageDraw.Draw(mask)
    origin = rng.uniform(0, step, 2)
    for gy in np.arange(origin[1] - step, size + step, step):
        for gx in np.arange(origin[0] - step, size + step, step):
            c = np.array([gx, gy]) + rng.normal(0, TEXTURE["jitter"] * step, 2)
            t = math.radians(rng.uniform(-TEXTURE["rotation"], TEXTURE["rotation"]))
            _texton(d, kind, supersample * c, supersample * r, t, supersample * w, rng)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
    img = (1 - alpha) * canvas + alpha * (ink + rng.normal(0, 6, (size, size, 3)))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_image_folder(
    root: str,
    classes: int = 4,
    train_per_class: int = 32,
    val_per_class: int = 8,
    size: int = 48,
    seed: int = 0,
    kind: str = "shapes",
) -> str:
    """Write root/{train,val}/<class>/<class>_<i>.JPEG and return root. `kind`: "shapes" (common.synthetic),
    "glyphs" or "textures" (module docstring); the seed draws the images and, for glyphs, the alphabet."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "shapes":
        return synthetic.make_image_folder(root, classes, train_per_class, val_per_class, size, seed)
    limit = {"glyphs": MAX_GLYPHS, "textures": len(TEXTONS)}[kind]
    if not 1 <= classes <= limit:
        raise ValueError(f"classes must be in 1..{limit} for {kind}")
    rng = np.random.default_rng(seed)
    if kind == "glyphs":
        glyphs = glyph_alphabet(classes, seed)
        painters = {f"glyph{c:02d}": lambda r, g=g: draw_glyph(g, size, r) for c, g in enumerate(glyphs)}
    else:
        painters = {t: lambda r, t=t: draw_texture(t, size, r) for t in TEXTONS[:classes]}
    return synthetic.write_folder(root, painters, train_per_class, val_per_class, rng)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--kind", default="shapes", choices=KINDS)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_image_folder(a.out, a.classes, a.train_per_class, a.val_per_class, a.size, a.seed, a.kind)
    print(f"wrote {a.out}/train and {a.out}/val")
