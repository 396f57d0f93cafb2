"""`convbn export` of models trained outside convbn (issue 35): a keras.Sequential model (Keras' clone_model takes
no call_function for one, so the export was a traceback) and channels_first models whose layers convbn would not
have chosen (a Flatten() in channels_last order of NCHW maps, a BatchNormalization() over the width, a
channels_first conv that Keras adds a bias to along the width). Each export must give the original's logits,
read back with the ordinary tools (Keras, TensorFlow, the TFLite interpreter, onnxruntime), not convbn's."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import synthetic_npz
from convbn_cli.cli import main

L = keras.layers
pytestmark = pytest.mark.heavy  # Keras models fitted or converted for seconds each: the slow tier (conftest.py)
CF = {"data_format": "channels_first"}
FORMATS = {"keras": ".keras", "savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}
# The fast tier exports the Sequential model in every format; the channels_first one in the others only in the slow
# tier (its fix is in the rebuilt Keras model, which every format is written from).


def _model(layers, input_shape=(28, 28, 1), sequential=False):
    """A model of `layers` with BN statistics far from their initial values (with gamma 1, beta 0, mean 0 and
    variance 1 a BN is nearly the identity, and a fold in the wrong place would go unseen)."""
    keras.utils.set_random_seed(3)
    if sequential:
        model = keras.Sequential([keras.Input(input_shape), *layers])
    else:
        x = inputs = keras.Input(input_shape)
        for layer in layers:
            x = layer(x)
        model = keras.Model(inputs, x)
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n),
                               rng.uniform(0.5, 2, n)])
    return model


def _sequential():
    return _model([L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(), L.Flatten(), L.Dense(10)],
                  sequential=True)


def _logits(fmt, path, x):
    """The exported model's logits for `x`, read back as a user outside convbn would."""
    if fmt == "keras":
        return keras.saving.load_model(path, safe_mode=True)(x, training=False).numpy()
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(path))  # kept: its variables live as long as it does
        return loaded.serve(tf.constant(x)).numpy()
    if fmt == "tflite":
        it = tf.lite.Interpreter(model_path=str(path))
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], x.shape)
        it.allocate_tensors()
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path, arrays = synthetic_npz(tmp_path_factory.mktemp("data"), seed=5)
    return path, arrays["x_test"][:32].astype(np.float32) / 255  # as data/external.py scales them (--scale 1/255)


def _export(model, tmp_path, data, fmt="keras", fold=False):
    """(CLI result, export path, max |exported - original logits| on images shaped as the model takes them)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "theirs.keras"
    model.save(src)
    out = tmp_path / f"out{FORMATS[fmt]}"
    r = CliRunner().invoke(main, ["export", str(src), "--data", str(data[0]), "--format", fmt,
                                  "--output", str(out), *(["--fold-bn"] if fold else [])])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    x = data[1].reshape((len(data[1]), *model.input_shape[1:]))
    return r, out, float(np.abs(_logits(fmt, out, x) - model(x, training=False).numpy()).max())


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_sequential_model_exports_in_every_format(tmp_path, data, fmt, fold):
    """The probe: any outside Sequential model, folded or not, ended in clone_model's ValueError."""
    r, out, diff = _export(_sequential(), tmp_path, data, fmt, fold)
    assert diff < 1e-4
    assert ("folded into the preceding" in r.output) == fold, r.output
    if fmt == "keras":
        exported = keras.saving.load_model(out)
        assert any(isinstance(layer, L.BatchNormalization) for layer in exported.layers) != fold


def test_a_sequential_model_built_without_an_input_exports(tmp_path, data):
    model = keras.Sequential([L.Conv2D(4, 3, use_bias=False), L.BatchNormalization(), L.ReLU(), L.Flatten(),
                              L.Dense(10)])
    model.build((None, 28, 28, 1))
    assert _export(model, tmp_path, data, fold=True)[2] < 1e-4


def test_a_recalibrated_sequential_model_exports_and_is_inspected(tmp_path, data):
    """What diagnose advises for an outside model (recalibrate, then export --fold-bn), followed through."""
    src = tmp_path / "theirs.keras"
    _sequential().save(src)
    runner = CliRunner()
    r = runner.invoke(main, ["recalibrate", str(src), "--data", str(data[0]), "--batches", "2"])
    assert r.exit_code == 0, r.output
    recalibrated = tmp_path / "theirs-recalibrated.keras"
    r = runner.invoke(main, ["export", str(recalibrated), "--fold-bn", "--data", str(data[0])])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    folded = tmp_path / "theirs-recalibrated-folded.keras"
    want = keras.saving.load_model(recalibrated)(data[1][..., None], training=False).numpy()
    assert np.abs(_logits("keras", folded, data[1][..., None]) - want).max() < 1e-4
    r = runner.invoke(main, ["inspect-bn", str(recalibrated)])
    assert r.exit_code == 0 and "batch_normalization" in r.output, r.output
    r = runner.invoke(main, ["diagnose", str(recalibrated), "--data", str(data[0])])
    assert r.exit_code in (0, 4) and "verdict:" in r.output and "Traceback" not in r.output, r.output  # 4: found


def _permuted(*layers, sequential=False):
    """A channels_first model as people write it: NHWC images, Permute((3, 1, 2)), then `layers`."""
    return _model([L.Permute((3, 1, 2)), *layers], sequential=sequential)


@pytest.mark.parametrize("fmt", ["keras", *(pytest.param(f, marks=pytest.mark.slow) for f in FORMATS if f != "keras")])
def test_a_channels_first_model_with_a_channels_last_flatten_exports(tmp_path, data, fmt):
    """The probe's "differ by 0.778": Flatten() (channels_last, Keras' default) of NCHW maps flattens them in
    C, H, W order; the export, rebuilt in channels_last, flattened H, W, C and fed the Dense other numbers."""
    model = _permuted(L.Conv2D(4, 3, **CF), L.BatchNormalization(axis=1), L.ReLU(), L.MaxPooling2D(**CF),
                      L.Flatten(), L.Dense(10))
    for fold in (False, True):
        r, out, diff = _export(model, tmp_path / str(fold), data, fmt, fold)
        assert diff < 1e-4
        assert ("folded into the preceding" in r.output) == fold, r.output


def test_a_sequential_channels_first_model_of_layout_aware_layers_is_rebuilt_in_channels_last(tmp_path, data):
    """As convbn's own channels_first models are: no Permute, no channels_first layer left, every BN folded."""
    model = _permuted(L.Conv2D(4, 3, use_bias=False, **CF), L.BatchNormalization(axis=1), L.ReLU(),
                      L.MaxPooling2D(**CF), L.Flatten(**CF), L.Dense(10), sequential=True)
    r, out, diff = _export(model, tmp_path, data, fold=True)
    assert diff < 1e-4
    layers = keras.saving.load_model(out).layers
    assert not any(isinstance(layer, (L.Permute, L.BatchNormalization)) for layer in layers)
    assert not any(getattr(layer, "data_format", None) == "channels_first" for layer in layers)


def test_a_bn_over_the_width_of_a_channels_first_conv_is_kept(tmp_path, data):
    """BatchNormalization() (axis -1) after a channels_first conv normalizes the width; with as many filters as
    columns the fold broadcast its scale over the output channels instead (and channels_last moved it there)."""
    model = _permuted(L.Conv2D(26, 3, use_bias=False, **CF), L.BatchNormalization(), L.ReLU(),
                      L.GlobalAveragePooling2D(**CF), L.Dense(10))
    for fold in (False, True):
        r, out, diff = _export(model, tmp_path / str(fold), data, fold=fold)
        assert diff < 1e-4 and "folded into the preceding" not in r.output, r.output


def test_a_channels_first_conv_that_keras_adds_a_bias_to_along_the_width_keeps_its_bn(tmp_path, data):
    """NCHW input, no Permute: the conv stays channels_first. Folding gives it a bias, which Keras' Conv2D adds
    along the width when that equals the filter count (model/conv.py): the export differed by 2.55."""
    model = _model([L.Conv2D(26, 3, use_bias=False, **CF), L.BatchNormalization(axis=1), L.ReLU(),
                    L.GlobalAveragePooling2D(**CF), L.Dense(10)], input_shape=(1, 28, 28))
    r, out, diff = _export(model, tmp_path, data, fold=True)
    assert diff < 1e-4 and "folded into the preceding" not in r.output, r.output
    narrower = _model([L.Conv2D(8, 3, use_bias=False, **CF), L.BatchNormalization(axis=1), L.ReLU(),
                       L.GlobalAveragePooling2D(**CF), L.Dense(10)], input_shape=(1, 28, 28))
    r, out, diff = _export(narrower, tmp_path / "narrower", data, fold=True)
    assert diff < 1e-4 and "folded into the preceding" in r.output, r.output  # where Keras adds it right, it folds


def test_export_force_never_replaces_its_own_source(tmp_path, data):
    """`export SRC.keras --output SRC.keras --force` (the same path typed twice) replaced the model it exported from."""
    src = tmp_path / "theirs.keras"
    _sequential().save(src)
    before = src.read_bytes()
    r = CliRunner().invoke(main, ["export", str(src), "--data", str(data[0]), "--output", str(src), "--force"])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "is the model being exported" in errors[0], r.output
    assert src.read_bytes() == before


def test_an_export_its_own_reader_refuses_is_one_line_naming_the_output(tmp_path, data):
    """A SavedModel export whose graph holds an operation off convbn's list (ResizeBicubic) named its staging
    temporary and advised exporting with convbn, which is what the user was doing."""
    src, out = tmp_path / "theirs.keras", tmp_path / "out_savedmodel"
    _model([L.Resizing(28, 28, interpolation="bicubic"), L.Conv2D(4, 3), L.BatchNormalization(),
            L.GlobalAveragePooling2D(), L.Dense(10)]).save(src)
    r = CliRunner().invoke(main, ["export", str(src), "--data", str(data[0]), "--format", "savedmodel",
                                  "--output", str(out)])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert errors[0].startswith(f"error: {out}: the savedmodel export does not open again") and ".tmp" not in errors[0]
    assert "ResizeBicubic" in errors[0] and not out.exists()
