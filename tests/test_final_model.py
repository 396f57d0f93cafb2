"""The run's final model (train/final.py): BN statistics that do not lag at any training length, and an end-of-run
summary whose test accuracy is that of the model `convbn eval RUN` opens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import REPO, tiny_raw  # noqa: E402
from convbn_cli.analysis import inspect_bn  # noqa: E402
from convbn_cli.analysis.diagnose import diagnose  # noqa: E402  (the package's lazy name is shadowed by the module)
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.data.pipeline import calibration_batches, eval_dataset, make_splits  # noqa: E402
from convbn_cli.model import Evaluator, bn_layers, build_model, recalibrate_model  # noqa: E402
from convbn_cli.runs.target import open_target  # noqa: E402
from convbn_cli.train import train  # noqa: E402

SMALL_NET = [{"type": "conv", "filters": 8, "kernel": 3}, {"type": "pool"},
             {"type": "conv", "filters": 16, "kernel": 3}, {"type": "pool"}, {"type": "flatten"},
             {"type": "dense", "units": 32, "activation": "relu", "bn": True},
             {"type": "dense", "units": 10}]  # mnist_bn's shape, smaller: BN after every conv and the hidden dense


def short_run(tmp_path, mnist, lines=None, on_step=None, **over):
    """One epoch of a small conv-BN net on 2,000 real MNIST images (50 steps), tested on 1,000."""
    raw = tiny_raw(tmp_path, **{"data.max_train": 2000, "data.max_test": 1000, "train.epochs": 1,
                                "model.layers": SMALL_NET, **over})
    cfg = load_config(raw=raw)
    log = lines.append if lines is not None else (lambda m: None)
    return cfg, train(cfg, data=mnist, log=log, progress=False, on_step=on_step, warn=log)


def results_of(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def batch_statistics_accuracy(prefix, cfg, mnist) -> float:
    """Test accuracy of the model at `prefix` with each batch's own BN statistics (independent of the moving ones)."""
    model = open_target(prefix).model
    splits = make_splits(mnist, cfg)
    evaluator = Evaluator(model, cfg.dataset.num_classes, "batch")
    return evaluator(eval_dataset(splits, cfg, "test", cfg.data.batch_size))["accuracy"]


def eval_json(run_dir, monkeypatch, mnist_cache) -> dict:
    monkeypatch.setenv("CONVBN_DATA_DIR", str(mnist_cache))
    out = CliRunner().invoke(main, ["eval", str(run_dir), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- short runs end right

@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_a_short_run_ends_at_the_accuracy_its_weights_have(tmp_path, mnist, decay):
    """Issue 22's first experiment, smaller: after one short epoch the test accuracy is within 2 points of what
    the same weights give with each batch's own statistics; with TF1's 0.999 the statistics lagged (measured
    before precise BN) and precise BN was what closed the gap."""
    cfg, result = short_run(tmp_path, mnist, **{"model.bn": {"decay": decay}})
    res = results_of(result.run_dir)
    bn = res["bn_statistics"]
    reference = batch_statistics_accuracy(result.run_dir / res["final_checkpoint"], cfg, mnist)
    assert reference > 0.5  # the weights did learn
    assert not (result.run_dir / "curves.png").exists()  # tiny_raw's output.plots: false
    assert abs(res["test_acc"] - reference) <= 0.02
    if decay == 0.999:
        assert bn["before"]["moving_acc"] < bn["before"]["batch_acc"] - 0.2  # the lag was real ...
        assert bn["mechanism"] == "precise_bn" and bn["kept"] and bn["trigger"] == "train.precise_bn: auto"
        assert res["final_checkpoint"].startswith("checkpoints/recalibrated/")
        assert res["before_precise_bn"]["test_acc"] < reference - 0.2  # ... and what the user saw before
        # diagnose, which the summary suggests next, judges the statistics precise BN computed, not the decay
        names = [f.name for f in diagnose(result.run_dir, batches=5)["findings"]]
        assert "decay_too_slow" not in names and "inference_training_gap" not in names, names
    assert res["inference_gap"]["gap"] <= res["inference_gap"]["noise"]


def test_without_precise_bn_the_lag_stays_and_is_warned_even_under_quiet(tmp_path, mnist, mnist_cache, monkeypatch):
    raw = tiny_raw(tmp_path, **{"data.max_train": 2000, "data.max_test": 500, "train.epochs": 1,
                                "model.bn": {"decay": 0.999}, "train.precise_bn": "off"})
    config = tmp_path / "lagging.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CONVBN_DATA_DIR", str(mnist_cache))
    out = CliRunner().invoke(main, ["-q", "train", str(config)])
    assert out.exit_code == 0, out.output
    run = tmp_path / "runs" / "tiny" / "1"
    res = results_of(run)
    assert out.stdout == f"{run}: test accuracy {res['test_acc']:.2%}\n"  # -q: the one line ...
    warning = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "with the moving BN statistics but" in warning[0]  # ... and the BN warning
    assert res["bn_statistics"]["mechanism"] == "none" and res["final_checkpoint"].startswith("checkpoints/best/")


# --------------------------------------------------------------------------- the summary is what eval opens

def _sabotage_after(steps):
    """An on_step callback that zeroes the classifier from step `steps` on: later epochs validate at chance, so
    the best epoch is an earlier one."""

    def hook(step, model):
        if step > steps:
            dense = model.get_layer("dense1")
            dense.kernel.assign(tf.zeros_like(dense.kernel))

    return hook


CASES = {
    "precise_bn": dict(over={"train.precise_bn": {"batches": 200}}),
    "ema": dict(over={"train.ema": {"decay": 0.9}, "train.precise_bn": {"batches": 20}}),
    "best_not_last": dict(over={"train.epochs": 2, "model.bn": {"decay": 0.9}}, sabotage=True),
    "early_stopping": dict(over={"train.epochs": 4, "model.bn": {"decay": 0.9},
                                 "train.early_stopping": {"patience": 1}}, sabotage=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_summary_reports_the_model_eval_opens(tmp_path, mnist, mnist_cache, monkeypatch, case):
    spec, lines = CASES[case], []
    hook = _sabotage_after(50) if spec.get("sabotage") else None  # 50 steps an epoch
    cfg, result = short_run(tmp_path, mnist, lines, on_step=hook, **spec["over"])
    res = results_of(result.run_dir)
    shown = eval_json(result.run_dir, monkeypatch, mnist_cache)
    assert shown["checkpoint"] == str(result.run_dir / res["final_checkpoint"]) == res["checkpoint"]
    assert shown["accuracy"] == res["test_acc"] == result.test_acc
    assert inspect_bn(result.run_dir)["checkpoint"] == res["checkpoint"]  # every command opens the one resolver's
    summary = [line for line in lines if line.startswith("best epoch")]
    moving = res["best_val_acc_moving"]
    # the EMA's final model is no epoch's weights: no epoch's moving-statistics figure beside it
    beside = ("" if case == "ema" or abs(moving - res["val_acc"]) < 5e-5
              else f" (with the moving BN statistics: {moving:.2%})")
    assert summary == [f"best epoch {res['best_epoch']}; final model {res['final_checkpoint']}: validation "
                       f"accuracy {res['val_acc']:.2%}{beside}, test accuracy {res['test_acc']:.2%}; "
                       f"{res['wall_time_s']:.0f} s"]
    if case == "precise_bn":  # the batches actually averaged: 1,600 training images make 50 batches of 32
        assert res["bn_statistics"]["batches"] == 50 and res["bn_statistics"]["trigger"] == "train.precise_bn: always"
        assert any("over 50 training batches" in line for line in lines)
    if case == "ema":
        assert res["final_checkpoint"].startswith("checkpoints/ema/") and res["bn_statistics"]["batches"] == 20
    if spec.get("sabotage"):
        assert res["best_epoch"] == 1 < res["epochs_done"]
        assert res["final_checkpoint"] in ("checkpoints/best/ckpt-50", "checkpoints/recalibrated/ckpt-1")
        assert res["test_acc"] > 0.5  # the sabotaged last weights would be at chance
        if case == "early_stopping":
            assert res["stopped_early"] and res["epochs_done"] == 2


def test_recalibrate_reports_the_batches_it_used(run_copy, mnist):
    from convbn_cli.analysis import recalibrate
    from convbn_cli.present.reports import RecalibrateReport

    out = recalibrate(run_copy, batches=200, data=mnist)  # a copy: the shared run must keep no recalibrated one
    assert out["batches"] == 50  # 1,600 training images in batches of 32, not the 200 asked for
    assert "over 50 batches" in RecalibrateReport(out).render()


# --------------------------------------------------------------------------- mixed precision: measured in float32

@pytest.mark.parametrize("mechanism", ["precise_bn", "ema"])
def test_under_bfloat16_the_final_statistics_are_those_of_the_float32_model(tmp_path, mnist, mechanism):
    """Recalibrating the saved final model once more, in float32 over the same batches, changes nothing: the
    trainer measured the float32 model (a bfloat16 measurement is ~5e-3 off)."""
    extra = {"train.ema": {"decay": 0.9}} if mechanism == "ema" else {}
    cfg, result = short_run(tmp_path, mnist, **{"train.precision": "mixed_bfloat16",
                                                "train.precise_bn": {"batches": 8}, **extra})
    res = results_of(result.run_dir)
    assert res["bn_statistics"]["mechanism"] == mechanism and res["bn_statistics"]["kept"]
    model = open_target(result.run_dir).model  # float32, as eval builds it
    saved = [(v.numpy().copy()) for layer in bn_layers(model) for v in (layer.moving_mean, layer.moving_variance)]
    recalibrate_model(model, calibration_batches(make_splits(mnist, cfg), cfg, 8))
    again = [v.numpy() for layer in bn_layers(model) for v in (layer.moving_mean, layer.moving_variance)]
    for a, b in zip(saved, again):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- decay keeps its TF1 meaning

def test_seed_toy_bn_updates_its_moving_statistics_exactly_as_tf1(tmp_path):
    """configs/seed_toy.yaml's BN (decay 0.9, epsilon 1e-5) after three training calls on a toy batch: the moving
    statistics are TF1's moving = decay * moving + (1 - decay) * batch statistic, from mean 0 and variance 1, with
    no warm-up of the decay."""
    cfg = load_config(REPO / "configs" / "seed_toy.yaml")
    model = build_model(cfg)
    bn = model.get_layer("conv1_bn")
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
    rng = np.random.default_rng(0)
    mean, var = np.zeros(32), np.ones(32)
    for _ in range(3):
        h = rng.normal(2.0, 3.0, (4, 24, 24, 32)).astype(np.float32)  # a conv output: batch, height, width, channel
        out = bn(h, training=True).numpy()
        mean = 0.9 * mean + 0.1 * h.mean(axis=(0, 1, 2), dtype=np.float64)
        var = 0.9 * var + 0.1 * h.var(axis=(0, 1, 2), dtype=np.float64)
        expected = (h - h.mean(axis=(0, 1, 2))) / np.sqrt(h.var(axis=(0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(out, expected, atol=2e-4)  # gamma 1, beta 0: the batch's own statistics
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-5)


# --------------------------------------------------------------------------- users' own callbacks

def test_users_subscribe_their_own_callbacks_to_the_trainer(tmp_path, synthetic):
    class Recorder:  # no base class needed: only the methods it has are called
        def __init__(self):
            self.events = []

        def on_epoch_end(self, trainer, row):
            self.events.append(("epoch", row["epoch"], round(trainer.model.count_params())))

        def on_finish(self, trainer, results):
            self.events.append(("finish", results["final_checkpoint"]))

    recorder = Recorder()
    cfg = load_config(raw=tiny_raw(tmp_path))
    result = train(cfg, data=synthetic, log=lambda m: None, progress=False, subscribers=[recorder])
    params = result.model.count_params()
    assert recorder.events == [("epoch", 1, params), ("epoch", 2, params),
                               ("finish", results_of(result.run_dir)["final_checkpoint"])]
