"""Several training steps per compiled call with the batches made inside the graph, the BN-aware weight
EMA (train.ema) that eval, inspect-bn and export see, and test-time augmentation in eval."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from conftest import quiet, run_cli, tiny_raw

tf = pytest.importorskip("tensorflow")

from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.data.pipeline import eval_dataset, make_splits, train_dataset  # noqa: E402
from convbn_cli.runs import RunDir  # noqa: E402
from convbn_cli.runs.target import open_target  # noqa: E402
from convbn_cli.train import train  # noqa: E402
from convbn_cli.train.loop import Interrupted  # noqa: E402


def weights(model):
    return [v.numpy() for v in model.weights]


def config(tmp_path, name, **over):
    raw = tiny_raw(tmp_path, **{"output.name": name, "data.augment": {"shift": 0.1, "rotation": 5},
                                "model.layers": [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2},
                                                 {"type": "conv", "filters": 6, "kernel": 3, "stride": 2},
                                                 {"type": "global_pool"},
                                                 {"type": "dropout", "rate": 0.2},
                                                 {"type": "dense", "units": 10}], **over})
    return load_config(raw=raw)


@pytest.fixture(scope="module")
def one_step_per_call(tmp_path_factory, synthetic):
    cfg = config(tmp_path_factory.mktemp("k1"), "k1")
    return train(cfg, data=synthetic, log=quiet, progress=False)


def test_in_graph_batches_are_the_pipeline_batches(tmp_path, synthetic):
    """The trainer's in-graph loader gives exactly the tf.data pipeline's batches (augmentation included)."""
    from convbn_cli.data.pipeline import batch_loader, epoch_order

    cfg = config(tmp_path, "b")
    splits = make_splits(synthetic, cfg)
    load = tf.function(batch_loader(splits, cfg))
    order = epoch_order(splits.size("train"), 32, cfg.train.seed, 1)
    for i, (x, y) in enumerate(train_dataset(splits, cfg, 1)):
        gx, gy = load(tf.constant(1, tf.int64), tf.constant(i), tf.constant(order[i * 32:(i + 1) * 32]))
        np.testing.assert_array_equal(gy.numpy(), y.numpy())
        np.testing.assert_allclose(gx.numpy(), x.numpy(), atol=1e-6)
    assert i == splits.size("train") // 32 - 1


@pytest.mark.parametrize("per_call", [5, 16])
def test_steps_per_execution_trains_the_same_weights(one_step_per_call, tmp_path, synthetic, per_call):
    cfg = config(tmp_path, "k", **{"train.steps_per_execution": per_call})
    seen = []
    result = train(cfg, data=synthetic, log=quiet, progress=False, on_step=lambda s, m: seen.append(s))
    for a, b in zip(weights(one_step_per_call.model), weights(result.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    steps = 16  # 512 training images / 32 per batch
    # one call back per compiled call, each ending where its chunk ends (the last chunk of an epoch is shorter)
    assert seen == [e * steps + min(d, steps) for e in range(2) for d in range(per_call, steps + per_call, per_call)]
    assert [r["step"] for r in result.metrics] == [16, 32]


def test_xla_compiles_the_step_not_the_loop_and_trains_the_same_weights(tmp_path, synthetic):
    from convbn_cli.train.steps import make_in_graph_steps

    cfg = config(tmp_path, "x", **{"train.steps_per_execution": 5, "train.jit_compile": True})
    # the loop gathers batches from the dataset in memory, a graph constant: under XLA a 4,000-image MNIST loop had
    # not finished its first call after four minutes, so only the step is compiled
    steps = make_in_graph_steps(lambda x, y: None, lambda e, i, idx: (idx, idx), 32, cfg.train)
    assert not steps._jit_compile and steps.step._jit_compile
    # without dropout, whose masks come from XLA's own random numbers under XLA
    layers = [layer for layer in cfg.model.model_dump()["layers"] if layer["type"] != "dropout"]
    runs = [train(config(tmp_path, f"x{xla}", **{"train.steps_per_execution": 5, "train.jit_compile": xla,
                                                 "model.layers": layers}), data=synthetic, log=quiet, progress=False)
            for xla in (False, True)]
    for a, b in zip(weights(runs[0].model), weights(runs[1].model)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_interrupt_between_calls_resumes_exactly(one_step_per_call, tmp_path, synthetic):
    cfg = config(tmp_path, "i", **{"train.steps_per_execution": 5})

    def ctrl_c(step, model):
        if step == 26:  # epoch 2, after its second call (steps 22-26)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        train(cfg, data=synthetic, log=quiet, progress=False, on_step=ctrl_c)
    assert os.path.basename(e.value.checkpoint) == "ckpt-26"
    run_dir = os.path.dirname(os.path.dirname(e.value.checkpoint))
    resumed = train(cfg, data=synthetic, resume=run_dir, log=quiet, progress=False)
    for a, b in zip(weights(one_step_per_call.model), weights(resumed.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, synthetic):
    cfg = config(tmp_path_factory.mktemp("ema"), "ema", **{"train.ema": {"decay": 0.9},
                                                            "train.precise_bn": {"batches": 8}})
    lines = []
    return cfg, train(cfg, data=synthetic, log=lines.append, progress=False), lines


def test_ema_is_the_average_of_the_weights_with_recalibrated_bn(ema_run, synthetic):
    from convbn_cli.data.pipeline import calibration_batches
    from convbn_cli.model import bn_layers, build_model, recalibrate_model
    from convbn_cli.train.loop import make_checkpoint
    from convbn_cli.train.optim import make_optimizer

    cfg, result, lines = ema_run
    run = RunDir(result.run_dir)
    # the raw weights of the last step, and the optimizer's averages, from the last training checkpoint
    model = build_model(cfg)
    opt = make_optimizer(cfg.train, 32)
    opt.build(model.trainable_variables)
    ckpt, _ = make_checkpoint(model, opt)
    ckpt.restore(str(run.checkpoints / "ckpt-32")).expect_partial()
    averages = [a.numpy() for a in opt._model_variables_moving_average]
    raw = [v.numpy() for v in model.trainable_variables]
    assert max(np.abs(a - r).max() for a, r in zip(averages, raw)) > 1e-3  # the average is not the last weights

    target = open_target(run.path)  # what eval, inspect-bn and export open by default
    assert target.source.startswith(str(run.ema)) and target.source.endswith("ckpt-32")
    for v, a in zip(target.model.trainable_variables, averages):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-6, atol=1e-7)
    # BN statistics: those precise BN computes for the averaged weights, not the training moving averages
    for v, a in zip(model.trainable_variables, averages):
        v.assign(a)
    trained_means = [layer.moving_mean.numpy() for layer in bn_layers(model)]
    recalibrate_model(model, calibration_batches(make_splits(synthetic, cfg), cfg, 8), progress=False)
    for mine, theirs, trained in zip(bn_layers(model), bn_layers(target.model), trained_means):
        np.testing.assert_allclose(theirs.moving_mean.numpy(), mine.moving_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(theirs.moving_variance.numpy(), mine.moving_variance.numpy(), rtol=1e-4,
                                   atol=1e-5)
        assert np.abs(trained - mine.moving_mean.numpy()).max() > 1e-4  # recalibration changed them

    results = json.loads(run.results.read_text())
    assert results["checkpoint"] == target.source and "before_ema" in results and "ema_val_acc" in results
    # over the training images as they are (the run augments them: train.precise_bn.augmented false, the default)
    assert any(line.startswith("EMA of the weights (decay 0.9), BN recomputed over 8 unaugmented batches")
               for line in lines)
    assert any("final model checkpoints/ema/" in line for line in lines)


def test_an_interrupted_ema_run_resumes_to_the_same_average(ema_run, tmp_path, synthetic):
    cfg, straight, _ = ema_run
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"root": str(tmp_path)})})

    def ctrl_c(step, model):
        if step == 21:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        train(cfg, data=synthetic, log=quiet, progress=False, on_step=ctrl_c)
    run_dir = os.path.dirname(os.path.dirname(e.value.checkpoint))
    assert not RunDir(run_dir).ema.exists()  # no final model before the run has finished
    resumed = train(cfg, data=synthetic, resume=run_dir, log=quiet, progress=False)
    for a, b in zip(weights(open_target(straight.run_dir, "ema").model), weights(open_target(resumed.run_dir).model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_inspect_and_export_see_the_ema_model(ema_run, synthetic, tmp_path):
    from convbn_cli.analysis import evaluate, inspect_bn
    from convbn_cli.data.pipeline import normalizer
    from convbn_cli.export.exporter import export

    cfg, result, _ = ema_run
    run = RunDir(result.run_dir)
    ema = open_target(run.path, "ema").model
    raw = open_target(run.path, "latest").model
    splits = make_splits(synthetic, cfg)
    x = next(iter(eval_dataset(splits, cfg, "test")))[0]
    assert np.abs(ema(x, training=False).numpy() - raw(x, training=False).numpy()).max() > 1e-3

    out = evaluate(run.path, data=synthetic)
    assert out["checkpoint"].startswith(str(run.ema))
    results = json.loads(run.results.read_text())
    assert out["accuracy"] == pytest.approx(results["test_acc"])
    stats = inspect_bn(run.path)
    layer = next(iter(stats["layers"]))
    bn = next(b for b in ema.layers if b.name == layer)
    np.testing.assert_allclose(stats["layers"][layer]["moving_mean"], bn.moving_mean.numpy(), rtol=1e-6)

    assert stats["checkpoint"] == out["checkpoint"]
    written = export(run.path, "keras", output=tmp_path / "m.keras", data=synthetic)
    assert written["source"] == out["checkpoint"]
    import keras

    exported = keras.saving.load_model(written["path"], safe_mode=True)  # takes raw pixels 0-255
    raw_pixels = tf.cast(splits.x_test[: len(x)], tf.float32)
    np.testing.assert_allclose(exported(raw_pixels).numpy(), ema(normalizer(cfg)(raw_pixels), training=False).numpy(),
                               atol=1e-4)


def test_tta_is_the_mean_softmax_over_shifted_views(ema_run, synthetic):
    from convbn_cli.analysis import evaluate

    cfg, result, _ = ema_run
    out = evaluate(result.run_dir, data=synthetic, tta=True)
    assert out["tta"]["views"] == 5

    # by hand: each image, and it shifted by one pixel down, up, right and left with a black border; softmax-averaged
    splits = make_splits(synthetic, cfg)
    x = np.concatenate([b[0].numpy() for b in eval_dataset(splits, cfg, "test")])
    model = open_target(result.run_dir).model
    probs = 0
    for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        view = np.roll(x, (dy, dx), axis=(1, 2))
        if dy:
            view[:, 0 if dy > 0 else -1] = 0.0
        if dx:
            view[:, :, 0 if dx > 0 else -1] = 0.0
        probs = probs + tf.nn.softmax(model(view, training=False)).numpy()
    by_hand = float(np.mean(probs.argmax(-1) == splits.y_test.numpy()))
    assert out["tta"]["accuracy"] == pytest.approx(by_hand)
    plain = float(np.mean(model(x, training=False).numpy().argmax(-1) == splits.y_test.numpy()))
    assert out["accuracy"] == pytest.approx(plain)


def test_eval_tta_on_the_command_line(trained, mnist_cache):
    _, result = trained
    env = {"CONVBN_DATA_DIR": str(mnist_cache)}
    out = run_cli("eval", result.run_dir, "--tta", "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["tta"]) >= {"accuracy", "loss", "views"}
    text = run_cli("eval", result.run_dir, "--tta", env=env)
    assert "with test-time augmentation" in text.stdout and f"{report['tta']['accuracy']:.2%}" in text.stdout
    bad = run_cli("eval", result.run_dir, "--tta", "--bn-stats", "batch", env=env)
    assert bad.returncode == 2 and "--tta" in bad.stderr and "Traceback" not in bad.stderr
