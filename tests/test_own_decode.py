"""Decoding a user's own images (data/own/decode.py): files of every kind and mode brought to one target shape by
the stated resize rule, exact duplicates found by pixel hashes, and every file that cannot be used (empty,
truncated, not an image, a PNG declaring 40,000 x 40,000 pixels) a one-line problem naming it, found before any
pixel is decoded where the header tells."""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from convbn_cli.data.own.decode import (
    MAX_IMAGE_PIXELS,
    border_colour,
    convert_arrays,
    decode_items,
    pixel_hash,
    probe,
    resize_image,
)
from convbn_cli.data.own.listing import ArraySplit, list_dataset


def save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def png_declaring(width, height) -> bytes:
    """A valid PNG signature and IHDR declaring width x height 8-bit grey pixels, with a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def mixed(tmp_path):
    """A folder dataset of mixed sizes, modes and formats, with three files that cannot be decoded."""
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    save(root / "a" / "grey.png", rng.integers(0, 256, (6, 8), dtype=np.uint8))
    save(root / "a" / "rgb.jpg", rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "JPEG")
    save(root / "b" / "rgb.bmp", rng.integers(0, 256, (7, 4, 3), dtype=np.uint8), "BMP")
    save(root / "b" / "sixteen.png", np.array([[0, 65535], [32896, 257]], np.uint16))
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[1, 1] = (0, 0, 0, 255)  # one opaque black pixel; the rest transparent
    save(root / "b" / "clear.png", rgba)
    (root / "b" / "zero.png").write_bytes(b"")
    good = (root / "a" / "grey.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "words.png").write_text("not a picture at all")
    (root / "b" / "script.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 2 2\n")  # for Ghostscript
    return list_dataset(root)


def test_every_kind_of_file_is_brought_to_the_target_shape_and_failures_are_problems(mixed):
    for channels in (1, 3):
        got = decode_items(mixed.items, (4, 4, channels), "pad", workers=2, progress=False)
        assert got.images.shape == (5, 4, 4, channels) and got.images.dtype == np.uint8
        assert got.where == ["a/grey.png", "a/rgb.jpg", "b/clear.png", "b/rgb.bmp", "b/sixteen.png"]
        assert got.labels.tolist() == [0, 0, 1, 1, 1] and got.labels.dtype == np.int64
        assert got.original.tolist() == [[6, 8, 1], [5, 5, 3], [3, 3, 3], [7, 4, 3], [2, 2, 1]]
        assert got.hashes.dtype == np.dtype("S16") and len(set(got.hashes.tolist())) == 5
        assert [w for w, _ in got.problems] == ["b/cut.png", "b/script.png", "b/words.png", "b/zero.png"]
        whys = dict(got.problems)
        assert whys["b/zero.png"] == "an empty file (0 bytes)" and "not an image" in whys["b/words.png"]
        assert "truncated" in whys["b/cut.png"] and all("\n" not in w for w in whys.values())
        assert whys["b/script.png"].startswith("not an image of a kind read here (PNG, JPEG")
        assert str(mixed.root) not in " ".join(whys.values())  # the path is named once, by `where`
    sixteen = decode_items([i for i in mixed.items if i.where == "b/sixteen.png"], (2, 2, 1), "pad", progress=False)
    assert sixteen.images[0, :, :, 0].tolist() == [[0, 255], [128, 1]]  # 16 bits scaled, not clipped at 255
    clear = decode_items([i for i in mixed.items if i.where == "b/clear.png"], (3, 3, 1), "pad", progress=False)
    assert clear.images[0, :, :, 0].tolist() == [[255, 255, 255], [255, 0, 255], [255, 255, 255]]  # on white


def test_a_file_turned_into_a_fifo_after_listing_is_a_problem_not_a_wait(tmp_path):
    save(tmp_path / "d" / "a" / "1.png", np.zeros((2, 2), np.uint8))
    items = list_dataset(tmp_path / "d").items
    (tmp_path / "d" / "a" / "1.png").unlink()
    os.mkfifo(tmp_path / "d" / "a" / "1.png")
    got = decode_items(items, (2, 2, 1), "pad", progress=False)
    assert len(got.images) == 0 and got.problems == [("a/1.png", "is a FIFO (named pipe), not a file; refused")]


def test_probe_reads_headers_only(mixed):
    headers, problems = probe(mixed.items, workers=0)
    got = {i.where: h for i, h in zip(mixed.items, headers)}
    assert (got["a/grey.png"].h, got["a/grey.png"].w, got["a/grey.png"].channels) == (6, 8, 1)
    assert got["b/clear.png"].channels == 3 and got["b/sixteen.png"].channels == 1
    assert got["b/zero.png"] is None and got["b/words.png"] is None and got["b/script.png"] is None
    assert [w for w, _ in problems] == ["b/script.png", "b/words.png", "b/zero.png"]  # a cut file's header reads


@pytest.mark.parametrize("side", [40_000, 8_000])
def test_a_png_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, side):
    # 40,000^2: past Pillow's own decompression-bomb limit; 8,000^2 (64 megapixels): past only convbn's
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "huge.png").write_bytes(png_declaring(side, side))
    save(tmp_path / "d" / "a" / "ok.png", np.zeros((3, 3), np.uint8))
    items = list_dataset(tmp_path / "d").items
    start = time.perf_counter()
    headers, problems = probe(items)
    got = decode_items(items, (3, 3, 1), "pad", workers=1, progress=False)
    assert time.perf_counter() - start < 1.0
    assert headers[0] is None and headers[1] is not None and got.where == ["a/ok.png"]
    for where, why in (problems[0], got.problems[0]):
        assert where == "a/huge.png" and "\n" not in why and "refused before decoding" in why
        assert "pixels" in why and (side == 40_000 or f"{side}x{side} pixels, more than {MAX_IMAGE_PIXELS:,}" in why)


def test_pixel_hashes_find_copies_not_reencodings(tmp_path):
    rng = np.random.default_rng(1)
    a = save(tmp_path / "d" / "x" / "a.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    shutil.copy(a, tmp_path / "d" / "x" / "copy.png")
    Image.open(a).save(tmp_path / "d" / "x" / "again.bmp")  # lossless: the same pixels
    Image.open(a).save(tmp_path / "d" / "x" / "lossy.jpg", quality=80)
    got = decode_items(list_dataset(tmp_path / "d").items, (4, 4, 3), "stretch", progress=False)
    h = dict(zip(got.where, got.hashes.tolist()))
    assert h["x/a.png"] == h["x/copy.png"] == h["x/again.bmp"] != h["x/lossy.jpg"]
    flat = np.zeros((2, 8, 1), np.uint8)
    assert pixel_hash(flat) != pixel_hash(flat.reshape(4, 4, 1))  # the same bytes in another shape


def test_the_resize_rules():
    page = np.full((4, 8, 1), 255, np.uint8)
    page[1:3, 2:6] = 0  # a dark mark on a white page
    padded = resize_image(page, (8, 8, 1), "pad")[:, :, 0]
    assert padded.shape == (8, 8) and (padded[:2] == 255).all() and (padded[-2:] == 255).all()  # pads white
    digit = np.zeros((8, 4, 1), np.uint8)
    digit[2:6, 1:3] = 255  # a light stroke on black, as MNIST's
    padded = resize_image(digit, (8, 8, 1), "pad")[:, :, 0]
    assert (padded[:, :2] == 0).all() and (padded[:, -2:] == 0).all() and padded.max() == 255  # pads black
    assert border_colour(np.dstack([page] * 3)) == (255, 255, 255)
    stripes = np.zeros((2, 6, 1), np.uint8)
    stripes[:, 2:4] = 200  # the centre third
    fit = resize_image(stripes, (2, 2, 1), "fit")[:, :, 0]
    assert (fit == 200).all()  # the centre kept, the sides cropped
    assert resize_image(stripes, (4, 3, 1), "stretch").shape == (4, 3, 1)
    big = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    assert resize_image(big, (4, 4, 1), "stretch")[0, 0, 0] == 5  # BOX when shrinking: the mean of 0, 1, 8, 9
    assert resize_image(big, (8, 8, 1), "pad") is big


def test_arrays_are_converted_like_files(tmp_path):
    grey = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    split = ArraySplit(grey, np.array([0, 1, 1]), "d.npz[x_train]")
    got = convert_arrays(split, (4, 4, 3), "pad")
    assert got.images.shape == (3, 4, 4, 3)
    assert (got.images[..., 0] == grey).all() and (got.images[..., 2] == grey).all()
    assert got.where == ["d.npz[x_train][0]", "d.npz[x_train][1]", "d.npz[x_train][2]"] and got.problems == []
    assert got.original.tolist() == [[4, 4, 1]] * 3 and got.labels.dtype == np.int64
    rgb = np.random.default_rng(2).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    rgb[1] = rgb[0]
    got = convert_arrays(ArraySplit(rgb, np.array([0, 0]), "train.csv", ["train.csv:2", "train.csv:3"]), (5, 5, 1),
                         "pad")
    assert np.array_equal(got.images[0, :, :, 0], np.asarray(Image.fromarray(rgb[0]).convert("L")))
    assert got.hashes[0] == got.hashes[1] and got.where == ["train.csv:2", "train.csv:3"]
    save(tmp_path / "d" / "c" / "0.png", rgb[0])  # a file and an array of the same pixels hash the same
    assert decode_items(list_dataset(tmp_path / "d").items, (5, 5, 1), "pad", progress=False).hashes[0] == got.hashes[0]
    rgba = np.zeros((1, 2, 2, 4), np.uint8)  # transparent: on white, as files are
    assert (convert_arrays(ArraySplit(rgba, np.array([0]), "x"), (2, 2, 1), "pad").images == 255).all()


def test_progress_goes_to_stderr_and_bad_settings_are_one_line(mixed, capsys, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    decode_items(mixed.items[:2], (4, 4, 1), "fit", workers=0, progress=True)
    assert "decoding" in terminal.getvalue() and capsys.readouterr().out == ""
    monkeypatch.undo()
    decode_items(mixed.items[:2], (4, 4, 1), "fit", workers=0, progress=True)  # stderr is no terminal: a log
    assert capsys.readouterr().err == ""
    decode_items(mixed.items[:2], (4, 4, 1), "fit", progress=False)
    assert capsys.readouterr().err == ""
    from convbn_cli.errors import DataError
    with pytest.raises(DataError, match="data.resize: 'crop' is not one of pad, fit, stretch"):
        decode_items(mixed.items, (4, 4, 1), "crop")
    with pytest.raises(DataError, match=r"model.input_shape: \[4, 4, 2\]"):
        decode_items(mixed.items, (4, 4, 2), "pad")
