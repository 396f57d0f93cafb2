"""What a user of a training CLI expects around a run: built-in configs by name, an end-of-run summary, what the
run records about itself, early stopping that survives --resume, and pictures in the run directory."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import CONFIGS, assert_png_not_blank, quiet, tiny_raw  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.runs import RunDir  # noqa: E402
from convbn_cli.train import Interrupted, train  # noqa: E402

# --------------------------------------------------------------------------- built-in configs

def test_built_in_configs_work_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mnist_bn", ["train.epochs=1"])
    assert cfg.output.name == "mnist_bn" and cfg.train.epochs == 1
    runner = CliRunner()
    listing = runner.invoke(main, ["configs"])
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines()] == sorted(p.stem for p in CONFIGS)
    shown = runner.invoke(main, ["configs", "show", "seed_toy"])
    assert shown.exit_code == 0 and shown.output == (CONFIGS[0].parent / "seed_toy.yaml").read_text()
    bad = runner.invoke(main, ["configs", "show", "nope"])
    assert bad.exit_code == 2
    assert "no built-in config named 'nope' (there are: fashion_bn, folder_cnn, mnist_best, mnist_bn" in bad.output
    missing = runner.invoke(main, ["validate", "nope.yaml"])
    assert missing.exit_code == 2
    assert "built-in configs: fashion_bn, folder_cnn, mnist_best, mnist_bn, mnist_fast, seed_toy" in missing.output


def test_a_built_in_config_trains(tmp_path, monkeypatch, synthetic):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("seed_toy", ["train.epochs=1", "data.max_train=320", "data.max_test=64"])
    result = train(cfg, data=synthetic, log=quiet, progress=False)
    assert result.run_dir.resolve() == tmp_path / "runs" / "seed_toy" / "1"
    assert (result.run_dir / "results.json").is_file()


# --------------------------------------------------------------------------- summary, records, pictures

@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic):
    tmp = tmp_path_factory.mktemp("exp")
    lines = []
    result = train(load_config(raw=tiny_raw(tmp, **{"train.epochs": 3, "output.plots": True})), data=synthetic,
                   log=lines.append, progress=False, overrides=("train.epochs=3",))
    return result, lines


def test_the_end_of_a_run_says_what_happened_and_what_to_do_next(run):
    result, lines = run
    results = json.loads((result.run_dir / "results.json").read_text())
    best = max(reversed(result.metrics), key=lambda r: r["val_acc"])  # the later of equals
    assert results["best_epoch"] == best["epoch"] and results["best_val_acc"] == best["val_acc"]
    assert results["epochs_done"] == 3 and results["stopped_early"] is None
    text = "\n".join(lines)
    assert f"best epoch {best['epoch']}; final model {results['final_checkpoint']}: validation accuracy " \
           f"{results['val_acc']:.2%}" in text
    assert f"see {result.run_dir}: curves.png, confusion_matrix.png, train_batch.png, metrics.csv, run.json" in text
    assert f"next: convbn eval {result.run_dir} | convbn report {result.run_dir} | convbn inspect-bn " \
           f"{result.run_dir}" in text


def test_each_run_records_how_it_was_made(run):
    result, _ = run
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["overrides"] == ["train.epochs=3"]
    assert set(info["versions"]) == {"convbn", "tensorflow", "keras", "numpy", "python"}
    assert info["versions"]["tensorflow"] == tf.__version__ and info["machine"]["cores"] == os.cpu_count()
    assert info["machine"]["cpu"] and isinstance(info["machine"]["gpus"], list)
    assert info["git_commit"] is None or len(info["git_commit"].split("+")[0]) == 40


def test_curves_and_confusion_matrix_are_drawn(run, tmp_path):
    result, _ = run
    assert_png_not_blank(result.run_dir / "curves.png")
    assert_png_not_blank(result.run_dir / "confusion_matrix.png")
    assert_png_not_blank(result.run_dir / "train_batch.png")
    from convbn_cli.data.registry import FASHION_MNIST
    from convbn_cli.present.plots import confusion_matrix

    out = tmp_path / "fashion.png"
    confusion_matrix(np.eye(10, dtype=int) * 7, FASHION_MNIST.class_names, out, "class names")
    assert_png_not_blank(out)


def test_the_training_batch_picture_shows_the_first_batch_as_training_gives_it(tmp_path, synthetic, monkeypatch):
    """train_batch.png's images: the first batch of epoch 0 from the training pipeline itself, augmented, mapped
    back to pixels (also from standardized inputs), with its labels; drawn in grey or colour, any class names."""
    from convbn_cli.data import pipeline
    from convbn_cli.data.pipeline import make_splits, pixels_of, train_dataset
    from convbn_cli.present.plots import training_batch
    from convbn_cli.train import loop

    augment = {"shift": 0.1, "rotation": 10, "elastic": {"alpha": 34, "sigma": 4}}
    gathered = []  # how many images first_batch augments: one batch, not the epoch (it runs as a run starts)

    def counting(splits, cfg, loader=pipeline.batch_loader):
        load = loader(splits, cfg)
        # first_batch's calls: an array of indices (the training pipeline's, a symbolic tensor, are not counted)
        return lambda epoch, i, idx: (isinstance(idx, np.ndarray) and gathered.append(len(idx)), load(epoch, i, idx))[1]

    monkeypatch.setattr(pipeline, "batch_loader", counting)
    for normalize in ("scale", "standardize"):
        cfg = load_config(raw=tiny_raw(tmp_path, **{"data.augment": augment, "data.normalize": normalize}))
        trainer = loop.Trainer(cfg, None, [])
        trainer.splits, trainer.global_batch = make_splits(synthetic, cfg), cfg.data.batch_size
        pixels, labels = trainer.first_batch(count=12)
        images, want = next(iter(train_dataset(trainer.splits, cfg, epoch=0)))
        np.testing.assert_allclose(pixels, pixels_of(cfg)(images[:12]).numpy(), atol=1e-3)
        np.testing.assert_array_equal(labels, want[:12])
        assert pixels.shape == (12, 28, 28, 1) and -1 < pixels.min() and pixels.max() < 256
        order = np.asarray(trainer.splits.x_train, np.float32)[..., 0][np.asarray(
            loop.epoch_order(trainer.splits.size("train"), 32, cfg.train.seed, 0)[:12])]
        assert np.abs(pixels[..., 0] - order).mean() > 5  # augmented, not the stored images
        plain = loop.Trainer(load_config(raw=tiny_raw(tmp_path, **{"data.normalize": normalize})), None, [])
        plain.splits, plain.global_batch = trainer.splits, trainer.global_batch
        np.testing.assert_allclose(plain.first_batch(count=12)[0][..., 0], order, atol=1e-3)  # no augmentation
    assert gathered == [32] * 4
    colour = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3))
    training_batch(colour, [0, 1, 2, 1, 0], ["a class name longer than fourteen letters", "b", "c"],
                   tmp_path / "colour.png", where="colour")
    assert_png_not_blank(tmp_path / "colour.png", min_size=(100, 300))


def test_the_training_batch_picture_is_drawn_when_a_run_starts_not_when_it_resumes(tmp_path):
    """events.Plots: train_batch.png when training starts from the beginning (a run, or a --resume that found no
    checkpoint); a resumed run keeps the picture of its start (its first batch is that start's), and one resumed
    from before the picture existed does not name it at the end."""
    from types import SimpleNamespace

    from convbn_cli.train.events import Console, Plots

    cfg = load_config(raw=tiny_raw(tmp_path, **{"output.plots": True}))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1))
    lines = []
    for restored, name in ((None, "fresh"), ("ckpt-40", "resumed")):
        run = RunDir.create_at(tmp_path / name)
        trainer = SimpleNamespace(restored=restored, cfg=cfg, run=run, first_batch=lambda: (pixels, [0, 1, 2, 3]))
        Plots().on_start(trainer)
        assert (run.path / "train_batch.png").is_file() == (restored is None)
        # the end-of-run line names the pictures there are, and confusion_matrix.png, drawn right after it
        (run.path / "curves.png").write_bytes(b"")
        Console(lines.append).on_finish(trainer, {"test_loss": 0.1, "test_acc": 0.9, "checkpoint": "ckpt-40",
                                                  "final_checkpoint": "ckpt-40", "wall_time_s": 9.0,
                                                  "bn_statistics": {"mechanism": "none",
                                                                    "before": {"split": "val", "moving_acc": 0.9,
                                                                               "batch_acc": 0.9}}})
    assert_png_not_blank(tmp_path / "fresh" / "train_batch.png", min_size=(100, 300))
    seen = [line for line in lines if line.startswith("see ")]
    assert seen[0].endswith("fresh: curves.png, confusion_matrix.png, train_batch.png, metrics.csv, run.json")
    assert seen[1].endswith("resumed: curves.png, confusion_matrix.png, metrics.csv, run.json")


# --------------------------------------------------------------------------- early stopping

def _stopping(tmp_path, name):
    raw = tiny_raw(tmp_path, **{"train.epochs": 6, "output.name": name,
                                "train.early_stopping": {"metric": "val_loss", "patience": 1, "min_delta": 10.0}})
    return load_config(raw=raw)


def test_early_stopping_says_why_and_stays_stopped_on_resume(tmp_path, synthetic):
    lines = []
    first = train(_stopping(tmp_path, "es"), data=synthetic, log=lines.append, progress=False)
    assert [r["epoch"] for r in first.metrics] == [1, 2]  # no improvement of 10 in val_loss after epoch 1
    why = "early stopping: val_loss has not improved by more than 10 for 1 epoch (best"  # not "1 epochs"
    assert any(ln.startswith(why) for ln in lines)
    results = json.loads((first.run_dir / "results.json").read_text())
    assert results["stopped_early"].startswith(why) and results["epochs_done"] == 2
    again = train(_stopping(tmp_path, "es"), data=synthetic, resume=first.run_dir, log=quiet, progress=False)
    assert [r["epoch"] for r in RunDir(again.run_dir).read_metrics()] == [1, 2]  # nothing more was trained


def test_early_stopping_with_an_interruption_equals_an_uninterrupted_run(tmp_path, synthetic):
    straight = train(_stopping(tmp_path, "a"), data=synthetic, log=quiet, progress=False)

    def ctrl_c_at_step_20(step, model):
        if step == 20:  # in epoch 2 (16 steps an epoch)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        train(_stopping(tmp_path, "b"), data=synthetic, log=quiet, progress=False, on_step=ctrl_c_at_step_20)
    run_dir = os.path.dirname(os.path.dirname(e.value.checkpoint))
    resumed = train(_stopping(tmp_path, "b"), data=synthetic, resume=run_dir, log=quiet, progress=False)
    assert [r["epoch"] for r in RunDir(run_dir).read_metrics()] == [r["epoch"] for r in straight.metrics]
    for a, b in zip(straight.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_early_stopping_needs_a_validation_split(tmp_path):
    from convbn_cli.config import ConfigError

    with pytest.raises(ConfigError, match="train.early_stopping: needs a validation split"):
        load_config(raw=tiny_raw(tmp_path, **{"data.val_split": 0.0, "train.early_stopping": {"patience": 2}}))
