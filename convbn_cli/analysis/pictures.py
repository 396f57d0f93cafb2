"""Pictures people take, made into ink on black before MNIST's crop, fit and centre (predict.mnist_normalize).

A phone photo or a scan is not an MNIST digit: the paper is grey or coloured, the light falls off across the page,
the paper has specks and grain, and a ballpoint pen draws strokes a tenth as wide as MNIST's. Each stage below
undoes one of those, measured on the picture itself rather than by fixed amounts:

1. background: the paper's brightness everywhere, as a smooth surface (a quadratic in x and y) fitted robustly to
   the medians of small blocks, so that strokes (a minority of the blocks) do not pull it; it removes grey paper,
   tinted paper and a lighting gradient or vignette at once.
2. normalized: the ink's polarity from which side of that surface the ink lies (dark ink on paper, or chalk on
   a board: the side with more contrast in blobs that are neither specks nor beyond the page), the ink as its
   contrast relative to the paper (a ratio, so that ink in the shade counts as much as ink in the light), the
   paper's noise measured and cut off, the strokes stretched to full.
3. denoised: specks and grain removed: blobs much smaller than the digit's largest stroke dropped (connected
   components), and a 3x3 median where the strokes are wide enough to survive it; and what a photo shows beyond
   the page (blobs lying along the picture's edge).
4. strokes: the stroke width measured (2 x ink area / boundary length, against the digit's size) and, where the
   pen was much thinner than MNIST's (whose strokes are about 0.137 of the digit's longer side, the median over
   2,000 training digits measured the same way), thickened to MNIST's; the digit is cropped with a margin.

Written with NumPy only, by hand: convbn depends on Pillow (through matplotlib) and NumPy but not on SciPy or
OpenCV, whose median filters, labelling and morphology these few dozen lines replace for pictures of a digit.
"""

from __future__ import annotations

import numpy as np

WORK_SIDE = 600  # a bigger picture is reduced to this longer side first: stages cost O(pixels), a digit needs few
BLOCKS = 40  # the background is fitted to the medians of about BLOCKS x BLOCKS blocks
MNIST_STROKE = 0.137  # MNIST's stroke width / the digit's longer side (median; 10% of digits are under 0.10)
THIN_STROKE = 0.10  # a thinner pen is thickened to MNIST_STROKE
STROKE_BOX = 64  # the strokes stage works on the digit at this longer side (then MNIST's 20x20 box)
SPECK = 0.08  # a blob of ink under this fraction of the largest blob's area is a speck, not part of the digit


def prepare(gray: np.ndarray, polarity: str = "auto", stage=lambda name, a: None) -> np.ndarray:
    """The digit in `gray` (H, W) pixels 0-255 as light ink 0-255 on black, cropped to it with a margin (the input
    of mnist_normalize). polarity: "dark" (ink darker than the paper), "light", or "auto" (measured).
    `stage(name, pixels)` sees each stage's picture (0-255 floats) as it is made, for --show."""
    a = reduced(np.asarray(gray, np.float32))
    stage("picture", a)
    surface, noise = background(a)
    stage("background", surface)
    ink = normalized(a, surface, noise, polarity)
    stage("normalized", ink * 255)
    ink = denoised(ink)
    stage("denoised", ink * 255)
    ink = strokes(ink)
    stage("strokes", ink * 255)
    return ink * 255


def reduced(a: np.ndarray) -> np.ndarray:
    """`a` shrunk (area averaging: a thin line stays, fainter) to WORK_SIDE on its longer side if it is larger."""
    from PIL import Image

    k = WORK_SIDE / max(a.shape)
    if k >= 1:
        return a
    size = (max(1, round(a.shape[1] * k)), max(1, round(a.shape[0] * k)))
    return np.asarray(Image.fromarray(a, "F").resize(size, Image.BOX), np.float32)


# --------------------------------------------------------------------------- 1. background


def background(a: np.ndarray) -> tuple:
    """(surface, noise): the paper's brightness at every pixel, a quadratic surface fitted to block medians with
    outliers (blocks of ink) trimmed, and the spread of the pixels about it (a robust standard deviation)."""
    h, w = a.shape
    cell = max(1, round(max(h, w) / BLOCKS))
    rows, cols = max(1, h // cell), max(1, w // cell)
    ch, cw = min(cell, h), min(cell, w)
    blocks = a[:rows * ch, :cols * cw].reshape(rows, ch, cols, cw)
    med = np.median(blocks.transpose(0, 2, 1, 3).reshape(rows, cols, -1), axis=-1).ravel()
    yy, xx = np.meshgrid((np.arange(rows) + 0.5) * ch, (np.arange(cols) + 0.5) * cw, indexing="ij")
    terms = _quadratic(yy.ravel(), xx.ravel(), h, w)
    coef = np.zeros(terms.shape[1])
    coef[0] = np.median(med)  # the start: a flat page at the median block, the paper when ink is a minority
    keep = np.ones(med.shape, bool)
    for _ in range(6):
        resid = med - terms @ coef
        spread = max(1.4826 * float(np.median(np.abs(resid - np.median(resid)))), 1.0)
        if (np.abs(resid) <= 2.5 * spread).sum() < terms.shape[1] * 2:
            break
        keep = np.abs(resid) <= 2.5 * spread
        coef = np.linalg.lstsq(terms[keep], med[keep], rcond=None)[0]
    py, px = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    surface = (_quadratic(py.ravel(), px.ravel(), h, w) @ coef).reshape(h, w).astype(np.float32)
    # the noise of the paper alone: the pixels of the blocks the fit kept (a bold digit may cover half the page)
    paper = np.repeat(np.repeat(keep.reshape(rows, cols), ch, axis=0), cw, axis=1)
    d = (a - surface)[:rows * ch, :cols * cw][paper]
    noise = max(1.4826 * float(np.median(np.abs(d - np.median(d)))), 0.5) if d.size else 0.5
    return np.clip(surface, 0, 255), noise


def _quadratic(y, x, h, w) -> np.ndarray:
    s = float(max(h, w))
    u, v = x / s - 0.5, y / s - 0.5
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)


# --------------------------------------------------------------------------- 2. normalized


def normalized(a: np.ndarray, surface: np.ndarray, noise: float, polarity: str = "auto") -> np.ndarray:
    """Ink 0-1 on 0: each pixel's contrast against the paper there (dark ink: the fraction of the paper's light it
    takes away; light ink: its rise towards white), the paper's noise cut off and the strokes stretched so that
    their cores are 1. A picture with no ink above the noise is all 0. polarity "auto": the side whose ink, less
    what lies beyond the page (keep_large), holds more contrast: the table around a tilted page may be lighter
    than the paper, larger than the digit and as far from the paper as its ink."""
    ways = {p: _contrast(a - surface, surface, noise, p) for p in ("dark", "light")}
    if polarity == "auto":
        held = {p: _ink_held(*ways[p], _border(a.shape)) for p in ways}
        polarity = max(held, key=held.get)
        if held[polarity] < 0.001 * a.size:  # no ink inside the page either way (a digit run into the table, say,
            # and grain on the other side): the stronger extreme, which a thin digit's strokes reach (a thousandth)
            lo, hi = np.quantile(a - surface, [0.001, 0.999])
            polarity = "dark" if -lo > hi else "light"
    x, rel_noise = ways[polarity]
    floor = max(3 * rel_noise, 0.03)
    strong = x[x > max(6 * rel_noise, 0.08)]
    if strong.size == 0:
        return np.zeros_like(x)
    top = float(np.percentile(strong, 95))
    if top <= floor:
        return np.zeros_like(x)
    return np.clip((x - floor) / (top - floor), 0, 1).astype(np.float32)


def _contrast(d, surface, noise, polarity) -> tuple:
    """(contrast of each pixel against the paper for ink of this polarity, the paper's noise in those units)."""
    if polarity == "dark":
        room = np.maximum(surface, 16.0)  # near-black paper: a floor, not a division by nothing
        return -d / room, noise / max(float(np.median(surface)), 16.0)
    room = np.maximum(255.0 - surface, 16.0)
    return d / room, noise / max(255.0 - float(np.median(surface)), 16.0)


def _ink_held(x, rel_noise, border) -> float:
    """The contrast summed over the blobs of strong ink that are neither specks nor beyond the page."""
    mask = x > max(6 * rel_noise, 0.08)
    return float(x[keep_large(mask, border=border, fallback=False)].sum()) if mask.any() else 0.0


def _border(shape) -> int:
    return max(3, round(0.02 * max(shape)))


# --------------------------------------------------------------------------- 3. denoised


def denoised(ink: np.ndarray, level: float = 0.35) -> np.ndarray:
    """`ink` without specks: a 3x3 median where strokes are at least 3 pixels wide (a thinner line would go with
    the grain), then only the blobs of ink (pixels over `level`, 8-connected) at least SPECK of the largest one's
    area kept, with a pixel of their soft edge, and not those lying along the picture's edge (keep_large)."""
    mask = ink > level
    if not mask.any():
        return ink
    if stroke_width(keep_large(mask)) >= 3:
        ink = median3(ink)
        mask = ink > level
        if not mask.any():
            return ink
    return np.where(grow(keep_large(mask, border=_border(ink.shape)), 1), ink, 0).astype(np.float32)


def median3(a: np.ndarray) -> np.ndarray:
    """The 3x3 median of every pixel (edges repeated): the fifth smallest of the nine shifted copies."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    shifted = np.stack([p[i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return np.partition(shifted, 4, axis=0)[4]


def keep_large(mask: np.ndarray, fraction: float = SPECK, border: int = 0, fallback: bool = True) -> np.ndarray:
    """`mask` with only its 8-connected blobs of at least `fraction` of the largest blob's area; and, with `border`,
    without what a photo shows beyond the page (a table, the page's shadow; see _beyond_page). Where that would
    leave nothing, those blobs stay (`fallback`; or nothing is left)."""
    row, start, end = _runs(mask)
    if len(row) == 0:
        return mask
    parent = _join_runs(row, start, end)
    roots = np.array([_root(parent, i) for i in range(len(row))])
    area = np.bincount(roots, weights=end - start)
    if border:
        beyond = _beyond_page(mask.shape, border, row, start, end, roots, area)
        if (~beyond[roots]).any() or not fallback:
            area = np.where(beyond, 0, area)
    if area.max() == 0:
        return np.zeros_like(mask)
    kept = (area[roots] >= fraction * area.max()) & (area[roots] > 0)
    out = np.zeros(mask.shape[0] * (mask.shape[1] + 1) + 1, np.int32)
    width = mask.shape[1] + 1
    np.add.at(out, row[kept] * width + start[kept], 1)
    np.add.at(out, row[kept] * width + end[kept], -1)
    return (np.cumsum(out)[:-1].reshape(mask.shape[0], width)[:, :-1] > 0)


def _beyond_page(shape, border, row, start, end, roots, area) -> np.ndarray:
    """Per blob: whether it lies beyond the photographed page: mostly (over half its area) within `border` pixels
    of the picture's edge, or along the edge for longer than twice the side of a square of its area (a wedge of
    table in a corner of a tilted page). A digit drawn at the edge only touches it: a stroke's width."""
    h, w = shape
    inner = np.clip(np.minimum(end, w - border) - np.maximum(start, border), 0, None)  # run pixels away from it
    inner = np.where((row < border) | (row >= h - border), 0, inner)
    near = area - np.bincount(roots, weights=inner, minlength=len(area))
    on_edge = np.where((row == 0) | (row == h - 1), end - start, (start == 0).astype(int) + (end == w))
    contact = np.bincount(roots, weights=on_edge, minlength=len(area))
    return (near > area / 2) | (contact > 2 * np.sqrt(area))


def _runs(mask: np.ndarray) -> tuple:
    """(row, start, end) of every horizontal run of True (end exclusive)."""
    h, w = mask.shape
    p = np.zeros((h, w + 2), np.int8)
    p[:, 1:-1] = mask
    edges = np.diff(p, axis=1)
    rs, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # both in row-major order: the k-th end closes the k-th start
    return rs, starts, ends


def _join_runs(row, start, end) -> list:
    """Union-find over runs: runs on neighbouring rows that touch, diagonally included, are one blob. A loop over
    runs (a few thousand for a page), not pixels."""
    parent = list(range(len(row)))
    first = np.searchsorted(row, np.arange(row.max() + 2))
    for r in range(1, row.max() + 1):
        i, i_end = first[r - 1], first[r]
        for j in range(first[r], first[r + 1]):
            while i < i_end and end[i] < start[j]:  # runs above that end before this one begins (8-connected)
                i += 1
            k = i
            while k < i_end and start[k] <= end[j]:
                a, b = _root(parent, j), _root(parent, k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
    return parent


def _root(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` dilated `steps` times, alternately by a 3x3 cross and a 3x3 square (an octagon, close to a disk)."""
    out = mask
    for s in range(steps):
        p = np.pad(out, 1)
        grown = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        if s % 2:
            grown = grown | p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
        out = grown
    return out


def grow_grey(a: np.ndarray, steps: int) -> np.ndarray:
    """The grey-level version of grow: each pixel the maximum over the same octagon."""
    out = a
    for s in range(steps):
        p = np.pad(out, 1)
        shifts = [p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
        if s % 2:
            shifts += [p[:-2, :-2], p[:-2, 2:], p[2:, :-2], p[2:, 2:]]
        out = np.max(shifts, axis=0)
    return out


# --------------------------------------------------------------------------- 4. strokes


def stroke_width(mask: np.ndarray) -> float:
    """The mean stroke width in pixels of the ink in `mask`: a stroke of length L and width w has area L*w and about
    2*L pixels on its boundary, so w = 2 * area / boundary (a 1 or 2 pixel line reads 2)."""
    area = int(mask.sum())
    if area == 0:
        return 0.0
    p = np.pad(mask, 1)
    inner = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return 2.0 * area / max(area - int(inner.sum()), 1)


def strokes(ink: np.ndarray, level: float = 0.35) -> np.ndarray:
    """The digit cropped to its ink (with a margin, its soft edges kept) and, where its strokes are under
    THIN_STROKE of its longer side (measured before any resizing, where a thin pen is still a few pixels wide),
    resized to STROKE_BOX on that side and thickened to MNIST's width. Strokes wide enough are left as they are:
    not resampled twice (a pixel's shift of the centre of mass turns a weak model's answer)."""
    from PIL import Image

    mask = ink > level
    if not mask.any():
        return ink
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    ratio = stroke_width(mask[top:bottom, left:right]) / side
    margin = side // 4 + 2
    crop = np.pad(ink, margin)[top:bottom + 2 * margin, left:right + 2 * margin]  # the rows top - margin, ...
    if ratio >= THIN_STROKE:
        return crop.astype(np.float32)
    k = STROKE_BOX / side
    size = (max(1, round(crop.shape[1] * k)), max(1, round(crop.shape[0] * k)))
    out = np.asarray(Image.fromarray(crop, "F").resize(size, Image.LANCZOS if k < 1 else Image.BILINEAR),
                     np.float32).clip(0, 1)
    out = grow_grey(out, round((MNIST_STROKE - ratio) * STROKE_BOX / 2))
    strong = out[out > 0.1]
    if strong.size:  # a thin line reduced is faint: its core back to full ink
        out = np.clip(out / max(float(np.percentile(strong, 90)), 1e-3), 0, 1)
    return out.astype(np.float32)
