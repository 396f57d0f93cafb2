"""The format-free cores of diagnose's new checks (issue 38), on plain NumPy arrays and predict callables, each with
its fault and its healthy control: what the Keras adapters and the ONNX side both call. Milliseconds each."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
from convbn_cli.analysis.batch_checks import batch_dependence, material_change  # noqa: E402
from convbn_cli.analysis.decay_checks import averaged_batches, ema_statistics, noise_equivalent  # noqa: E402
from convbn_cli.analysis.order_checks import variance_shift  # noqa: E402
from convbn_cli.analysis.worker_checks import compare_workers  # noqa: E402

RNG = np.random.default_rng(0)
W = RNG.normal(size=(16, 10))


def per_image(x):  # an inference that looks at each image alone: moving statistics
    return x.reshape(len(x), -1) @ W


def per_batch(x):  # one that normalizes with the batch's own statistics (BN in training mode)
    flat = x.reshape(len(x), -1)
    return ((flat - flat.mean(0)) / (flat.std(0) + 1e-3)) @ W


@pytest.mark.parametrize("n", [64, 32])  # several batches, and one batch only (then half-batches are compared)
def test_batch_dependence_tells_batch_statistics_from_moving_ones(n):
    x = RNG.normal(size=(n, 4, 4)).astype(np.float32)
    assert not batch_dependence(per_image, x, 32)["depends"]
    found = batch_dependence(per_batch, x, 32)
    assert found["depends"] and found["median_relative_change"] > 0.01 and found["images"] == n


def test_material_change_of_logits():
    a = RNG.normal(size=(100, 10))
    assert not material_change(a, a + 1e-4)["material"]
    changed = material_change(a, a * 1.5, labels=a.argmax(1))
    assert changed["material"] and changed["accuracy_before"] == 1.0
    assert material_change(a, np.full_like(a, np.nan))["material"]


def _moving_after(decay, steps=300, batch=32, channels=16):
    """A moving mean averaged over `steps` batches of `batch` images (per-image mean noise 1) around the truth 0."""
    m = np.zeros(channels)
    for _ in range(steps):
        m = decay * m + (1 - decay) * RNG.normal(size=channels) / np.sqrt(batch)
    return m


def test_noise_equivalent_counts_the_images_an_average_is_worth():
    subs = RNG.normal(size=(64, 16)) / np.sqrt(8)  # sub-batches of 8 images, one image's mean varies by 1
    pv = np.ones(16)
    fast = noise_equivalent(_moving_after(0.1), np.zeros(16), pv, subs, 8)["images_equivalent"]
    slow = noise_equivalent(_moving_after(0.9), np.zeros(16), pv, subs, 8)["images_equivalent"]
    assert fast < 32 * averaged_batches(0.5) < slow  # decay 0.1: ~1 batch's worth; 0.9: ~19 batches'
    const = np.r_[pv[:15], 1e-12]  # a constant channel (with any distance) is left out, not divided by ~0
    out = noise_equivalent(np.r_[_moving_after(0.9)[:15], 5.0], np.zeros(16), const, subs, 8)
    assert out["channels"] == 15 and out["images_equivalent"] > 32 * averaged_batches(0.5)


def test_ema_statistics_keep_the_start_they_have_not_forgotten():
    mean, var = ema_statistics(np.full(3, 2.0), np.full(3, 4.0), 0.9, 10)
    w = 0.9 ** 10
    np.testing.assert_allclose(mean, (1 - w) * 2.0)
    np.testing.assert_allclose(var, (1 - w) * 4.0 + w)
    noisy, _ = ema_statistics(np.zeros(1000), np.ones(1000), 0.1, 50, batch_mean_var=np.ones(1000))
    assert noisy.std() == pytest.approx(np.sqrt(0.9 / 1.1), rel=0.1)


def test_variance_shift_of_dropout():
    x = RNG.normal(1.0, 1.0, size=(20000, 4))
    kept = x * (RNG.random(x.shape) > 0.5) / 0.5  # inverted dropout, rate 0.5
    s = variance_shift(kept.var(0), x.var(0), moving_variance=kept.var(0))
    assert s["median_ratio"] == pytest.approx(3.0, rel=0.1)  # (E[x^2] / 0.5 - 1) / 1 with mean 1, variance 1
    # No dropout: a second, independent draw of the same distribution (not the same array twice) shows no shift.
    again = RNG.normal(1.0, 1.0, size=(20000, 4))
    assert variance_shift(again.var(0), x.var(0))["median_ratio"] == pytest.approx(1.0, rel=0.05)


def test_compare_workers():
    w = {"kernel": RNG.normal(size=(3, 3))}

    def worker(mean, weights=w):
        return {"statistics": {"bn": (np.asarray(mean, float), np.ones(4))}, "weights": weights}

    alike = compare_workers([worker([0, 0, 0, 0]), worker([0.01, 0, -0.02, 0])])
    assert not alike["weights_differ"] and not alike["statistics_differ"]
    apart = compare_workers([worker([0, 0, 0, 0]), worker([0, 1.0, 0, 0])])
    assert apart["statistics_differ"] == ["bn"] and apart["statistics"]["bn"]["channels"] == [1]
    moved = compare_workers([worker([0, 0, 0, 0]), worker([0, 0, 0, 0], {"kernel": w["kernel"] + 0.1})])
    assert moved["weights_differ"] and not moved["statistics_differ"]
