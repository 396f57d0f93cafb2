"""The tf.data input pipeline: splits, per-epoch shuffling, batching, scaling, augmentation, prefetch.

Shuffling and augmentation are functions of (seed, epoch, batch index) only, never of hidden random
state, so that a run resumed in the middle of an epoch sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from . import registry

if TYPE_CHECKING:  # the config is read, never imported: data sits below config (config/schema names the datasets)
    from ..config.schema import Config


@dataclass
class Splits:
    """uint8 images (N, height, width, channels) and int32 labels for each split, kept in memory as tensors."""

    x_train: tf.Tensor
    y_train: tf.Tensor
    x_val: tf.Tensor
    y_val: tf.Tensor
    x_test: tf.Tensor
    y_test: tf.Tensor

    def size(self, split: str) -> int:
        return int(getattr(self, f"y_{split}").shape[0])


def make_splits(arrays: dict, cfg: Config) -> Splits:
    """Hold out the last `val_split` of the (possibly truncated) training set for validation, unless the user's own
    dataset has a validation split of its own. Images are (N, height, width) or (N, height, width, channels)."""
    d = cfg.data
    x, y = arrays["x_train"], arrays["y_train"]
    if d.max_train:
        x, y = x[: d.max_train], y[: d.max_train]
    xt, yt = arrays["x_test"], arrays["y_test"]
    if d.max_test:
        xt, yt = xt[: d.max_test], yt[: d.max_test]

    def t(img, lab):
        img = np.asarray(img, np.uint8)
        return tf.constant(img[..., None] if img.ndim == 3 else img), tf.constant(np.asarray(lab, np.int32))

    if len(arrays.get("y_val", ())):  # the user's own dataset came with a validation split of its own
        return Splits(*t(x, y), *t(arrays["x_val"], arrays["y_val"]), *t(xt, yt))
    cut = len(y) - int(round(len(y) * d.val_split))
    return Splits(*t(x[:cut], y[:cut]), *t(x[cut:], y[cut:]), *t(xt, yt))


def normalizer(cfg: Config):
    """Pixel batch (0..255, uint8 or float) -> float32 batch, as `data.normalize` says."""
    if cfg.data.normalize == "scale":
        return lambda x: tf.cast(x, tf.float32) * (1.0 / 255.0)
    ds = cfg.dataset  # the published per-pixel mean and std of its training set, or per channel of the user's own
    if isinstance(ds.mean, tuple):
        scale, offset = np.float32(registry.pixel_affine(ds, "standardize"))  # per channel, broadcast on the last axis
        return lambda x: tf.cast(x, tf.float32) * scale + offset
    mean, std = ds.mean, ds.std
    return lambda x: (tf.cast(x, tf.float32) * (1.0 / 255.0) - mean) * (1.0 / std)


def pixels_of(cfg: Config):
    """The inverse of `normalizer`: normalized batch -> pixels 0-255 (for models that normalize themselves)."""
    scale, offset = registry.pixel_affine(cfg.dataset, cfg.data.normalize)
    scale, offset = np.float32(scale), np.float32(offset)  # one each, or one per channel (the user's own dataset)
    return lambda x: (tf.cast(x, tf.float32) - offset) * (1.0 / scale)


def steady(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Fixed parallelism and prefetch instead of tf.data's autotuning, whose background optimization sleeps for
    up to a minute between rounds: measured on 2 cores, destroying an epoch's iterator then waited for it, a
    45-second stall at the start of the next epoch in about half the epochs (bench/steady_training.py,
    BENCHMARKS.md "Steady training"). The data are in memory and each batch is a gather and a scale, so a
    fixed two-batch prefetch keeps the training step fed."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


PARALLEL_CALLS = 2  # batches prepared at once: the work per batch is tiny (a gather, a scale, maybe a warp)
PREFETCH = 2


def steps_per_epoch(n: int, batch_size: int) -> int:
    # Training drops the last partial batch: a batch of a handful of images gives BN noisy statistics.
    return max(1, n // batch_size) if n >= batch_size else 1


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The training images of one epoch, in order (int32), as many as whole batches take: a function of
    (seed, epoch) only, so that a resumed run replays it."""
    steps = steps_per_epoch(n, batch_size)
    return np.random.default_rng([seed, epoch]).permutation(n)[: steps * batch_size if n >= batch_size else n] \
        .astype(np.int32)


def augments(cfg: Config) -> bool:
    """Whether training augments its images: a data.augment that changes something (`{shift: 0}` does not)."""
    aug = cfg.data.augment
    return aug is not None and bool(aug.shift > 0 or aug.rotation > 0 or aug.zoom > 0 or aug.flip or aug.elastic)


def batch_loader(splits: Splits, cfg: Config):
    """load(epoch, i, idx) -> (images, labels): training batch `i` of `epoch` made of the images `idx`
    (gathered, augmented from a stateless seed of (seed, epoch, i), normalized). The tf.data pipeline and the
    trainer's in-graph loop both call it, so they give the very same batches."""
    norm = normalizer(cfg)
    aug = cfg.data.augment
    x_all, y_all = splits.x_train, splits.y_train
    seed = cfg.train.seed

    def load(epoch, i, idx):
        x = tf.cast(tf.gather(x_all, idx), tf.float32)
        if augments(cfg):
            # before normalizing, so that the uncovered border is filled with black (0), as in the images
            stateless = tf.stack([tf.cast(seed, tf.int64) * 100003 + tf.cast(epoch, tf.int64), tf.cast(i, tf.int64)])
            if aug.elastic is not None:
                x = elastic(x, aug.elastic.alpha, aug.elastic.sigma, stateless)
            x = augment(x, aug.shift, aug.rotation, stateless, aug.flip, aug.zoom)
        return norm(x), tf.gather(y_all, idx)

    return load


def train_dataset(splits: Splits, cfg: Config, epoch: int, skip_batches: int = 0,
                  batch_size: int | None = None) -> tf.data.Dataset:
    """One epoch of training batches (of `batch_size`, default data.batch_size; under a strategy the global
    batch); the order depends only on (seed, epoch)."""
    bs = batch_size or cfg.data.batch_size
    order = epoch_order(splits.size("train"), bs, cfg.train.seed, epoch)
    ds = tf.data.Dataset.from_tensor_slices(order).batch(bs)
    ds = ds.enumerate().skip(skip_batches)
    load = batch_loader(splits, cfg)
    return steady(ds.map(lambda i, idx: load(epoch, i, idx), num_parallel_calls=PARALLEL_CALLS, deterministic=True)
                  .prefetch(PREFETCH))


def eval_dataset(splits: Splits, cfg: Config, split: str, batch_size: int | None = None,
                 limit: int | None = None) -> tf.data.Dataset:
    """The split's images in order, normalized, unaugmented (`limit`: only the first N)."""
    x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    norm = normalizer(cfg)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size or max(cfg.data.batch_size, 500))
    return steady(ds.map(lambda a, b: (norm(a), b), num_parallel_calls=PARALLEL_CALLS).prefetch(PREFETCH))


def augment(x, shift: float, rotation_deg: float, seed, flip: bool = False, zoom: float = 0.0):
    """Random shift, rotation and (with `zoom`) scaling about the centre, and with `flip` a left-right mirror of
    half the images, of a batch (N, H, W, C), from a stateless seed.

    Keras' RandomTranslation/RandomRotation draw from a seed generator whose state a resumed run would
    not replay; this builds the same kind of affine transform from stateless draws and applies it with
    TensorFlow's ImageProjectiveTransformV3 op (the op those Keras layers use on this backend).
    """
    n = tf.shape(x)[0]
    h, w = tf.cast(tf.shape(x)[1], tf.float32), tf.cast(tf.shape(x)[2], tf.float32)
    draws = tf.random.stateless_uniform([n, 3], seed=seed, minval=-1.0, maxval=1.0)
    angle = draws[:, 0] * (rotation_deg * math.pi / 180.0)
    dx, dy = draws[:, 1] * shift * w, draws[:, 2] * shift * h
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # Output pixel (u, v) reads input R^-1 ((u, v) - c - d) + c: rotate about the centre, then shift by d.
    a0, a1, b0, b1 = cos, sin, -sin, cos
    if zoom:  # scale by s about the centre: read the input at R^-1 (...) / s; a seed of its own, as for flips
        scale = 1.0 + zoom * tf.random.stateless_uniform([n], seed=seed + tf.constant([0, 2 << 40], tf.int64),
                                                          minval=-1.0, maxval=1.0)
        a0, a1, b0, b1 = a0 / scale, a1 / scale, b0 / scale, b1 / scale
    if flip:  # read the input's x mirrored about the centre: x -> -x in the centred coordinates
        # a seed of its own, so that the shift and rotation draws are those of the same seed without flips
        mirror = tf.random.stateless_uniform([n], seed=seed + tf.constant([0, 1 << 40], tf.int64)) < 0.5
        sx = tf.where(mirror, -1.0, 1.0)
        a0, a1 = a0 * sx, a1 * sx
    ox, oy = -(dx + cx), -(dy + cy)
    tx = a0 * ox + a1 * oy + cx
    ty = b0 * ox + b1 * oy + cy
    zeros = tf.zeros_like(cos)
    transforms = tf.stack([a0, a1, tx, b0, b1, ty, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=tf.shape(x)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


def elastic(x, alpha: float, sigma: float, seed):
    """Simard et al.'s elastic distortion of a batch (N, H, W, C) from a stateless seed: output pixel p reads the
    input at p + alpha * (G_sigma * U), U uniform in [-1, 1] per pixel and axis, G_sigma a Gaussian blur; what
    falls outside reads black (0), bilinearly.

    Written here because neither library does it as needed: keras.ops.image.elastic_transform (Keras 3.15) draws
    the x and y fields from one seed (every pixel moves along the diagonal) and loops over a static batch in
    Python; TensorFlow has no dense warp since tensorflow-addons was retired.
    """
    n, h, w, c = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2], tf.shape(x)[3]
    # a seed of its own, as for zoom and flips, so that the affine draws stay those of the same seed without it
    field = tf.random.stateless_uniform([n, h, w, 2], seed=seed + tf.constant([0, 3 << 40], tf.int64),
                                        minval=-1.0, maxval=1.0)
    radius = max(1, int(math.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    g = tf.constant(g / g.sum(), tf.float32)
    k = tf.tile(g[:, None, None, None], [1, 1, 2, 1])  # separable: down the rows, then along them, per axis
    field = tf.nn.depthwise_conv2d(field, k, [1, 1, 1, 1], "SAME")
    field = tf.nn.depthwise_conv2d(field, tf.transpose(k, [1, 0, 2, 3]), [1, 1, 1, 1], "SAME") * alpha
    # bilinear reads from the image framed by one black pixel; coordinates clipped onto that frame read black
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    gy, gx = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
    sy = tf.clip_by_value(gy + field[..., 0], -1.0, hf) + 1.0
    sx = tf.clip_by_value(gx + field[..., 1], -1.0, wf) + 1.0
    y0, x0 = tf.minimum(tf.floor(sy), hf), tf.minimum(tf.floor(sx), wf)
    wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    flat = tf.reshape(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), [n, (h + 2) * (w + 2), c])

    def read(yy, xx):
        return tf.reshape(tf.gather(flat, tf.reshape(yy * (w + 2) + xx, [n, -1]), batch_dims=1), [n, h, w, c])

    top = read(y0, x0) * (1 - wx) + read(y0, x0 + 1) * wx
    bottom = read(y0 + 1, x0) * (1 - wx) + read(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


def first_batch(splits: Splits, cfg: Config, count: int = 32, batch_size: int | None = None):
    """(pixels, labels): the first `count` images of a run's first training batch (epoch 0, batch 0, of
    `batch_size`, default data.batch_size; under a strategy the global batch) as the model gets them, augmented,
    mapped back to pixels 0-255, (N, H, W, C), and their labels, as numpy arrays (train_batch.png)."""
    bs = batch_size or cfg.data.batch_size
    batch = epoch_order(splits.size("train"), bs, cfg.train.seed, 0)[:bs]
    images, labels = batch_loader(splits, cfg)(0, tf.constant(0, tf.int64), batch)
    return pixels_of(cfg)(images[:count]).numpy(), labels[:count].numpy()


def calibration_augmented(cfg: Config) -> bool:
    """Whether precise BN calibrates on augmented training images: train.precise_bn.augmented (false where
    precise BN is off: the EMA's recompute)."""
    return cfg.train.precise_bn is not None and cfg.train.precise_bn.augmented


def calibrated_on(cfg: Config, augmented: bool | None = None) -> bool | None:
    """What to say of precise BN's batches: whether they are augmented (`augmented`, None: calibration_augmented),
    or None where training augments nothing (they are the images as they are either way)."""
    if not augments(cfg):
        return None
    return calibration_augmented(cfg) if augmented is None else augmented


def calibration_batches(splits: Splits, cfg: Config, batches: int | None, augmented: bool | None = None):
    """N training batches for precise BN (None: one pass over the training split), in a fixed order of their own.

    The order is the one the training pipeline would give in epoch `train.epochs` (one past the last), so it is
    reproducible. `augmented` (None: calibration_augmented) True: with the training augmentation, if any; False:
    the same images as they are (inference sees unaugmented images, and strong augmentation moves the statistics
    BN keeps: BENCHMARKS.md, "Elastic distortions, and BN statistics of unaugmented images").
    """
    if augmented is None:
        augmented = calibration_augmented(cfg)
    if not augmented and augments(cfg):
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": None})})
    ds = train_dataset(splits, cfg, epoch=cfg.train.epochs)
    return ds if batches is None else ds.take(batches)
