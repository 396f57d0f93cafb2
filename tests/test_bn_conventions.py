"""BN correctness, round 2: the channels_first conv bias, per-replica moving statistics, honest tables for fixed
gamma/beta, batch statistics only where there is BN, float32 precise BN under bfloat16, TF1's unbiased moving
variance, and settings under which BN cannot normalize."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from conftest import REPO, tiny_raw  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import ConfigError, load_config  # noqa: E402
from convbn_cli.model import FusedBatchNorm, build_model, recalibrate_model  # noqa: E402
from convbn_cli.model.fold import standard_model  # noqa: E402
from convbn_cli.model.keras_bn import BatchNormalization  # noqa: E402
from convbn_cli.train import train  # noqa: E402


def _both_layouts(tmp_path, layers):
    raw = tiny_raw(tmp_path)
    raw["model"]["layers"] = layers
    last = build_model(load_config(raw=raw))
    raw["model"]["data_format"] = "channels_first"
    first = build_model(load_config(raw=raw))
    rng = np.random.default_rng(0)
    for a, b in zip(last.weights, first.weights):
        value = rng.normal(size=a.shape).astype(np.float32) if "bias" in a.path else a.numpy()
        a.assign(value)
        b.assign(value)
    return last, first


# --------------------------------------------------------------------------- 1. channels_first conv bias

WIDTH_EQUALS_FILTERS = [  # conv1's output is 14x14x14 and conv2's 7x7x7: width == filters, with conv biases
    {"type": "conv", "filters": 14, "kernel": 3, "stride": 2, "bn": False},
    {"type": "conv", "filters": 7, "kernel": 3, "stride": 2, "bn": {"center": False}},
    {"type": "flatten"},
    {"type": "dense", "units": 10},
]


def test_channels_first_conv_bias_is_right_eagerly_compiled_and_under_xla(tmp_path):
    last, first = _both_layouts(tmp_path, WIDTH_EQUALS_FILTERS)
    x = np.random.default_rng(1).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    want = last(x, training=False).numpy()
    runs = {"eager": lambda m: m(x, training=False),
            "tf.function": lambda m: tf.function(lambda a: m(a, training=False))(x),
            "xla": lambda m: tf.function(lambda a: m(a, training=False), jit_compile=True)(x)}
    for how, run in runs.items():
        np.testing.assert_allclose(run(first).numpy(), want, atol=1e-4, err_msg=how)

    def grads(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True)))
        return {v.path.split("/")[0] + "/" + v.name: g.numpy() for v, g in
                zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables))}

    g_last, g_first = grads(last), grads(first)
    for key in g_last:
        # a bias in front of BN gets a gradient of ~0 (noise near 1e-4); the bug made it 12-31
        np.testing.assert_allclose(g_first[key], g_last[key], rtol=1e-3, atol=1e-3, err_msg=key)


def test_channels_first_export_is_plain_keras_in_channels_last_and_right_when_called_eagerly(tmp_path):
    last, first = _both_layouts(tmp_path, WIDTH_EQUALS_FILTERS)
    x = np.random.default_rng(2).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    for fold in (False, True):
        exported, _, _ = standard_model(first, fold_bn=fold)
        assert all(type(layer).__module__.startswith("keras") for layer in exported.layers)
        assert not any(getattr(layer, "data_format", None) == "channels_first" for layer in exported.layers)
        path = tmp_path / f"m{fold}.keras"
        exported.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        want = last(x, training=False).numpy()
        np.testing.assert_allclose(loaded(x, training=False).numpy(), want, atol=1e-4)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-4)


# --------------------------------------------------------------------------- 2. and 7. under tf.distribute

REPLICAS = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_raw
    from pathlib import Path
    from convbn_cli.tf_setup import import_tensorflow
    tf = import_tensorflow()
    from convbn_cli.config import load_config, plan_layers
    from convbn_cli.model import build_model, bn_layers
    from convbn_cli.model.keras_bn import BatchNormalization
    from convbn_cli.train import distribute

    raw = tiny_raw(Path("/tmp"), **{"model.bn": {"decay": 0.0}, "data.batch_size": 4,
                                    "distribute": {"strategy": "mirrored", "sync_bn": False, "cpu_replicas": 2}})
    raw["model"]["layers"] = [{"type": "conv", "filters": 3, "kernel": 3, "stride": 2, "bn": {"impl": "keras"}},
                              {"type": "conv", "filters": 3, "kernel": 3, "stride": 2},
                              {"type": "flatten"}, {"type": "dense", "units": 5, "bn": True},
                              {"type": "dense", "units": 10}]
    cfg = load_config(raw=raw)
    distribute.setup_devices(cfg)
    strategy = distribute.make_strategy(cfg)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)
    x[:4] *= 0.2  # the two replicas' slices have clearly different statistics
    out = {"replicas": strategy.num_replicas_in_sync}
    with strategy.scope():
        model = build_model(cfg, plan_layers(cfg))
    ref = build_model(load_config(raw={**raw, "distribute": {"strategy": "none"}}))
    for a, b in zip(ref.weights, model.weights):
        a.assign(b.numpy())
    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))))
    strategy.run(tf.function(lambda t: model(t, training=True)), args=(batch,))
    # decay 0: each moving mean is the batch mean of the last step; the rule: the average over replicas
    for layer in bn_layers(model):
        halves = []
        sub = keras.Model(ref.input, ref.get_layer(layer.name).input)
        for part in (x[:4], x[4:]):
            h = sub(part, training=True).numpy().astype(np.float64)  # what that replica's BN saw
            halves.append(h.reshape(-1, h.shape[-1]).mean(0))
        want = np.mean(halves, 0)
        out[layer.name] = {"impl": type(layer).__name__,
                           "err": float(np.abs(layer.moving_mean.numpy() - want).max()),
                           "to_replica0": float(np.abs(layer.moving_mean.numpy() - halves[0]).max())}

    # synchronized BN of a channel with mean 300 and std 0.1 (Keras' E[x^2] - E[x]^2 loses it in float32)
    for rule in ("biased", "unbiased"):
        with strategy.scope():
            bn = BatchNormalization(synchronized=True, momentum=0.0, moving_variance=rule)
            bn.build((None, 3))
        big = (300.0 + 0.1 * rng.standard_normal((64, 3))).astype(np.float32)
        ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(big))
        strategy.run(tf.function(lambda t: bn(t, training=True)), args=(next(iter(ds)),))
        want = big.astype(np.float64).var(0, ddof=1 if rule == "unbiased" else 0)
        out["sync_" + rule] = float(np.abs(bn.moving_variance.numpy() / want - 1).max())
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def replicas():
    r = subprocess.run([sys.executable, "-c", REPLICAS, str(REPO / "tests")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_without_sync_bn_every_bn_layer_averages_its_moving_statistics_over_replicas(replicas):
    assert replicas["replicas"] == 2
    assert replicas["conv1_bn"]["impl"] == "BatchNormalization"  # impl: keras
    assert replicas["conv2_bn"]["impl"] == "FusedBatchNorm"
    assert replicas["dense1_bn"]["impl"] == "BatchNormalization"  # dense BN: Keras' layer
    for name in ("conv1_bn", "conv2_bn", "dense1_bn"):
        assert replicas[name]["err"] < 1e-5, (name, replicas[name])
        assert replicas[name]["to_replica0"] > 1e-3  # not replica 0's alone


def test_synchronized_variance_is_exact_for_a_large_mean(replicas):
    assert replicas["sync_biased"] < 1e-3 and replicas["sync_unbiased"] < 1e-3


# --------------------------------------------------------------------------- 3. and 4. honest tables, batch stats

@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory, synthetic):
    tmp = tmp_path_factory.mktemp("fixed")
    raw = tiny_raw(tmp, **{"train.epochs": 1})
    raw["model"]["layers"][0]["bn"] = {"scale": False}
    raw["model"]["layers"][1]["bn"] = {"center": False}
    return train(load_config(raw=raw), data=synthetic, log=lambda m: None, progress=False).run_dir


def test_fixed_gamma_and_beta_are_shown_as_fixed_and_not_ranked(fixed_run, tmp_path):
    runner = CliRunner()
    t = runner.invoke(main, ["inspect-bn", str(fixed_run), "--rank", "--all"])
    assert t.exit_code == 0, t.output
    conv1 = t.output.split("conv1_bn  (")[1].split("conv2_bn  (")[0]
    assert "gamma fixed at 1 (scale: false)" in conv1 and "channel(s) with |gamma|" not in conv1
    assert all(line.split()[1] == "fixed" for line in conv1.splitlines()[3:7])  # the gamma column
    conv2 = t.output.split("conv2_bn  (")[1]
    assert "beta fixed at 0 (center: false)" in conv2 and "channel(s) with |gamma|" in conv2
    assert all(line.split()[2] == "fixed" for line in conv2.splitlines()[4:10])  # the beta column
    assert "conv1_bn: gamma fixed (scale: false), not ranked" in t.output
    assert "conv2_bn: fraction of channels with |gamma| below" in t.output
    rows = list(csv.DictReader(io.StringIO(runner.invoke(main, ["inspect-bn", str(fixed_run), "--format",
                                                                "csv"]).output)))
    assert {r["gamma"] for r in rows if r["layer"] == "conv1_bn"} == {""}
    assert {r["beta"] for r in rows if r["layer"] == "conv2_bn"} == {""}
    assert all(r["gamma"] for r in rows if r["layer"] == "conv2_bn")
    j = json.loads(runner.invoke(main, ["inspect-bn", str(fixed_run), "--format", "json", "--rank"]).output)
    assert j["layers"]["conv1_bn"]["summary"]["dead"] is None and j["layers"]["conv1_bn"]["rank"] is None
    png = tmp_path / "fixed.png"
    assert runner.invoke(main, ["inspect-bn", str(fixed_run), "--plot", str(png)]).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_batch_statistics_are_refused_for_a_model_without_bn(fixed_run, mnist_cache, tmp_path):
    runner = CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})
    out = fixed_run / "export" / "folded.keras"
    r = runner.invoke(main, ["export", str(fixed_run), "--fold-bn", "--output", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["eval", str(out), "--bn-stats", "batch"])
    assert r.exit_code == 2 and "--bn-stats batch needs BN layers and this model has none" in r.output
    assert runner.invoke(main, ["eval", str(out), "--no-progress"]).exit_code == 0


# --------------------------------------------------------------------------- 5. precise BN in float32

def test_precise_bn_statistics_are_float32_under_mixed_bfloat16(tmp_path):
    cfg = load_config(raw=tiny_raw(tmp_path))
    model = build_model(cfg, precision="mixed_bfloat16")
    rng = np.random.default_rng(4)
    batches = [tf.constant((rng.uniform(size=(16, 28, 28, 1)) * 3 + 5).astype(np.float32)) for _ in range(3)]
    upstream = keras.Model(model.input, model.get_layer("conv1_bn").input)
    outs = [upstream(b, training=False).numpy().astype(np.float64) for b in batches]  # the bfloat16 conv outputs
    assert upstream(batches[0]).dtype == tf.bfloat16
    recalibrate_model(model, batches)
    bn = model.get_layer("conv1_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([o.mean((0, 1, 2)) for o in outs], 0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([o.var((0, 1, 2)) for o in outs], 0), rtol=1e-4)


# --------------------------------------------------------------------------- 6. TF1's unbiased moving variance

@pytest.mark.parametrize("layer", [
    lambda rule: FusedBatchNorm(momentum=0.0, moving_variance=rule),
    lambda rule: BatchNormalization(momentum=0.0, moving_variance=rule),
    lambda rule: BatchNormalization(momentum=0.0, moving_variance=rule, synchronized=True),
], ids=["fused", "keras", "sync"])
@pytest.mark.parametrize("rule", ["biased", "unbiased"])
def test_moving_variance_rule_is_honoured_and_outputs_do_not_change(layer, rule):
    x = np.random.default_rng(5).normal(2.0, 3.0, size=(3, 4, 5, 6)).astype(np.float32)
    bn = layer(rule)
    y = bn(x, training=True).numpy()
    flat = x.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(bn.moving_variance.numpy(), flat.var(0, ddof=1 if rule == "unbiased" else 0),
                               rtol=1e-4)
    # normalization itself always uses the biased variance
    np.testing.assert_allclose(y, (x - flat.mean(0)) / np.sqrt(flat.var(0) + bn.epsilon), rtol=1e-3, atol=1e-3)


def test_unbiased_rule_reaches_the_config_precise_bn_and_exports(tmp_path):
    cfg = load_config(raw=tiny_raw(tmp_path, **{"model.bn": {"moving_variance": "unbiased"}}))
    model = build_model(cfg)
    assert {layer.moving_variance_rule for layer in model.layers if hasattr(layer, "moving_variance_rule")} == \
        {"unbiased"}
    batches = [tf.constant(np.random.default_rng(s).uniform(size=(4, 28, 28, 1)).astype(np.float32))
               for s in range(2)]
    recalibrate_model(model, batches)
    outs = [model.get_layer("conv1")(b).numpy().astype(np.float64) for b in batches]
    np.testing.assert_allclose(model.get_layer("conv1_bn").moving_variance.numpy(),
                               np.mean([o.reshape(-1, 4).var(0, ddof=1) for o in outs], 0), rtol=1e-4)
    exported, _, kept = standard_model(model)
    assert kept and all(type(layer).__module__.startswith("keras") for layer in exported.layers)


# --------------------------------------------------------------------------- 7. settings that cannot normalize

@pytest.mark.parametrize("changes,message", [
    ({"data.batch_size": 1, "model.layers": [{"type": "flatten"}, {"type": "dense", "units": 8, "bn": True},
                                             {"type": "dense", "units": 10}]},
     "model.layers[1] (dense1_bn): normalizes over 1 value per channel (data.batch_size 1)"),
    ({"data.batch_size": 1, "model.layers": [{"type": "conv", "filters": 4, "kernel": 28, "padding": "valid"},
                                             {"type": "flatten"}, {"type": "dense", "units": 10}]},
     "model.layers[0] (conv1_bn): normalizes over 1 value per channel (data.batch_size 1 x 1x1)"),
    ({"model.bn": {"renorm": True, "moving_variance": "unbiased"}},
     "model.layers[0].bn.moving_variance: unbiased is not available with renorm"),
    # a training split of one image is a batch of one, whatever data.batch_size says
    ({"data.max_train": 1, "model.layers": [{"type": "flatten"}, {"type": "dense", "units": 8, "bn": True},
                                            {"type": "dense", "units": 10}]},
     "model.layers[1] (dense1_bn): normalizes over 1 value per channel (data.max_train 1 with data.val_split 0.2 "
     "leaves 1 training image)"),
    ({"data.max_train": 1, "data.val_split": 0.9},
     "data.max_train: data.max_train 1 with data.val_split 0.9 leaves 0 training images, so there is nothing"),
    ({"data.batch_size": 1, "distribute": {"strategy": "mirrored", "sync_bn": False, "cpu_replicas": 2},
      "model.layers": [{"type": "flatten"}, {"type": "dense", "units": 8, "bn": True}, {"type": "dense", "units": 10}]},
     "model.layers[1] (dense1_bn): normalizes over 1 value per channel (data.batch_size 1)"),
])
def test_bn_that_cannot_normalize_is_refused_naming_the_layer(tmp_path, changes, message):
    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_raw(tmp_path, **changes))
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


def test_batch_of_one_is_fine_where_bn_sees_many_values(tmp_path):
    cfg = load_config(raw=tiny_raw(tmp_path, **{"data.batch_size": 1}))  # conv BN over 14x14 values
    assert cfg.data.batch_size == 1
    dense_bn = [{"type": "flatten"}, {"type": "dense", "units": 8, "bn": True}, {"type": "dense", "units": 10}]
    # synchronized BN over 1 image x 2 replicas normalizes over the global batch's 2 values per channel
    cfg = load_config(raw=tiny_raw(tmp_path, **{"data.batch_size": 1, "model.layers": dense_bn, "distribute": {
        "strategy": "mirrored", "sync_bn": True, "cpu_replicas": 2}}))
    assert cfg.distribute.sync_bn and cfg.data.batch_size == 1
