"""Issue 39: the BN trace while training (bn_trace.npz) against NumPy and TF1's update rule, across a --resume in the
middle of an epoch; the lag it shows; its pictures in the run and in `convbn report` (headless Chromium); and the
batch-statistics variables kept out of checkpoints and .keras files."""

from __future__ import annotations

import os
import re
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import quiet, screenshot, synthetic_npz, tiny_raw

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.data.pipeline import batch_loader, epoch_order, make_splits  # noqa: E402
from convbn_cli.model import build_model  # noqa: E402
from convbn_cli.model.batch_trace import batch_variables, keep_batch_statistics  # noqa: E402
from convbn_cli.model.bn import bn_layers  # noqa: E402
from convbn_cli.model.graph import input_model  # noqa: E402
from convbn_cli.runs import RunDir  # noqa: E402
from convbn_cli.runs.bn_trace import TRACE_FILE, empty, extend, read_trace, to_bytes  # noqa: E402
from convbn_cli.train import Interrupted, train  # noqa: E402

pytestmark = pytest.mark.heavy

STEPS = 16  # tiny_raw on `synthetic`: 512 training images in batches of 32


def _numpy_batch_statistics(cfg, data, weights, step):
    """{layer: (mean, biased variance)} in float64 of what each BN layer received in training step `step` (from 1):
    the model with the weights it had before that step, on that step's batch, every BN in training mode."""
    splits = make_splits(data, cfg)
    epoch, i = divmod(step - 1, STEPS)
    order = epoch_order(splits.size("train"), cfg.data.batch_size, cfg.train.seed, epoch)
    x, _ = batch_loader(splits, cfg)(tf.constant(epoch, tf.int64), tf.constant(i),
                                      tf.constant(order[i * cfg.data.batch_size:(i + 1) * cfg.data.batch_size]))
    model = build_model(cfg)
    model.set_weights(weights)
    out = {}
    for bn in bn_layers(model):
        h = np.asarray(input_model(model, bn)(x, training=True), np.float64)
        out[bn.name] = (h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2)))
    return out


def _check_against_numpy(trace, cfg, data, weights, steps):
    for step in steps:
        k = int(np.flatnonzero(trace.steps == step)[0])
        for name, (mean, var) in _numpy_batch_statistics(cfg, data, weights[step - 1], step).items():
            np.testing.assert_allclose(trace.layers[name]["batch_mean"][k], mean, rtol=0, atol=1e-5)
            np.testing.assert_allclose(trace.layers[name]["batch_variance"][k], var, rtol=0, atol=1e-5)


def _check_tf1_rule(trace):
    """moving = decay * moving + (1 - decay) * batch, sample after sample (every step is sampled), from 0 and 1."""
    for name, a in trace.layers.items():
        d = trace.decay[name]
        for q, start in (("mean", 0.0), ("variance", 1.0)):
            before = np.concatenate([np.full((1, a[f"moving_{q}"].shape[1]), start), a[f"moving_{q}"][:-1]])
            np.testing.assert_allclose(a[f"moving_{q}"], d * before + (1 - d) * a[f"batch_{q}"], rtol=1e-5, atol=1e-6)


def _weights_after_each_step(store):
    return lambda step, model: store.__setitem__(step, model.get_weights())


def test_the_trace_holds_each_steps_batch_statistics_and_the_tf1_update(tmp_path, synthetic):
    cfg = load_config(raw=tiny_raw(tmp_path, **{"output.bn_trace": 1, "train.epochs": 1}))
    weights = {}
    result = train(cfg, data=synthetic, log=quiet, progress=False, on_step=_weights_after_each_step(weights))
    trace = read_trace(result.run_dir / TRACE_FILE)
    assert trace.steps.tolist() == list(range(1, STEPS + 1)) and trace.end_step == STEPS
    assert list(trace.layers) == ["conv1_bn", "conv2_bn"] and trace.decay["conv1_bn"] == pytest.approx(0.9)
    _check_against_numpy(trace, cfg, synthetic, weights, steps=(2, 9, 16))
    _check_tf1_rule(trace)


def _events(folder) -> dict:
    """{tag: {step: value}} of a TensorBoard run: scalars as floats, histograms as their (buckets, 3) arrays."""
    found = {}
    for event_file in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for v in event.summary.value:
                found.setdefault(v.tag, {})[event.step] = tf.make_ndarray(v.tensor)
    return found


def test_tensorboard_has_the_traces_lag_and_statistics_at_its_steps(tmp_path, synthetic):
    from convbn_cli.present.bn_trace import lag

    cfg = load_config(raw=tiny_raw(tmp_path, **{"train.epochs": 1}))  # the default output.bn_trace
    run = train(cfg, data=synthetic, log=quiet, progress=False).run_dir
    trace = read_trace(run / TRACE_FILE)
    events = _events(run / "tensorboard" / "train")
    assert len(trace) >= 8 and set(trace.layers) == {"conv1_bn", "conv2_bn"}
    for name, a in trace.layers.items():
        gaps = lag(trace, name)
        for key in ("mean", "variance"):
            written = events[f"bn/{name}/lag_{key}"]  # KeyError: the tag is missing
            assert sorted(written) == trace.steps.tolist()
            np.testing.assert_allclose([float(written[s]) for s in trace.steps], gaps[key], rtol=1e-6, atol=0)
        for q in ("moving_mean", "moving_variance", "batch_mean"):
            written = events[f"bn/{name}/{q}"]
            assert sorted(written) == trace.steps.tolist()
            for k, step in enumerate(trace.steps):
                buckets = written[step]  # rows (left edge, right edge, count) over the layer's channels
                assert buckets[:, 2].sum() == a[q].shape[1]
                assert buckets[0, 0] == pytest.approx(a[q][k].min(), rel=1e-6, abs=1e-12)
                assert buckets[-1, 1] == pytest.approx(a[q][k].max(), rel=1e-6, abs=1e-12)

    off = load_config(raw=tiny_raw(tmp_path / "off", **{"train.epochs": 1, "output.bn_trace": None}))
    result = train(off, data=synthetic, log=quiet, progress=False)
    tags = set(_events(result.run_dir / "tensorboard" / "train"))
    assert "epoch/loss" in tags and not any(t.startswith("bn/") for t in tags)
    assert not (result.run_dir / TRACE_FILE).exists()
    kept = [v.numpy() for bn in bn_layers(result.model) for v in batch_variables(bn)]
    assert len(kept) == 4 and not any(np.any(v) for v in kept)  # without the trace no step wrote them


def test_tensorboard_writes_each_trace_sample_in_one_compiled_call(tmp_path):
    """The ~5 summaries per BN layer of a sample go through one tf.function, traced once for the run: written
    eagerly they cost ~10x more, inside the timed epochs (BENCHMARKS.md, "The BN trace's cost")."""
    from types import SimpleNamespace

    from convbn_cli.runs.bn_trace import QUANTITIES
    from convbn_cli.train.events import TensorBoard

    tracer = SimpleNamespace(listeners=[])
    board = TensorBoard(bn_trace=tracer)
    cfg = load_config(raw=tiny_raw(tmp_path))
    board.on_start(SimpleNamespace(cfg=cfg, run=SimpleNamespace(tensorboard=tmp_path / "tb")))
    assert tracer.listeners == [board.on_bn_sample]
    rng = np.random.default_rng(0)
    samples = {step: {n: {q: rng.uniform(0.5, 2.0, c).astype(np.float32) for q in QUANTITIES}
                      for n, c in (("conv1_bn", 4), ("conv2_bn", 6))} for step in (20, 40, 60)}
    for step, values in samples.items():
        board.on_bn_sample(step, values)
    assert board.write_bn_sample.experimental_get_tracing_count() == 1
    board.train.flush()
    events = _events(tmp_path / "tb" / "train")
    for name in ("conv1_bn", "conv2_bn"):
        assert sorted(events[f"bn/{name}/lag_mean"]) == [20, 40, 60]
        written = events[f"bn/{name}/moving_variance"][40]
        assert written[:, 2].sum() == len(samples[40][name]["moving_variance"])
        assert written[-1, 1] == pytest.approx(samples[40][name]["moving_variance"].max(), rel=1e-6)


def test_the_trace_across_a_resume_in_the_middle_of_an_epoch(tmp_path, synthetic):
    """Interrupted at step 22 of 32 (epoch 2), resumed: every step once, the numbers as if never interrupted. A
    sample past the checkpoint left in the file (a kill between the trace's write and the checkpoint) is dropped."""
    cfg = load_config(raw=tiny_raw(tmp_path, **{"output.bn_trace": 1}))
    weights = {}

    def on_step(step, model):
        weights[step] = model.get_weights()
        if step == 22:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        train(cfg, data=synthetic, log=quiet, progress=False, on_step=on_step)
    run = RunDir(Path(e.value.checkpoint).parent.parent)
    first = read_trace(run.path / TRACE_FILE)
    assert first.steps.tolist() == list(range(1, 23)) and first.end_step == -1
    stale = {n: {q: np.full(a[q].shape[1], 7.0) for q in a} for n, a in first.layers.items()}
    extend(first, [23, 24], [stale, stale])  # past the checkpoint (step 22): must not survive the resume
    run.write_file(TRACE_FILE, to_bytes(first))

    train(cfg, data=synthetic, resume=run.path, log=quiet, progress=False, on_step=_weights_after_each_step(weights))
    trace = read_trace(run.path / TRACE_FILE)
    assert trace.steps.tolist() == list(range(1, 2 * STEPS + 1)) and trace.end_step == 2 * STEPS
    for name, a in trace.layers.items():
        np.testing.assert_array_equal(a["moving_mean"][:22], first.layers[name]["moving_mean"][:22])
        assert not np.any(a["batch_mean"] == 7.0)
    _check_against_numpy(trace, cfg, synthetic, weights, steps=(22, 23, 24, 32))
    _check_tf1_rule(trace)  # 22 -> 23 included: the resumed moving statistics are the checkpoint's


def test_the_lag_shows_a_high_decay_trailing_and_a_low_one_caught_up(tmp_path, synthetic):
    from convbn_cli.present.bn_trace import lag

    ends = {}
    for decay in (0.999, 0.8):
        cfg = load_config(raw=tiny_raw(tmp_path / str(decay), **{"model.bn.decay": decay, "output.plots": True,
                                                                 "train.precise_bn": "always"}))
        run = train(cfg, data=synthetic, log=quiet, progress=False).run_dir
        trace = read_trace(run / TRACE_FILE)
        ends[decay] = {n: lag(trace, n)["variance"][-1] for n in trace.layers}
        assert trace.final_mechanism == "precise_bn" and set(trace.final) == set(trace.layers)
        for picture in ("bn_trace.png", "bn_trace_heatmap.png"):
            assert (run / picture).stat().st_size > 10_000
    for name in ends[0.8]:
        # 32 steps of decay 0.999 keep 97% of the start (variance 1): many times the batch variance; 0.8 forgets it
        assert ends[0.999][name] > 3 and ends[0.8][name] < 0.5, ends


def test_batch_statistics_variables_are_in_no_checkpoint_and_no_keras_file(tmp_path):
    from convbn_cli.model.fused_bn import FusedBatchNorm
    from convbn_cli.model.keras_bn import BatchNormalization

    for layer in (FusedBatchNorm(name="bn"), BatchNormalization(name="bn")):
        inp = keras.Input((5, 5, 3))
        model = keras.Model(inp, layer(keras.layers.Conv2D(3, 3)(inp)))
        assert batch_variables(layer) is not None and len(layer.weights) == 4
        keep_batch_statistics(layer)
        x = np.random.default_rng(0).normal(size=(8, 5, 5, 3)).astype(np.float32)
        tf.function(lambda x, model=model: model(x, training=True))(x)
        h = np.asarray(model.layers[1](x), np.float64)
        mean, var = (v.numpy() for v in batch_variables(layer))
        np.testing.assert_allclose(mean, h.mean((0, 1, 2)), atol=1e-5)
        np.testing.assert_allclose(var, h.var((0, 1, 2)), atol=1e-5)
        prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
        names = [n for n, _ in tf.train.list_variables(prefix)]
        assert len([n for n in names if "/_operations/2/" in n]) == 4  # gamma, beta, moving mean and variance
        model.save(tmp_path / "m.keras")
        assert len(keras.models.load_model(tmp_path / "m.keras").layers[-1].weights) == 4


def test_a_run_report_shows_the_trace_and_the_activations_in_a_browser(run_copy, cli, browser, tmp_path):
    r = cli("report", run_copy)
    assert r.exit_code == 0, r.output
    text = (run_copy / "report.html").read_text()
    for section in ("BN statistics while training", "BN activations", "Per feature map vs per activation"):
        assert f"<h2>{section}</h2>" in text
    for alt in ("BN statistics while training", "batch mean per channel and step",
                "BN input, normalized values and output per channel", "per feature map vs per activation"):
        assert re.search(f'<img alt="{alt}" src="data:image/png;base64,', text), alt
    assert "parameters; statistics over N, H, W" in text
    assert screenshot(browser, run_copy / "report.html", tmp_path / "shot.png", size=(1400, 9000)) == []

    (run_copy / TRACE_FILE).write_bytes(b"damaged")  # the page still opens, and says why the trace is missing
    assert cli("report", run_copy).exit_code == 0
    assert "not a BN trace convbn wrote" in (run_copy / "report.html").read_text()
    (run_copy / TRACE_FILE).write_bytes(to_bytes(empty({"conv1_bn": 4}, {"conv1_bn": 0.9}, {"conv1_bn": "biased"}, 16)))
    assert cli("report", run_copy).exit_code == 0  # stopped before its first sample: said, not drawn empty
    assert "no sample yet" in (run_copy / "report.html").read_text()


def _outside_model(path):
    """A Keras model from elsewhere: BN straight on the pixels (its input is known to NumPy), then a conv BN."""
    rng = np.random.default_rng(3)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.BatchNormalization(name="pixels_bn")(inp)
    h = keras.layers.Conv2D(4, 3, name="conv")(h)
    h = keras.layers.BatchNormalization(name="conv_bn")(h)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    bn = model.get_layer("pixels_bn")
    for v, value in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance), (1.7, -0.4, 0.3, 0.05)):
        v.assign([value])
    model.get_layer("conv_bn").moving_variance.assign(rng.uniform(0.5, 2, 4).astype(np.float32))
    model.save(path)


def test_activations_of_a_keras_model_match_numpy(tmp_path, cli):
    import json

    _outside_model(tmp_path / "m.keras")
    npz, arrays = synthetic_npz(tmp_path, seed=5)
    r = cli("inspect-bn", tmp_path / "m.keras", "--activations", "--data", npz, "--format", "json",
            "--plot", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    x = arrays["x_test"][:128, :, :, None].astype(np.float64) / 255  # one batch of 128 images, pixels x 1/255
    norm = (x - 0.3) / np.sqrt(0.05 + 1e-3)
    layer = got["layers"]["pixels_bn"]
    assert got["images"] == 128 and layer["shape"] == [128, 28, 28, 1]
    for kind, values in (("input", x), ("normalized", norm), ("output", 1.7 * norm - 0.4)):
        np.testing.assert_allclose(layer[kind]["mean"], [values.mean()], rtol=1e-5)
        np.testing.assert_allclose(layer[kind]["std"], [values.std()], rtol=1e-5)
        np.testing.assert_allclose([layer[kind][f"p{q}"][0] for q in (5, 25, 50, 75, 95)],
                                   np.percentile(values, (5, 25, 50, 75, 95)), rtol=1e-5, atol=1e-6)
    e = got["per_activation"]  # the first conv-shaped BN: the pixels' own (N, 28, 28, 1)
    assert e["layer"] == "pixels_bn" and e["parameters"] == {"per_feature_map": 2, "per_activation": 2 * 28 * 28}
    assert e["values_per_statistic"] == {"per_feature_map": 128 * 28 * 28, "per_activation": 128}
    by_position = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    by_channel = (x - x.mean()) / np.sqrt(x.var() + 1e-3)
    np.testing.assert_allclose(e["maps"]["per_activation"], by_position[0, :, :, 0], atol=1e-4)
    np.testing.assert_allclose(e["maps"]["per_feature_map"], by_channel[0, :, :, 0], atol=1e-4)
    np.testing.assert_allclose(e["maps"]["mean_per_activation"], x.mean(0)[:, :, 0], atol=1e-6)
    assert (tmp_path / "a.png").stat().st_size > 10_000 and (tmp_path / "a_per_activation.png").is_file()

    conv = got["layers"]["conv_bn"]  # the output really is the layer's: gamma 1, beta 0 at the start
    np.testing.assert_allclose(conv["output"]["mean"], conv["normalized"]["mean"], atol=1e-5)
    r = cli("inspect-bn", tmp_path / "m.keras", "--activations")
    assert r.exit_code == 2 and "needs --data" in r.output


def test_activations_of_a_run(run_copy, cli):
    r = cli("inspect-bn", run_copy, "--activations", "--layer", "conv2_bn")
    assert r.exit_code == 0, r.output
    assert re.search(r"conv2_bn \(6 channels, input shape \(\d+, 7, 7, 6\)\)", r.output)
    assert "per activation: gamma and beta of shape (7, 7, 6), 588 parameters" in r.output
    assert cli("inspect-bn", run_copy, "--activations", "--layer", "nope").exit_code == 2
    assert cli("inspect-bn", run_copy, "--activations", "--rank").exit_code == 2


REPLICAS = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_raw, synthetic_arrays
    from pathlib import Path
    from convbn_cli.tf_setup import import_tensorflow
    tf = import_tensorflow()
    import keras
    from convbn_cli.config import load_config, plan_layers
    from convbn_cli.model import build_model
    from convbn_cli.model.batch_trace import batch_variables, keep_batch_statistics
    from convbn_cli.model.bn import bn_layers
    from convbn_cli.train import distribute
    from convbn_cli.train.steps import make_train_step
    from convbn_cli.train.optim import make_optimizer

    def config(sync_bn):
        return load_config(raw=tiny_raw(Path("/tmp"), **{"data.batch_size": 8, "distribute": {
            "strategy": "mirrored", "sync_bn": sync_bn, "cpu_replicas": 2}}))

    distribute.setup_devices(config(True))
    keras.utils.set_random_seed(1)
    data = synthetic_arrays(64, 8)
    x = data["x_train"][:16, :, :, None] / 255.0
    x[:8] *= 0.2  # the first replica's slice dimmed: its statistics differ clearly from the global batch's
    x, y = tf.constant(x, tf.float32), tf.constant(data["y_train"][:16].astype(np.int32))
    out = {}
    for sync in (True, False):
        cfg = config(sync)
        strategy = distribute.make_strategy(cfg)
        with strategy.scope():
            model = build_model(cfg, plan_layers(cfg))
            opt = make_optimizer(cfg.train, 100)
            opt.build(model.trainable_variables)
            step, _ = make_train_step(model, opt, cfg.train, strategy, 16)
        for bn in bn_layers(model):  # as the BN trace asks, before the step is traced
            keep_batch_statistics(bn)
        h = model.get_layer("conv1")(x).numpy().astype(np.float64)  # before the step: conv1 as initialized
        step(*next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y))))))
        mean, var = (v.numpy() for v in batch_variables(model.get_layer("conv1_bn")))
        out[str(sync)] = {f"{name}_err": [float(np.abs(mean - part.mean((0, 1, 2))).max()),
                                          float(np.abs(var - part.var((0, 1, 2))).max())]
                          for name, part in (("global", h), ("first_replica", h[:8]))}
    print(json.dumps(out))
""")


@pytest.mark.process
def test_under_two_replicas_the_trace_holds_the_global_batch_with_sync_bn_else_the_first_replicas():
    import json
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", REPLICAS, str(REPO / "tests")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert max(got["True"]["global_err"]) < 1e-5 and min(got["True"]["first_replica_err"]) > 1e-3
    assert max(got["False"]["first_replica_err"]) < 1e-5 and min(got["False"]["global_err"]) > 1e-3
