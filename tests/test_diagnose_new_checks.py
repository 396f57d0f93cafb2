"""`convbn diagnose`'s checks for the faults no tool reported (issue 38), on plain-Keras models built and trained
here, each beside its healthy control measured in the test: predictions that depend on the batch
(batch_dependent_predictions), moving statistics averaged with a decay too fast (decay_too_fast), workers of one
training whose statistics or weights differ (workers_disagree, `diagnose A B ...`), and the order of BN, activation
and dropout (layer_order, a note). And the blind evaluation's misses and harms: a false decay_too_slow on a healthy
model with a constant channel and a tiny epsilon, epsilon_dominates where a lower epsilon changes nothing, decay
advice offered before recalibrate and unchecked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.heavy  # Keras models fitted for seconds each: the slow tier (conftest.py)
import keras  # noqa: E402

from conftest import fit_keras, synthetic_npz  # noqa: E402
from convbn_cli.analysis.diagnose import diagnose  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.model import Evaluator, recalibrate_model  # noqa: E402
from convbn_cli.present.reports import DiagnoseReport  # noqa: E402


@keras.saving.register_keras_serializable(package="convbn_tests")
class TrainingModeBN(keras.layers.BatchNormalization):
    """A BN whose call asks for training mode whatever it is given, as the blind evaluation's model did (a custom
    block that calls BN with training=True): batch statistics at inference too. (Keras 3 lets the model call's own
    training=False override a training=True written in a functional graph, so the fault lives in such calls.)"""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=True, mask=mask)


def build(momentum=0.9, training_mode=False, relu_before_bn=False, dropout=0.0, bn_kwargs=None, filters=(8, 12)):
    """conv-BN-ReLU x2 and a dense head, functional, plain Keras. `training_mode`: the second BN always in training
    mode (TrainingModeBN: batch statistics at inference too); `relu_before_bn`: the convs carry the ReLU and BN follows
    it; `dropout`: a Dropout right before the second BN."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    x = inp
    for name, f in zip("ab", filters):
        act = "relu" if relu_before_bn else None
        x = keras.layers.Conv2D(f, 3, strides=2, padding="same", use_bias=False, activation=act, name=f"{name}_conv")(x)
        if dropout and name == "b":
            x = keras.layers.Dropout(dropout, name="b_drop")(x)
        kind = TrainingModeBN if training_mode and name == "b" else keras.layers.BatchNormalization
        x = kind(momentum=momentum, name=f"{name}_bn", **(bn_kwargs or {}))(x)
        if not relu_before_bn:
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(x))


def fit(model, data, steps=150, **kw):
    return fit_keras(model, data, steps, window=608, **kw)


def xy(a):
    return (a["x_test"][..., None] / 255.0).astype(np.float32), a["y_test"].astype(np.int32)


def accuracies(model, a):
    """(moving, batch) accuracy on the test images, measured here."""
    ds = tf.data.Dataset.from_tensor_slices(xy(a)).batch(32)
    return Evaluator(model, 10)(ds)["accuracy"], Evaluator(model, 10, "batch")(ds)["accuracy"]


def found(result, name):
    hits = [f for f in result["findings"] if f.name == name]
    assert hits, (name, [(f.name, f.message) for f in result["findings"]])
    return hits[0]


def names(result):
    return {f.name for f in result["findings"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_npz(tmp_path_factory.mktemp("data"), seed=3)


@pytest.fixture(scope="module")
def healthy(data, tmp_path_factory):
    """The healthy control: trained normally (momentum 0.9), shown healthy by measurement here (a high accuracy,
    the same with the moving statistics as with each batch's own, the same logits for an image in any batch)."""
    path, a = data
    model = fit(build(), a)
    moving, batch = accuracies(model, a)
    assert moving > 0.9 and abs(moving - batch) <= 0.02, (moving, batch)
    x = xy(a)[0][:64]
    alone = model(x[:32], training=False).numpy()[:16]
    among = model(x[[*range(16), *range(32, 48)]], training=False).numpy()[:16]  # the same 16, other partners
    np.testing.assert_allclose(alone, among, atol=1e-4)
    src = tmp_path_factory.mktemp("healthy") / "healthy.keras"
    model.save(src)
    return src, path, a


def test_the_healthy_control_passes_every_new_check(healthy):
    src, path, _ = healthy
    r = diagnose(src, data=str(path), batches=2)
    assert r["counts"] == {"info": 0, "warning": 0, "error": 0}, [(f.name, f.message) for f in r["findings"]]
    assert {"batch_dependence", "layer_order"} <= set(r["passed"])
    assert "workers" not in r["passed"] and r["workers"] == []  # one model: no workers to compare


def test_bn_called_with_training_true_at_inference_is_an_error(data, tmp_path):
    """b_bn is called with training=True whatever the model is given: at inference it normalizes with each batch's
    statistics, so the moving and batch accuracies agree and it passed as healthy. An image's logits change with
    its batch."""
    path, a = data
    model = fit(build(training_mode=True), a)
    x = xy(a)[0][:64]
    alone = model(x[:32], training=False).numpy()[:16]
    among = model(x[[*range(16), *range(32, 48)]], training=False).numpy()[:16]
    assert np.abs(alone - among).max() > 1e-2  # the fault, measured here: the same images, other partners
    moving, batch = accuracies(model, a)
    assert abs(moving - batch) <= 0.02  # what let it pass: no inference gap to see
    model.save(tmp_path / "train_mode.keras")
    r = diagnose(tmp_path / "train_mode.keras", data=str(path), batches=2)
    f = found(r, "batch_dependent_predictions")
    assert f.severity == "error" and f.layers == ["b_bn"]  # the layer where batch statistics enter, not a_bn
    assert f.evidence["depends"] and f.evidence["median_relative_change"] > 1e-3
    assert f.evidence["accuracy_with_moving_statistics"] is not None and "training=True" in f.fix
    assert "BN looks healthy" not in DiagnoseReport(r).verdict()


def test_a_decay_ported_the_wrong_way_is_too_fast(data, tmp_path):
    """Keras momentum 0.1 (PyTorch's default momentum, ported unchanged): the moving statistics are little more
    than the last batch's. The control: the healthy model (momentum 0.9) passes decay_too_fast."""
    path, a = data
    model = fit(build(momentum=0.1), a)
    assert accuracies(model, a)[0] > 0.8  # still a model that fits: only the statistics are noise
    model.save(tmp_path / "fast.keras")
    r = diagnose(tmp_path / "fast.keras", data=str(path), batches=2)
    f = found(r, "decay_too_fast")
    assert f.severity == "warning" and set(f.layers) == {"a_bn", "b_bn"}
    assert f.evidence["keras_momentum"] == pytest.approx(0.1) and f.evidence["pytorch_momentum"] == pytest.approx(0.9)
    assert f.evidence["batches_equivalent"] < 19  # farther from the data's than decay 0.9's ~19 batches would be
    assert "higher momentum" in f.fix or "keep these statistics" in f.fix
    assert "lower" not in f.fix.replace("lower momentum", "")  # never the wrong way


def test_layer_order_is_a_note_with_the_measured_variance_shift(data, tmp_path):
    """ReLU before BN (the convs carry it) and dropout 0.3 right before b_bn: a note, never a warning; the shift
    measured is about 1 / (1 - 0.3). The healthy control (conv -> BN -> ReLU) passes layer_order."""
    path, a = data
    model = fit(build(relu_before_bn=True, dropout=0.3), a)
    assert accuracies(model, a)[0] > 0.9  # a model that works: the order is no fault
    model.save(tmp_path / "order.keras")
    r = diagnose(tmp_path / "order.keras", data=str(path), batches=2)
    f = found(r, "layer_order")
    assert f.severity == "info" and set(f.layers) == {"a_bn", "b_bn"}
    assert f.evidence["order"]["a_bn"]["after_activation"] == "a_conv"
    assert f.evidence["order"]["b_bn"] == {"after_activation": "b_conv", "before_activation": None,
                                           "dropout_before": "b_drop"}
    shift = f.evidence["variance_shift"]["b_bn"]
    assert shift["median_ratio"] == pytest.approx(1 / 0.7, rel=0.1)
    assert "mixed" in f.message and "b_drop feeds b_bn" in f.message
    assert r["counts"]["warning"] == r["counts"]["error"] == 0, [(g.name, g.message) for g in r["findings"]]


# --------------------------------------------------------------------------- workers of one training

def _workers(src, a, tmp_path, shards):
    """One .keras per worker: the healthy model's weights, and moving statistics recomputed from the worker's own
    shard of training images (a list of image indices each), as an unsynchronized BN leaves them."""
    x = (a["x_train"][..., None] / 255.0).astype(np.float32)
    out = []
    for i, shard in enumerate(shards):
        model = keras.saving.load_model(src)
        recalibrate_model(model, [x[shard[j:j + 32]] for j in range(0, len(shard), 32)])
        model.save(tmp_path / f"worker{i}.keras")
        out.append(str(tmp_path / f"worker{i}.keras"))
    return out


def test_workers_with_their_own_statistics_are_compared(healthy, tmp_path):
    """Three workers share the weights; each averaged its own shard's statistics. Shards drawn alike: they agree
    (the healthy control, also through the CLI); a worker whose shard holds one class: its statistics differ."""
    src, path, a = healthy
    rng = np.random.default_rng(0)
    (tmp_path / "alike").mkdir()
    alike = _workers(src, a, tmp_path / "alike", [rng.permutation(640)[:128] for _ in range(3)])
    r = diagnose(alike[0], data=str(path), batches=2, workers=alike[1:])
    assert "workers_disagree" not in names(r) and "workers" in r["passed"] and r["workers"] == alike[1:]
    out = CliRunner().invoke(main, ["diagnose", *alike, "--data", str(path), "--batches", "2", "--json"])
    assert out.exit_code == 0, out.output
    assert "workers" in json.loads(out.stdout)["passed"]
    (tmp_path / "skewed").mkdir()
    one_class = np.flatnonzero(a["y_train"] == 3)[:128]
    skewed = _workers(src, a, tmp_path / "skewed", [rng.permutation(640)[:128], one_class])
    r = diagnose(skewed[0], data=str(path), batches=2, workers=skewed[1:])
    f = found(r, "workers_disagree")
    assert f.severity in ("warning", "info") and f.layers and not f.evidence["weights_differ"]
    assert set(f.evidence["accuracy_by_worker"]) == set(skewed)
    assert "accuracy_averaged_statistics" in f.evidence and "synchronized=True" in f.fix


def test_workers_whose_weights_differ_are_an_error_and_other_models_are_refused(healthy, tmp_path):
    src, path, a = healthy
    later = fit(keras.saving.load_model(src), a, steps=5)  # five more steps: another model
    later.save(tmp_path / "later.keras")
    r = diagnose(src, data=str(path), batches=2, workers=[str(tmp_path / "later.keras")])
    f = found(r, "workers_disagree")
    assert f.severity == "error" and f.evidence["weights_differ"] and "same step" in f.fix
    fit(build(filters=(8, 16)), a, steps=2).save(tmp_path / "other.keras")
    out = CliRunner().invoke(main, ["diagnose", str(src), str(tmp_path / "other.keras"), "--data", str(path)])
    assert out.exit_code == 2 and "not workers of one model" in out.output and "Traceback" not in out.output


# --------------------------------------------------------------------------- the blind evaluation's harms

def _constant_channel_model(momentum=0.99, epsilon=1e-10):
    """conv -> [8 learned channels + 1 constant channel] -> BN (tiny epsilon) -> ReLU, twice narrower head."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    conv = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="a_conv")(inp)
    const = keras.layers.Conv2D(1, 3, strides=2, padding="same", kernel_initializer="zeros", trainable=False,
                                bias_initializer=keras.initializers.Constant(0.5), name="const")(inp)
    x = keras.layers.Concatenate(name="both")([conv, const])
    x = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name="a_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", use_bias=False, name="b_conv")(x)
    x = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name="b_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(x))


def test_no_decay_too_slow_alarm_on_a_healthy_model_with_a_constant_channel_and_a_tiny_epsilon(data, tmp_path):
    """Keras' default momentum 0.99 over 400 steps (model.fit: the steps are known): on paper the decay is long
    for the steps (0.99^400 = 1.8% of the start left, above the 1% the old check allowed), and the old check warned
    and advised recalibrating, which cost accuracy. Measured, the statistics are as good as recomputed ones (the
    constant channel, whose distance over a tiny epsilon is rounding noise, left out): no alarm, no advice."""
    path, a = data
    model = _constant_channel_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit((a["x_train"][..., None] / 255.0).astype(np.float32), a["y_train"].astype(np.int32), batch_size=32,
              epochs=20, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 400 and 0.99 ** 400 > 0.01  # what the old check fired on
    moving, batch = accuracies(model, a)
    assert moving > 0.9 and abs(moving - batch) <= 0.02, (moving, batch)  # healthy, measured
    model.save(tmp_path / "constant.keras")
    r = diagnose(tmp_path / "constant.keras", data=str(path), batches=2)
    assert "decay_too_slow" not in names(r), [(f.name, f.message) for f in r["findings"]]
    assert r["counts"]["warning"] == r["counts"]["error"] == 0, [(f.name, f.message) for f in r["findings"]]
    assert not any("recalibrate" in f.fix for f in r["findings"])


def test_epsilon_dominates_only_where_a_lower_epsilon_changes_the_outputs(healthy, tmp_path):
    """Half of a_bn's channels get a zero kernel (their input is a constant 0) and a moving variance below epsilon,
    as the last batch of a momentum-0 model can leave them: on paper epsilon dominates, but a 10x or 100x lower
    epsilon changes nothing (0 stays 0), so no finding stands beside the real one. The control: the same variances
    on channels that carry data change the outputs, and are reported."""
    src, path, _ = healthy
    model = keras.saving.load_model(src)
    kernel = model.get_layer("a_conv").kernel.numpy()
    kernel[..., :4] = 0.0
    model.get_layer("a_conv").kernel.assign(kernel)
    bn = model.get_layer("a_bn")
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    mean[:4], var[:4] = 0.0, 1e-5
    bn.moving_mean.assign(mean)
    bn.moving_variance.assign(var)
    model.save(tmp_path / "constant.keras")
    r = diagnose(tmp_path / "constant.keras", data=str(path), batches=2)
    assert "epsilon_dominates" not in names(r), [(f.name, f.message) for f in r["findings"]]
    control = keras.saving.load_model(src)
    control.get_layer("a_bn").moving_variance.assign(np.full(8, 1e-5, np.float32))
    control.save(tmp_path / "tiny.keras")
    f = found(diagnose(tmp_path / "tiny.keras", data=str(path), batches=2), "epsilon_dominates")
    assert f.evidence["lower_epsilon"]["material"] and "10x lower epsilon there changes the logits" in f.message


def test_decay_advice_comes_after_recalibrate_and_only_once_checked(data, tmp_path, monkeypatch):
    """A lagging model (momentum 0.99, 20 steps of model.fit): recalibrate first, with its measured numbers (a
    retraining with a lower decay took a 512-channel model to 17% where recalibrating gave 89%); the lower decay
    only for the next training, and only where the statistics it would leave with these weights measure as well
    as precise BN's."""
    from convbn_cli.analysis import decay_checks

    path, a = data
    model = build(momentum=0.99)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit((a["x_train"][..., None] / 255.0).astype(np.float32), a["y_train"].astype(np.int32), batch_size=32,
              epochs=1, verbose=0)
    model.save(tmp_path / "lag.keras")
    r = diagnose(tmp_path / "lag.keras", data=str(path), batches=2)
    f = found(r, "decay_too_slow")
    e = f.evidence
    assert e["accuracy_after_precise_bn"] > e["accuracy_moving"]  # recalibrating helps, measured
    assert f.fix.startswith("convbn recalibrate") and "measured here" in f.fix
    assert f.fix.index("convbn recalibrate") < f.fix.index("for the next training: lower the BN layers' momentum")
    assert e["decay_checked"]["ok"] and e["decay_checked"]["decay"] == 0.79 and e["decay_checked"]["steps"] == 20
    monkeypatch.setattr(decay_checks, "decay_checked", lambda ctx, decay, steps: {"ok": False, "decay": decay})
    again = found(diagnose(tmp_path / "lag.keras", data=str(path), batches=2), "decay_too_slow")
    assert "momentum" not in again.fix and again.fix.startswith("convbn recalibrate")  # unchecked: not offered


def test_workers_of_onnx_and_keras_models_mixed_are_refused_in_one_line(healthy, tmp_path):
    """Comparing workers takes ONNX models only (tests/test_onnx_bn_doctor.py) or Keras models, checkpoints and runs
    only: both kinds among them is one line (exit 2), never a comparison silently skipped."""
    onnx = pytest.importorskip("onnx")
    from onnx_corpus import CORPUS, images
    from onnx_corpus import build as build_onnx

    x, y = images(256)
    onnx.save(build_onnx(next(iter(CORPUS)), x, y)[0], tmp_path / "w.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    src = healthy[0]
    for targets in ([str(tmp_path / "w.onnx"), str(src)], [str(src), str(tmp_path / "w.onnx")]):
        out = CliRunner().invoke(main, ["diagnose", *targets, "--data", str(tmp_path / "d.npz")])
        assert out.exit_code == 2 and "not both" in out.output and "Traceback" not in out.output, out.output


def test_the_decay_checks_hold_the_moving_statistics_against_the_batches_training_averaged(tmp_path, mnist,
                                                                                            monkeypatch):
    """Precise BN calibrates on unaugmented images by default, but the moving statistics averaged augmented ones:
    measured against the unaugmented statistics, the augmentation's offset reads as noise (a settled run, decay 0.9
    over 19 batches of 32 at a learning rate annealed to ~0, would look like the average of a few images: a false
    decay_too_fast). diagnose measures them against the batches as training made them."""
    from conftest import tiny_raw
    from convbn_cli.analysis import diagnose as module
    from convbn_cli.analysis.decay_checks import decay_checked, noise_by_layer
    from convbn_cli.analysis.findings import Context, precise_bn_accuracy
    from convbn_cli.config import load_config
    from convbn_cli.train import train

    raw = tiny_raw(tmp_path, **{"data.max_train": 3000, "data.max_test": 500, "train.epochs": 3,
                                "train.precise_bn": "off", "train.schedule": {"name": "one_cycle"},
                                "data.augment": {"shift": 0.4, "zoom": 0.5, "rotation": 90,
                                                 "elastic": {"alpha": 34, "sigma": 4}}})
    result = train(load_config(raw=raw), data=mnist, log=lambda m: None, progress=False)
    made = []
    monkeypatch.setattr(module, "Context", lambda *a, **k: made.append(Context(*a, **k)) or made[-1])
    module.diagnose(result.run_dir, data=None, batches=20)
    ctx = made[0]
    assert ctx.training_calibration is not None  # the run augments: both sets, each for its measurement
    as_trained = {name: r["images_equivalent"] for name, r in noise_by_layer(ctx).items()}
    assert min(as_trained.values()) > 100, as_trained  # an average of hundreds of images, as the decay makes it
    # the decay it trained with, over its steps, leaves statistics as good as the training batches' precise BN
    check = decay_checked(ctx, 0.9, 282)
    assert check["ok"] and check["accuracy_precise_bn"] == precise_bn_accuracy(ctx, as_trained=True), check
    ctx.training_calibration, ctx._measured = None, {}
    unaugmented = {name: r["images_equivalent"] for name, r in noise_by_layer(ctx).items()}
    assert min(unaugmented.values()) < 0.2 * min(as_trained.values()), unaugmented  # the false reading avoided
