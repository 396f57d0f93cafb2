"""Precise BN (`convbn recalibrate`, `train.precise_bn`) and `convbn export` with BN folding."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from conftest import lagging_run, tiny_raw  # noqa: E402
from convbn_cli.analysis.recalibration import recalibrate  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.data.pipeline import make_splits, normalizer  # noqa: E402
from convbn_cli.errors import TargetError  # noqa: E402
from convbn_cli.export import export  # noqa: E402
from convbn_cli.model import (  # noqa: E402
    FusedBatchNorm,
    bn_layers,
    build_model,
    recalibrate_model,  # noqa: E402
)
from convbn_cli.model.fold import standard_model  # noqa: E402
from convbn_cli.runs.target import open_target  # noqa: E402
from convbn_cli.train import train  # noqa: E402


@pytest.fixture(scope="module")
def lagging(tmp_path_factory, mnist):
    """Trained briefly with TF1's default decay 0.999: the moving averages still sit near their start (the tiny net
    with a BN'd dense layer instead of the global pool)."""
    layers = [layer for layer in tiny_raw(tmp_path_factory.getbasetemp())["model"]["layers"]
              if layer["type"] != "global_pool"]
    layers[-1:-1] = [{"type": "flatten"}, {"type": "dense", "units": 16, "activation": "relu", "bn": True}]
    return lagging_run(tmp_path_factory.mktemp("lagging"), mnist,
                       **{"data.max_test": 1000, "train.epochs": 2, "model.layers": layers})


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_recalibrated_statistics_equal_numpy_population_statistics(tmp_path):
    model = build_model(load_config(raw=tiny_raw(tmp_path)))
    rng = np.random.default_rng(0)
    batches = [tf.constant(rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)) for _ in range(5)]
    recalibrate_model(model, batches)
    conv1, bn1, conv2, bn2 = (model.get_layer(n) for n in ("conv1", "conv1_bn", "conv2", "conv2_bn"))
    # layer 1: the statistics of conv1's output over the same batches, averaged per batch (biased variances)
    outs1 = [conv1(b).numpy().astype(np.float64) for b in batches]
    np.testing.assert_allclose(bn1.moving_mean.numpy(), np.mean([o.mean((0, 1, 2)) for o in outs1], 0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), np.mean([o.var((0, 1, 2)) for o in outs1], 0),
                               rtol=1e-4)
    # layer 2 sees layer 1 normalized with its new (recalibrated) statistics, as at inference
    g, be = bn1.gamma.numpy(), bn1.beta.numpy()
    m, v = bn1.moving_mean.numpy(), bn1.moving_variance.numpy()
    outs2 = [conv2(np.maximum(g * (o - m) / np.sqrt(v + bn1.epsilon) + be, 0).astype(np.float32)).numpy()
             .astype(np.float64) for o in outs1]
    np.testing.assert_allclose(bn2.moving_mean.numpy(), np.mean([o.mean((0, 1, 2)) for o in outs2], 0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), np.mean([o.var((0, 1, 2)) for o in outs2], 0),
                               rtol=1e-4)


def test_recalibration_recovers_accuracy_and_keeps_the_original(lagging, mnist):
    cfg, result = lagging
    ckpts = result.run_dir / "checkpoints"
    before_files = file_hashes(ckpts)
    r = recalibrate(result.run_dir, which="latest", batches=50, data=mnist, split="test")
    # a real improvement: the moving averages were far from the final weights' statistics
    assert r["after"]["accuracy"] > r["before"]["accuracy"] + 0.2, r
    assert r["after"]["accuracy"] > 0.8
    assert file_hashes(ckpts) == before_files  # the original checkpoints are untouched
    assert r["checkpoint"].endswith("recalibrated/ckpt-1")
    model = open_target(r["checkpoint"]).model
    for layer in bn_layers(model):
        np.testing.assert_allclose(layer.moving_variance.numpy(), r["layers"][layer.name][3], rtol=1e-6)
    again = recalibrate(result.run_dir, which="latest", batches=50, data=mnist, split="test")
    assert again["checkpoint"].endswith("recalibrated/ckpt-2")  # never over an earlier one
    assert again["after"]["accuracy"] == r["after"]["accuracy"]  # same batches, same statistics


def test_recalibrating_on_unaugmented_images_gives_their_statistics(tmp_path, mnist, mnist_cache):
    """`--unaugmented`, and by default (the run's train.precise_bn.augmented: false): the new moving statistics are
    those of the calibration batches' images as they are, not as augmentation changed them (checked against conv1's
    output over those images); `--augmented`: the augmented ones (which differ: the elastic distortion here moves
    every stroke)."""
    from convbn_cli.data.pipeline import epoch_order

    cfg, result = lagging_run(tmp_path, mnist, **{"data.augment": {"rotation": 20, "elastic": {"alpha": 34,
                                                                                               "sigma": 4}}})
    plain = recalibrate(result.run_dir, which="latest", batches=3, data=mnist, split="test", augmented=False)
    usual = recalibrate(result.run_dir, which="latest", batches=3, data=mnist, split="test", augmented=True)
    default = recalibrate(result.run_dir, which="latest", batches=3, data=mnist, split="test")
    assert (plain["augmented"], usual["augmented"], default["augmented"]) == (False, True, False)
    np.testing.assert_array_equal(default["layers"]["conv1_bn"][2], plain["layers"]["conv1_bn"][2])
    splits = make_splits(mnist, cfg)
    order = epoch_order(splits.size("train"), cfg.data.batch_size, cfg.train.seed, cfg.train.epochs)
    images = normalizer(cfg)(tf.gather(splits.x_train, order[:3 * cfg.data.batch_size]))
    model = open_target(plain["checkpoint"]).model
    conv1 = model.get_layer("conv1")
    outs = [conv1(b).numpy().astype(np.float64) for b in tf.split(images, 3)]
    want = np.mean([o.mean((0, 1, 2)) for o in outs], 0)
    np.testing.assert_allclose(model.get_layer("conv1_bn").moving_mean.numpy(), want, rtol=1e-4, atol=1e-5)
    augmented = open_target(usual["checkpoint"]).model.get_layer("conv1_bn").moving_mean.numpy()
    assert np.abs(augmented - want).max() > 10 * np.abs(plain["layers"]["conv1_bn"][2] - want).max()
    runner = CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})
    lines = runner.invoke(main, ["recalibrate", str(result.run_dir), "--unaugmented", "--batches", "3"]).output
    assert "over 3 unaugmented batches" in lines
    lines = runner.invoke(main, ["recalibrate", str(result.run_dir), "--augmented", "--batches", "3"]).output
    assert "over 3 augmented batches" in lines
    # a run from before train.precise_bn.augmented, whose precise BN calibrated on augmented images: by default so
    config = result.run_dir / "config.yaml"
    config.write_text(config.read_text().replace("precise_bn: null", "precise_bn: {batches: 50, when: auto}"))
    older = recalibrate(result.run_dir, which="latest", batches=3, data=mnist, split="test")
    assert older["augmented"] is True
    np.testing.assert_array_equal(older["layers"]["conv1_bn"][2], usual["layers"]["conv1_bn"][2])
    # a model from elsewhere has only --data's images, never augmented: refused, not ignored
    outside = export(result.run_dir, "keras", output=str(tmp_path / "outside.keras"))["path"]
    for augmented in (False, True):
        with pytest.raises(TargetError, match="is for a run's model"):
            recalibrate(outside, data_source="mnist", augmented=augmented)


def test_unaugmented_on_a_run_that_augments_nothing_says_so(lagging, mnist_cache):
    _, result = lagging
    runner = CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})
    for flag in ("--unaugmented", "--augmented"):
        r = runner.invoke(main, ["recalibrate", str(result.run_dir), flag, "--batches", "2"])
        assert r.exit_code == 0, r.output
        assert "over 2 batches" in r.output and "augmented" not in r.output.splitlines()[0]
        assert f"({flag}: the run's training augments nothing" in r.output


def test_precise_bn_option_at_the_end_of_training(tmp_path, mnist):
    raw = tiny_raw(tmp_path, **{"data.max_train": 1000, "data.max_test": 500, "model.bn": {"decay": 0.999},
                                "train.epochs": 1, "train.precise_bn": {"batches": 20}})
    result = train(load_config(raw=raw), data=mnist, log=lambda m: None, progress=False)
    res = json.loads((result.run_dir / "results.json").read_text())
    assert "recalibrated/ckpt-1" in res["checkpoint"] and res["test_acc"] > res["before_precise_bn"]["test_acc"]


@pytest.mark.parametrize("settle, says", [
    ({"train.precise_bn": {"batches": 3, "when": "always"}}, "over 3 unaugmented training batches"),
    ({"train.precise_bn": {"batches": 3}, "train.ema": {"decay": 0.9}}, "BN recomputed over 3 unaugmented batches")])
def test_training_settles_bn_on_the_training_images_as_they_are(tmp_path, mnist, settle, says):
    """Precise BN at the end of training (and the EMA's recompute) calibrates on the training images without
    data.augment, as inference sees them (train.precise_bn.augmented: false): the final model's statistics are those
    of conv1's output over exactly those images; results.json and the run's last lines say which."""
    from convbn_cli.data.pipeline import epoch_order

    lines = []
    raw = tiny_raw(tmp_path, **{"data.max_train": 1000, "data.max_test": 200, "train.epochs": 1,
                                "data.augment": {"rotation": 20, "elastic": {"alpha": 34, "sigma": 4}}, **settle})
    cfg = load_config(raw=raw)
    result = train(cfg, data=mnist, log=lines.append, progress=False)
    bn = json.loads((result.run_dir / "results.json").read_text())["bn_statistics"]
    assert bn["augmented"] is False and bn["batches"] == 3 and bn.get("kept", True)
    assert any(says in line for line in lines), lines
    splits = make_splits(mnist, cfg)
    order = epoch_order(splits.size("train"), cfg.data.batch_size, cfg.train.seed, cfg.train.epochs)
    images = normalizer(cfg)(tf.gather(splits.x_train, order[:3 * cfg.data.batch_size]))
    model = open_target(result.run_dir).model
    outs = [model.get_layer("conv1")(b).numpy().astype(np.float64) for b in tf.split(images, 3)]
    want = np.mean([o.mean((0, 1, 2)) for o in outs], 0)
    np.testing.assert_allclose(model.get_layer("conv1_bn").moving_mean.numpy(), want, rtol=1e-4, atol=1e-5)


def test_folded_model_matches_and_has_no_bn_layers(lagging, mnist):
    cfg, result = lagging
    model = open_target(result.run_dir).model
    x = normalizer(cfg)(make_splits(mnist, cfg).x_test[:200])
    reference = model(x, training=False).numpy()
    plain, folded_names, kept = standard_model(model, fold_bn=False)
    assert kept == ["conv1_bn", "conv2_bn", "dense1_bn"] and not folded_names
    assert not any(isinstance(layer, FusedBatchNorm) for layer in plain.layers)
    folded, folded_names, kept = standard_model(model, fold_bn=True)
    assert folded_names == ["conv1_bn", "conv2_bn", "dense1_bn"] and kept == []
    assert not any(isinstance(layer, (FusedBatchNorm, keras.layers.BatchNormalization)) for layer in folded.layers)
    for m in (plain, folded):
        assert np.abs(m(x, training=False).numpy() - reference).max() < 1e-4


def _graph_ops(saved_model_dir):
    loaded = tf.saved_model.load(str(saved_model_dir))
    graph = loaded.signatures["serving_default"].graph.as_graph_def()
    ops = {n.op for n in graph.node}
    for fn in graph.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


@pytest.mark.parametrize("fmt", ["keras", "savedmodel", "tflite"])
def test_each_export_format_loads_in_a_fresh_process_without_convbn(lagging, mnist, tmp_path, fmt):
    cfg, result = lagging
    r = export(result.run_dir, fmt, fold_bn=True, output=tmp_path / f"m.{fmt}", data=mnist)
    assert r["max_abs_logit_diff"] < 1e-4 and r["checked_images"] > 0
    pixels = make_splits(mnist, cfg).x_test[:32]
    x = tf.cast(pixels, tf.float32).numpy()  # exports take raw 0-255 pixels and normalize them themselves
    model = open_target(result.run_dir).model
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", model(normalizer(cfg)(pixels), training=False).numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np
        fmt, path, d = {fmt!r}, {str(r["path"])!r}, {str(tmp_path)!r}
        x = np.load(d + "/x.npy")
        if fmt == "keras":
            import keras
            got = keras.saving.load_model(path, safe_mode=True)(x, training=False).numpy()
        elif fmt == "savedmodel":
            import tensorflow as tf
            loaded = tf.saved_model.load(path)  # keep a reference: its variables live as long as it does
            got = loaded.serve(tf.constant(x)).numpy()
        else:
            import tensorflow as tf
            it = tf.lite.Interpreter(model_path=path)
            inp = it.get_input_details()[0]
            it.resize_tensor_input(inp["index"], x.shape)
            it.allocate_tensors()
            it.set_tensor(inp["index"], x)
            it.invoke()
            got = it.get_tensor(it.get_output_details()[0]["index"])
        assert not any(m.startswith("convbn") for m in sys.modules), "convbn was imported"
        print(float(np.abs(got - np.load(d + "/want.npy")).max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 1e-4


def test_folded_graph_has_no_bn_ops(lagging, mnist, tmp_path):
    _, result = lagging
    plain = export(result.run_dir, "savedmodel", output=tmp_path / "plain", data=mnist)
    folded = export(result.run_dir, "savedmodel", fold_bn=True, output=tmp_path / "folded", data=mnist)
    bn_ops = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "Rsqrt"}
    assert _graph_ops(plain["path"]) & bn_ops  # BN at inference: rsqrt(var + eps), then multiply and add
    assert not _graph_ops(folded["path"]) & bn_ops


def test_cli_recalibrate_and_export(lagging, mnist_cache, tmp_path):
    _, result = lagging
    runner = CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})
    r = runner.invoke(main, ["recalibrate", str(result.run_dir), "--batches", "10", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "accuracy: before" in r.stdout and "recalibrated/ckpt-" in r.stdout
    e = runner.invoke(main, ["export", str(result.run_dir), "--fold-bn", "--format", "keras"])
    assert e.exit_code == 0, e.output
    assert "folded into the preceding conv/dense: conv1_bn, conv2_bn, dense1_bn" in e.stdout
    exported = result.run_dir / "export" / "model-folded.keras"
    assert exported.is_file()
    from_export = runner.invoke(main, ["eval", str(exported), "--json"])
    from_ckpt = runner.invoke(main, ["eval", str(result.run_dir), "--json"])
    assert from_export.exit_code == 0, from_export.output
    assert json.loads(from_export.stdout)["accuracy"] == json.loads(from_ckpt.stdout)["accuracy"]
    bad = runner.invoke(main, ["export", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such run directory or checkpoint" in bad.output
