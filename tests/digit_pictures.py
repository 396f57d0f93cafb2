"""Pictures of digits as people make them, for predict's tests: printed in fonts, drawn with pens of every width,
on white, grey, coloured and noisy paper, photographed under uneven light (a tilt, blur, a JPEG round trip), and
light on dark. Everything is drawn with Pillow from a seed, so a failing picture can be made again and looked at.

picture_set(seed) -> [(category, digit, PIL image)]; CLEAN are the categories a plain scanner or paint program
gives (predict must read every one of them)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansCondensed-Oblique.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerifCondensed.ttf")
CLEAN = ("font", "marker", "coloured ink", "white on black")
CATEGORIES = CLEAN + ("grey paper", "coloured paper", "noisy paper", "photo", "thin pen", "thick pen")


def _arc(cx, cy, rx, ry, a0, a1, n=24):
    """Points on an ellipse from angle a0 to a1 (degrees; 0 is right, 90 is down: image coordinates)."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n)]


def strokes(digit: int, rng) -> list:
    """The pen strokes of `digit` in a box 0.6 wide and 1 tall: a list of polylines, one shape of a few per digit
    (the ways people write a 1, 4 or 7), slightly varied."""
    v = rng.integers(0, 2)
    shapes = {
        0: [_arc(0.3, 0.5, 0.27, 0.48, -90, 275, 40)],
        1: [[(0.3, 0.0), (0.3, 1.0)]] if v else [[(0.12, 0.2), (0.34, 0.0), (0.34, 1.0)]],
        2: [_arc(0.3, 0.26, 0.26, 0.25, 190, 370, 16) + [(0.5, 0.45), (0.03, 1.0), (0.6, 1.0)]],
        3: [_arc(0.3, 0.25, 0.25, 0.24, 200, 450, 20) + _arc(0.3, 0.74, 0.28, 0.26, 270, 510, 20)],
        4: ([[(0.45, 1.0), (0.45, 0.0), (0.0, 0.66), (0.6, 0.66)]] if v else
            [[(0.07, 0.0), (0.03, 0.6), (0.6, 0.6)], [(0.47, 0.05), (0.47, 1.0)]]),
        5: [[(0.56, 0.0), (0.1, 0.0), (0.06, 0.45)] + _arc(0.3, 0.7, 0.27, 0.3, 225, 505, 22)],
        6: [[(0.52, 0.0), (0.27, 0.2), (0.08, 0.5)] + _arc(0.31, 0.74, 0.25, 0.26, 180, 540, 30)],
        7: [[(0.0, 0.0), (0.6, 0.0), (0.2, 1.0)]] if v else [[(0.0, 0.05), (0.6, 0.0), (0.25, 1.0)],
                                                           [(0.15, 0.52), (0.52, 0.5)]],
        8: [_arc(0.3, 0.25, 0.22, 0.24, 90, 450, 30) + _arc(0.3, 0.74, 0.27, 0.26, -90, 270, 30)],
        9: [_arc(0.3, 0.28, 0.27, 0.28, 0, 360, 30) + [(0.57, 0.28), (0.5, 1.0)]],
    }
    shear, squeeze = rng.uniform(-0.15, 0.15), rng.uniform(0.85, 1.15)
    return [[(x * squeeze - shear * (y - 0.5) + rng.normal(0, 0.01), y + rng.normal(0, 0.01)) for x, y in line]
            for line in shapes[digit]]


def ink_mask(digit, rng, size=(300, 300), height=0.6, pen=None, font=None) -> np.ndarray:
    """Coverage 0-1 of the ink of `digit` on a canvas `size` (w, h): `height` of the canvas tall, anywhere on it
    (wholly inside); drawn with a pen `pen` pixels wide (polylines), or printed in `font`. Drawn 2x and reduced:
    antialiased."""
    w, h = size
    tall = 2 * h * height
    glyph = Image.new("L", (int(2 * tall) + 8 * (pen or 1), int(2 * tall) + 8 * (pen or 1)), 0)
    d = ImageDraw.Draw(glyph)
    at = 4 * (pen or 1)
    if font is not None:
        f = ImageFont.truetype(str(FONT_DIR / font), int(tall * 1.35))
        box = d.textbbox((0, 0), str(digit), font=f)
        d.text((at - box[0], at - box[1]), str(digit), font=f, fill=255)
    else:
        for line in strokes(digit, rng):
            pts = [(at + x * tall, at + y * tall) for x, y in line]
            d.line(pts, fill=255, width=2 * pen, joint="curve")
            for x, y in (pts[0], pts[-1]):  # round ends, as a pen leaves
                d.ellipse((x - pen, y - pen, x + pen, y + pen), fill=255)
    glyph = glyph.crop(glyph.getbbox())
    k = min(1.0, 0.95 * 2 * w / glyph.width, 0.95 * 2 * h / glyph.height)  # a wide glyph on a narrow canvas
    glyph = glyph.resize((max(1, int(glyph.width * k)), max(1, int(glyph.height * k))), Image.LANCZOS)
    big = Image.new("L", (2 * w, 2 * h), 0)
    big.paste(glyph, (int(rng.uniform(0, 1) * (2 * w - glyph.width)), int(rng.uniform(0, 1) * (2 * h - glyph.height))))
    return np.asarray(big.resize((w, h), Image.LANCZOS), np.float32) / 255.0


def compose(alpha, paper, ink) -> np.ndarray:
    """RGB 0-255: `ink` colour over `paper` colour by coverage `alpha` (H, W)."""
    a = alpha[..., None]
    return np.asarray(paper, np.float32) * (1 - a) + np.asarray(ink, np.float32) * a


def lighting(shape, rng, strength) -> np.ndarray:
    """A photo's light over a page (H, W, 1): brighter towards a random side, darker in the corners."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx - xx.mean()) * math.cos(angle) + (yy - yy.mean()) * math.sin(angle)
    vignette = ((xx - xx.mean()) ** 2 + (yy - yy.mean()) ** 2)
    light = 1 + strength * ramp / np.abs(ramp).max() - 0.2 * vignette / vignette.max()
    return light[..., None]


def specks(shape, rng, count) -> np.ndarray:
    """Coverage of `count` small dark dots (dust, paper fibre, pencil smudges)."""
    h, w = shape
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    for _ in range(count):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 2.0)
        d.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(80, 200)))
    return np.asarray(img, np.float32) / 255.0


def jpeg(img: Image.Image, quality) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)


def to_image(rgb) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def picture(category, digit, rng) -> Image.Image:
    """One picture of `digit` in `category` (see CATEGORIES)."""
    w, h = int(rng.choice([200, 300, 400, 640])), int(rng.choice([200, 300, 480]))
    size = (w, h)
    pen = max(3, round(min(w, h) * rng.uniform(0.035, 0.06)))
    font = FONTS[int(rng.integers(len(FONTS)))] if rng.random() < 0.5 else None
    if digit == 0 and font and "Mono" in font:  # a monospace zero is dotted, a form no MNIST digit has
        font = "DejaVuSans.ttf"
    dark = rng.uniform(0, 50, 3)
    if category == "font":
        return to_image(compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), font=FONTS[digit % len(FONTS)]),
                                (255, 255, 255), (0, 0, 0)))
    if category == "marker":
        return to_image(compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), pen), (255, 255, 255), dark))
    if category == "coloured ink":
        ink = [(20, 40, 160), (170, 20, 30), (20, 110, 40), (90, 30, 120)][digit % 4]
        return to_image(compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), pen, font), (250, 250, 250), ink))
    if category == "white on black":
        return to_image(compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), pen, font), dark, (250, 250, 245)))
    if category == "grey paper":
        paper = np.full(3, rng.uniform(90, 180))
        return to_image(compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), pen, font), paper, dark))
    if category == "coloured paper":
        paper = [(240, 225, 120), (245, 180, 190), (160, 200, 240), (190, 235, 170), (235, 200, 150)][digit % 5]
        return to_image(compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), pen, font), paper, dark))
    if category == "noisy paper":
        paper = np.full(3, rng.uniform(170, 240))
        rgb = compose(ink_mask(digit, rng, size, rng.uniform(0.3, 0.8), pen, font), paper, dark)
        rgb = compose(specks((h, w), rng, int(rng.integers(20, 80))), rgb, dark)  # dots: same ink, far smaller
        return to_image(rgb + rng.normal(0, rng.uniform(12, 25), rgb.shape[:2])[..., None])
    if category == "photo":
        return photo(digit, rng, size, pen, font)
    if category == "thin pen":
        return to_image(compose(ink_mask(digit, rng, (300, 300), rng.uniform(0.35, 0.8), int(rng.integers(2, 5))),
                                (255, 255, 255), dark))
    if category == "thick pen":
        return to_image(compose(ink_mask(digit, rng, (300, 300), rng.uniform(0.5, 0.8), int(rng.integers(18, 28))),
                                (255, 255, 255), dark))
    raise ValueError(category)


def photo(digit, rng, size, pen, font) -> Image.Image:
    """A page photographed by a phone: the digit a little rotated, off-white paper under light that falls off
    across the page, blurred a little, and saved as a JPEG. Half of them show the table beyond the tilted page in
    the corners (darker or lighter than the paper)."""
    alpha = ink_mask(digit, rng, size, rng.uniform(0.3, 0.7), pen, font)
    angle, table = rng.uniform(-12, 12), rng.random() < 0.5
    if not table:
        alpha = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).rotate(angle, resample=Image.BICUBIC),
                           np.float32) / 255.0
    paper = np.array([235, 228, 215]) * rng.uniform(0.75, 1.0)
    rgb = compose(alpha, paper, rng.uniform(10, 60, 3)) * lighting(alpha.shape, rng, rng.uniform(0.15, 0.35))
    img = to_image(rgb + rng.normal(0, 4, rgb.shape))
    if table:
        tone = int(rng.choice([rng.uniform(30, 90), rng.uniform(240, 255)]))
        img = img.rotate(angle, resample=Image.BICUBIC, fillcolor=(tone, tone - 10, tone - 25))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))
    return jpeg(img, rng.integers(35, 75))


def picture_set(seed=0, per_digit=2, categories=CATEGORIES) -> list:
    """[(category, digit, image)]: `per_digit` pictures of each digit in each category."""
    rng = np.random.default_rng(seed)
    return [(c, d, picture(c, d, rng)) for c in categories for d in range(10) for _ in range(per_digit)]


def write_set(folder, pictures) -> list:
    """Save the pictures (PNG, or JPEG for the photos, as phones save them); [(path, category, digit)]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (category, digit, img) in enumerate(pictures):
        path = folder / f"{i:03d}-{category.replace(' ', '_')}-{digit}{'.jpg' if category == 'photo' else '.png'}"
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        out.append((path, category, digit))
    return out
