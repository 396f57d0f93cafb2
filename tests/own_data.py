"""Small datasets of the user's own kind for the tests: pictures of three shapes in image folders (the
ImageFolder layout), drawn from a seed."""

from __future__ import annotations

import numpy as np
from PIL import Image

SHAPES = {"circle": 0, "square": 1, "cross": 2}


def draw(kind: str, seed: int, size=(20, 20), colour=False) -> Image.Image:
    """A small picture of one of three shapes, placed and sized by `seed` (white on black, or coloured)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w, rng.uniform(0.25, 0.35) * min(h, w)
    if kind == "circle":
        mask = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.5
    elif kind == "square":
        ring = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
        mask = (ring < r) & (ring > r - 2)
    else:
        mask = (np.abs(yy - cy) < 1.5) | (np.abs(xx - cx) < 1.5)
    a = (mask * 255).astype(np.uint8)
    a[seed % h, (seed // h) % w] ^= 1  # one pixel a shade apart: no two pictures of a dataset are exact copies
    if colour:
        return Image.fromarray(np.stack([a, a // 2, 255 - a], -1))
    return Image.fromarray(a)


def write_folder(root, per_class=6, splits=("train", "test"), colour=False, suffix=".png"):
    """root/<split>/<class>/<n>.png (or root/<class>/ with splits=(None,))."""
    n = 0
    for split in splits:
        for kind in SHAPES:
            folder = root / split / kind if split else root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class):
                draw(kind, n, colour=colour).save(folder / f"{n}{suffix}")
                n += 1
    return root
