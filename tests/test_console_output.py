"""What a run prints: the training loss labelled with label smoothing and the plain cross-entropy beside it,
and --quiet output free of TensorFlow's noise (resume, TFLite)."""

from __future__ import annotations

import json

import pytest

tf = pytest.importorskip("tensorflow")

from conftest import run_cli, tiny_raw  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.train import train  # noqa: E402

NOISE = ("XNNPACK", "deprecated", "WARNING", "oneDNN", "cuda", "I0000", "W0000", "absl")


# --------------------------------------------------------------------------- output

def test_label_smoothing_is_labelled_and_the_plain_cross_entropy_logged(tmp_path, synthetic):
    lines = []
    cfg = load_config(raw=tiny_raw(tmp_path, **{"train.label_smoothing": 0.2, "train.epochs": 1,
                                                  "output.log_every_steps": 5}))
    result = train(cfg, data=synthetic, log=lines.append, progress=False)
    row = result.metrics[0]
    # smoothing adds a floor to the minimized loss: the plain cross-entropy is below it
    assert 0 < row["train_ce"] < row["train_loss"]
    epoch_line = next(line for line in lines if line.startswith("epoch 1/1"))
    assert (f"train loss {row['train_loss']:.4f} (with label smoothing 0.2; cross-entropy {row['train_ce']:.4f}) "
            f"acc {row['train_acc']:.2%}") in epoch_line
    assert f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}," in epoch_line  # two decimals
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train_ce" in header
    tags = set()
    for f in (result.run_dir / "tensorboard" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            tags.update(v.tag for v in event.summary.value)
    assert {"step/cross_entropy", "epoch/loss_with_label_smoothing", "epoch/loss"} <= tags


def test_without_label_smoothing_the_cross_entropy_is_the_loss(trained):
    row = trained[1].metrics[-1]
    assert row["train_ce"] == row["train_loss"]


def test_quiet_and_no_tensorflow_noise_on_resume_and_tflite(run_copy, trained, tmp_path):
    run = run_copy
    tflite = run / "m.tflite"
    exported = run_cli("export", run, "--format", "tflite", "--fold-bn", "--output", tflite)
    assert exported.returncode == 0, exported.stderr
    assert not any(n in exported.stderr for n in NOISE), exported.stderr
    assert "wrote" in exported.stdout
    quiet_eval = run_cli("--quiet", "eval", tflite)
    assert quiet_eval.returncode == 0 and quiet_eval.stderr == "", quiet_eval.stderr
    assert "accuracy" in quiet_eval.stdout
    resumed = run_cli("--quiet", "train", "--resume", run, "train.epochs=3")
    # the fixture lags on purpose (precise BN off): under --quiet its BN warning is the one line on stderr
    assert resumed.returncode == 0 and resumed.stderr.startswith("warning: validation accuracy is "), resumed.stderr
    assert len(resumed.stderr.splitlines()) == 1, resumed.stderr
    acc = json.loads((run / "results.json").read_text())["test_acc"]
    assert resumed.stdout == f"{run}: test accuracy {acc:.2%}\n"
    loud = run_cli("train", "--resume", run, "train.epochs=4", "--no-progress")
    assert loud.returncode == 0 and not any(n in loud.stderr + loud.stdout for n in NOISE), loud.stderr
    assert "epoch 4/4" in loud.stdout
    assert run_cli("--quiet", "--verbose", "configs").returncode == 2
