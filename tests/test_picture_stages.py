"""Issue 36, predict for pictures people take: each stage of analysis/pictures.py on small synthetic arrays (no
model, fast tier): the paper's tone and light taken out, the ink's polarity measured, specks dropped, thin pens
thickened to MNIST's stroke width; and predict's inputs: one unreadable picture is reported, not fatal."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from convbn_cli.analysis import pictures as pic


def ring(size=200, pen=3, ink=255.0, paper=0.0, box=(50, 30, 150, 170)) -> np.ndarray:
    """An ellipse (a zero) drawn with a pen `pen` pixels wide: `ink` on `paper`."""
    img = Image.new("F", (size, size), paper)
    ImageDraw.Draw(img).ellipse(box, outline=ink, width=pen)
    return np.array(img, np.float32)


def gradient(size=200, low=0.55, high=1.1) -> np.ndarray:
    """A photo's light across a page: from `low` in one corner to `high` in the other."""
    yy, xx = np.mgrid[0:size, 0:size] / (2.0 * size)
    return (low + (high - low) * (xx + yy)).astype(np.float32)


def test_the_background_is_the_paper_under_the_ink_and_its_noise_is_measured():
    rng = np.random.default_rng(0)
    paper = 200 * gradient()
    a = paper * np.where(ring(pen=12) > 0, 0.2, 1.0) + rng.normal(0, 6, paper.shape)  # a bold zero, noisy paper
    surface, noise = pic.background(a.astype(np.float32))
    assert np.abs(surface - paper).max() < 8  # the strokes (a fifth of the blocks) did not pull it
    assert 4.5 < noise < 7.5


@pytest.mark.parametrize("paper,ink", [(100.0, 20.0), (240.0, 140.0), (30.0, 230.0), (0.0, 255.0)])
def test_ink_is_found_on_any_paper_under_any_light(paper, ink):
    """Grey paper darker than 50% (the old border rule left it uninverted), pale ink, chalk on a board, MNIST's
    own light on black: the same zero, ink 1 and paper 0, with a lighting gradient over the page."""
    rng = np.random.default_rng(1)
    drawn = ring(ink=1.0)
    a = (paper + (ink - paper) * drawn) * gradient() + rng.normal(0, 3, drawn.shape)
    surface, noise = pic.background(a.astype(np.float32))
    out = pic.normalized(a.astype(np.float32), surface, noise)
    assert out[drawn > 0.9].mean() > 0.8 and out[drawn == 0].max() < 0.2


def test_polarity_can_be_forced_and_a_blank_page_has_no_ink():
    a = 200 - 150 * ring(ink=1.0)
    surface, noise = pic.background(a)
    assert pic.normalized(a, surface, noise, "light").max() == 0  # no ink lighter than this paper
    assert pic.normalized(a, surface, noise, "dark").max() == 1
    blank = np.full((100, 120), 180, np.float32) + np.random.default_rng(2).normal(0, 4, (100, 120)).astype(np.float32)
    assert pic.normalized(blank, *pic.background(blank)).max() == 0


def _flood_fill_blobs(mask):
    """Brute force: each 8-connected blob's pixels, by a flood fill from every unvisited pixel."""
    seen, blobs = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, blob = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        blobs.append(blob)
    return blobs


@pytest.mark.parametrize("seed", range(6))
def test_keep_large_keeps_exactly_the_blobs_a_flood_fill_finds_large(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((24, 31)) < [0.2, 0.35, 0.45, 0.55, 0.3, 0.6][seed]
    blobs = _flood_fill_blobs(mask)
    largest = max(len(b) for b in blobs)
    want = np.zeros_like(mask)
    for b in blobs:
        if len(b) >= 0.08 * largest:
            want[tuple(np.array(b).T)] = True
    np.testing.assert_array_equal(pic.keep_large(mask), want)


def tilted_page(table: float, paper=200.0, ink=30.0, size=(300, 400)) -> np.ndarray:
    """A photo of a page tilted by 8 degrees: the table shows in wedges at the corners; a zero drawn on the page."""
    h, w = size
    page = Image.new("F", (w, h), paper)
    ImageDraw.Draw(page).ellipse((150, 80, 230, 220), outline=ink, width=5)
    return np.array(page.rotate(8, resample=Image.BILINEAR, fillcolor=table), np.float32)


def test_what_lies_beyond_a_tilted_page_is_not_ink():
    """The table around a tilted page, lighter or darker than the paper, larger than the digit and as far from the
    paper as its ink, was taken for the ink (a lighter one even turned the polarity), or cropped with the digit."""
    zero = pic.normalized(tilted_page(table=200), *pic.background(tilted_page(table=200))) > 0.5
    for table in (255.0, 20.0):
        a = tilted_page(table)
        ink = pic.denoised(pic.normalized(a, *pic.background(a)))
        assert (ink > 0.5).sum() == pytest.approx(zero.sum(), rel=0.1) and (ink[zero] > 0.5).mean() > 0.9, table


def test_a_digit_at_the_edge_stays_and_a_sliver_along_it_goes():
    mask = np.zeros((100, 120), bool)
    mask[40:100, 10:16] = True  # a stroke of a digit cut by the bottom edge: touches it for 6 pixels
    mask[60:66, 10:40] = True
    mask[0:4, 30:110] = True  # a sliver of table along the top edge
    mask[30:50, 117:120] = True  # and along the right one
    kept = pic.keep_large(mask, border=3)
    assert kept[40:100, 10:16].all() and kept[60:66, 10:40].all() and kept.sum() == 60 * 6 + 6 * 24
    assert (pic.keep_large(mask[:10], border=3) == pic.keep_large(mask[:10])).all()  # all slivers: all stay
    assert not pic.keep_large(mask[:10], border=3, fallback=False).any()


def test_median3_is_the_median_of_each_3x3_neighbourhood():
    a = np.random.default_rng(3).random((9, 13)).astype(np.float32)
    p = np.pad(a, 1, mode="edge")
    want = np.array([[np.median(p[i:i + 3, j:j + 3]) for j in range(13)] for i in range(9)])
    np.testing.assert_allclose(pic.median3(a), want)


@pytest.mark.parametrize("width", [3, 5, 8, 12])
def test_stroke_width_is_measured(width):
    img = Image.new("1", (200, 200), 0)
    ImageDraw.Draw(img).line([(20, 30), (180, 170)], fill=1, width=width)  # diagonal: the hard case
    ImageDraw.Draw(img).line([(20, 180), (180, 180)], fill=1, width=width)
    assert pic.stroke_width(np.asarray(img, bool)) == pytest.approx(width, rel=0.3)


def test_specks_go_and_a_thin_pen_stays():
    rng = np.random.default_rng(4)
    ink = ring(pen=2, ink=1.0)
    for y, x in rng.integers(0, 200, (40, 2)):  # dust: dots of 1-3 pixels, as dark as the ink
        ink[y:y + rng.integers(1, 3), x:x + rng.integers(1, 3)] = 1.0
    clean = pic.denoised(ink)
    assert clean[ring(pen=2) > 0].mean() > 0.9  # the 2-pixel line survived (no median for it)
    assert clean[pic.grow(ring(pen=2) > 0, 2) == 0].max() == 0  # every speck away from it went


def _ratio(mask) -> float:
    """Stroke width / the ink's longer side, as MNIST_STROKE is measured."""
    rows, cols = np.nonzero(mask)
    return pic.stroke_width(mask) / max(np.ptp(rows) + 1, np.ptp(cols) + 1)


def test_thin_pens_are_thickened_to_mnists_width_and_thick_ones_are_not():
    thin = ring(pen=2, ink=1.0)
    assert _ratio(thin > 0.35) < pic.THIN_STROKE
    assert _ratio(pic.strokes(thin) > 0.35) == pytest.approx(pic.MNIST_STROKE, rel=0.25)
    thick = ring(pen=22, ink=1.0)
    assert _ratio(pic.strokes(thick) > 0.35) == pytest.approx(_ratio(thick > 0.35), rel=0.15)


def test_prepare_turns_a_photographed_zero_into_a_clean_one(tmp_path):
    rng = np.random.default_rng(5)
    drawn = ring(pen=3, ink=1.0)
    photo = (210 - 170 * drawn) * gradient() + rng.normal(0, 5, drawn.shape)
    seen = []
    out = pic.prepare(photo.astype(np.float32), stage=lambda name, a: seen.append(name))
    assert seen == ["picture", "background", "normalized", "denoised", "strokes"]
    h, w = out.shape
    assert out[h // 2, w // 2] == 0 and out.max() == 255  # the hole of the zero is black, its ink white
    assert out[:, : w // 8].max() == 0 and out[:, -w // 8:].max() == 0  # nothing but the digit: a margin of paper


# --------------------------------------------------------------------------- predict's inputs and its report

def test_an_unreadable_picture_is_reported_and_the_others_are_read(tmp_path):
    """It used to end the whole call, and Pillow's message leaked the open file (<_io.BufferedReader name=3>)."""
    from convbn_cli.analysis.predict import load_inputs
    from convbn_cli.data import DataError

    Image.fromarray(ring().astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    good = tmp_path / "a.png"
    (tmp_path / "c.png").write_bytes(good.read_bytes()[:60])  # cut short: a header and no pixels
    failed = []
    names, x = load_inputs([tmp_path], (28, 28), preprocess="mnist", failed=failed)
    assert names == [str(good)] and x.shape == (1, 28, 28) and x.max() > 0
    assert [f["input"] for f in failed] == [str(tmp_path / "b.png"), str(tmp_path / "c.png")]
    for f in failed:
        assert f["error"].startswith(f"{f['input']}: not a readable image") and "\n" not in f["error"]
        assert "<_io" not in f["error"] and "name=" not in f["error"]
    with pytest.raises(DataError, match="b.png: not a readable image") as e:  # without `failed`: an error
        load_inputs([good, tmp_path / "b.png"], (28, 28))
    assert "<_io" not in str(e.value)
    names, x = load_inputs([tmp_path / "b.png"], (28, 28), failed=[])
    assert names == [] and x.shape == (0, 28, 28)


def test_uncertain_predictions_say_so_with_their_class_and_probability():
    from convbn_cli.present.reports import PredictReport

    top = [{"class": 8, "name": "8", "probability": 0.41}, {"class": 3, "name": "3", "probability": 0.3}]
    sure = [{"class": 1, "name": "1", "probability": 0.99}]
    text = PredictReport({"predictions": [{"input": "a.png", "uncertain": True, "top": top},
                                          {"input": "b.png", "uncertain": False, "top": sure}]}).render()
    assert text.splitlines() == ["a.png  uncertain: 8 (41.00%)   then: 3 30.00%", "b.png  1 (99.00%)"]
    assert PredictReport({"predictions": []}).render() == ""


def test_stages_are_written_for_show(tmp_path):
    from convbn_cli.analysis.predict import STAGES, StageWriter, load_inputs, made_empty

    Image.fromarray((255 - ring()).astype(np.uint8)).save(tmp_path / "zero.png")
    made_empty(tmp_path / "fed")
    writer = StageWriter(tmp_path / "fed")
    load_inputs([tmp_path / "zero.png"], (28, 28), preprocess="mnist", stage=writer)
    assert sorted(p.name for p in (tmp_path / "fed").iterdir()) == [
        f"0000-zero.{k}-{s}.png" for k, s in enumerate(STAGES, 1)]
    for p in (tmp_path / "fed").iterdir():
        img = np.asarray(Image.open(p))
        assert max(img.shape) >= 200  # enlarged where small
        assert img.min() == img.max() == 255 if "background" in p.name else img.std() > 0  # white paper; a digit
