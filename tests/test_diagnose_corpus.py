"""A corpus of plain-Keras models convbn never saw, built here: Sequential, functional (with a branch) and nested,
healthy or with one BN fault each, and the verdict `convbn diagnose` must give every one of them.

Ground truth is measured, not assumed: a healthy model must show, in the test itself, the same accuracy with its
moving statistics as with each batch's own, and a high one; then diagnose must find no warning and no error in it.
A faulty model must be caught by the check meant for its fault, at the expected severity or worse.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from conftest import fit_keras, synthetic_npz  # noqa: E402
from convbn_cli.analysis.diagnose import SEVERITIES, diagnose  # noqa: E402
from convbn_cli.model import Evaluator  # noqa: E402

KINDS = ("sequential", "functional", "nested")


def build(kind, bn=None, bn_dtype=None):
    """conv-BN-ReLU x2, global pooling, dense; BN settings `bn` (Keras kwargs) in every BN layer."""
    keras.utils.set_random_seed(0)
    bn = dict(bn or {"momentum": 0.9})

    def block(name, filters, strides):
        return [keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"),
                keras.layers.BatchNormalization(name=f"{name}_bn", dtype=bn_dtype, **bn),
                keras.layers.ReLU(name=f"{name}_relu")]

    head = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="logits")]
    if kind == "sequential":
        return keras.Sequential([keras.Input((28, 28, 1)), *block("a", 8, 2), *block("b", 12, 2), *head])
    inp = keras.Input((28, 28, 1))
    x = inp
    for layer in block("a", 8, 2):
        x = layer(x)
    if kind == "nested":
        inner_in = keras.Input(tuple(x.shape[1:]))
        y = inner_in
        for layer in block("b", 12, 2):
            y = layer(y)
        x = keras.Model(inner_in, y, name="inner")(x)
    else:
        main_path = x
        for layer in block("b", 12, 2):
            main_path = layer(main_path)
        side = keras.layers.Conv2D(12, 1, strides=2, padding="same", use_bias=False, name="side_conv")(x)
        side = keras.layers.BatchNormalization(name="side_bn", **bn)(side)
        x = keras.layers.Add()([main_path, side])
    for layer in head:
        x = layer(x)
    return keras.Model(inp, x)


def fit(model, data, steps=120, training=True):
    return fit_keras(model, data, steps, training, window=608)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path, a = synthetic_npz(tmp_path_factory.mktemp("corpus"), seed=5)
    return a, path


def bn_of(model, name):
    inner = [m for m in model.layers if isinstance(m, keras.Model)]
    return model.get_layer(name) if name in [layer.name for layer in model.layers] else inner[0].get_layer(name)


def _set(bn, variable, change):
    value = getattr(bn, variable).numpy()
    change(value)
    getattr(bn, variable).assign(value)


# fault: (how the model is made, what diagnose must find, at least this severity)
FAULTS = {
    "never_updated": ("trained with training=False", "moving_statistics_never_updated", "error"),
    "stale": ("momentum 0.999 over a short training", "inference_training_gap", "warning"),
    "negative_variance": ("a moving variance set below 0", "negative_moving_variance", "error"),
    "nan": ("a NaN in a moving mean", "non_finite_bn_values", "error"),
    "wrong_axis": ("BatchNormalization(axis=1) on channels_last convs", "bn_wrong_axis", "error"),
    "tiny_variance": ("moving variances below epsilon", "epsilon_dominates", "warning"),
    "dead_gamma": ("gamma zeroed in half the channels", "dead_channels", "warning"),
    "bfloat16": ("BN layers with a bfloat16 dtype", "bn_variables_not_float32", "error"),
    "scale": ("fed 0-255 pixels, trained on 0-1", "input_scale_mismatch", "error"),
    "untrained": ("never trained: at chance whatever BN uses", "accuracy_at_chance", "error"),
    "extreme": ("a beta above 1e6", "extreme_bn_values", "warning"),
}


def faulty(kind, fault, a):
    """(model, --scale) with `fault` built in."""
    if fault == "untrained":
        return build(kind), 1 / 255
    if fault == "never_updated":
        return fit(build(kind), a, training=False), 1 / 255
    if fault == "stale":
        return fit(build(kind, {"momentum": 0.999}), a, steps=40), 1 / 255
    if fault == "wrong_axis":
        return fit(build(kind, {"momentum": 0.9, "axis": 1}), a), 1 / 255
    if fault == "bfloat16":
        return fit(build(kind, bn_dtype="bfloat16"), a), 1 / 255
    model = fit(build(kind), a)
    bn = bn_of(model, "b_bn")
    edits = {
        "negative_variance": lambda: _set(bn, "moving_variance", lambda v: v.__setitem__(0, -1.0)),
        "nan": lambda: _set(bn, "moving_mean", lambda v: v.__setitem__(1, np.nan)),
        "tiny_variance": lambda: bn.moving_variance.assign(np.full(12, 1e-5, np.float32)),
        "dead_gamma": lambda: _set(bn, "gamma", lambda v: v.__setitem__(slice(0, 6), 0.0)),
        "extreme": lambda: _set(bn, "beta", lambda v: v.__setitem__(2, 1e7)),
        "scale": lambda: None,
    }
    edits[fault]()
    return model, (1.0 if fault == "scale" else 1 / 255)


def _save(model, tmp_path):
    path = tmp_path / "model.keras"
    model.save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_is_caught_by_its_check(data, tmp_path, kind, fault):
    a, path = data
    model, scale = faulty(kind, fault, a)
    r = diagnose(_save(model, tmp_path), data=str(path), batches=4, scale=scale)
    _, name, severity = FAULTS[fault]
    hits = [f for f in r["findings"] if f.name == name]
    assert hits, (kind, fault, [(f.name, f.severity, f.message) for f in r["findings"]])
    assert SEVERITIES.index(hits[0].severity) >= SEVERITIES.index(severity), hits[0]


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.9, 0.8, 0.95])
@pytest.mark.parametrize("kind", KINDS)
def test_healthy_models_get_no_warning(data, tmp_path, kind, momentum):
    a, path = data
    model = fit(build(kind, {"momentum": momentum}), a, steps=150)
    # healthy, measured: a high accuracy, the same with the moving statistics as with each batch's own
    x = (a["x_test"][..., None] / 255.0).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, a["y_test"].astype(np.int32))).batch(32)
    moving = Evaluator(model, 10)(ds)["accuracy"]
    batch = Evaluator(model, 10, "batch")(ds)["accuracy"]
    assert moving > 0.9 and abs(moving - batch) <= 0.02, (moving, batch)
    r = diagnose(_save(model, tmp_path), data=str(path), batches=4)
    loud = [(f.name, f.message) for f in r["findings"] if f.severity != "info"]
    assert loud == [] and r["counts"]["error"] == r["counts"]["warning"] == 0
