"""Issue 15, second part: quiet and consistent output, TensorBoard runs, predict on images, exports that take raw
pixels, sweeps, and the run listing and comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import run_cli, tiny_raw  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.train import train  # noqa: E402

NOISE = ("XNNPACK", "deprecated", "WARNING", "oneDNN", "cuda", "I0000", "W0000", "absl")


def run_copy(trained, tmp_path):
    return Path(shutil.copytree(trained[1].run_dir, tmp_path / "runs" / "tiny" / "1"))


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


def test_quiet_and_no_tensorflow_noise_on_resume_and_tflite(trained, tmp_path):
    run = run_copy(trained, tmp_path)
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


# --------------------------------------------------------------------------- exports take raw pixels

def _normalized(cfg, pixels):
    from convbn_cli.data.pipeline import normalizer

    return normalizer(cfg)(pixels[..., None]).numpy()


def test_an_export_fed_raw_pixels_agrees_with_eval(trained, mnist, tmp_path):
    import keras

    from convbn_cli.analysis import evaluate
    from convbn_cli.export import export
    from convbn_cli.runs.target import open_target

    cfg, result = trained
    run = run_copy(trained, tmp_path)
    pixels = mnist["x_test"][: cfg.data.max_test]
    want = open_target(run).predict(_normalized(cfg, pixels))
    r = export(run, "keras", fold_bn=True, output=tmp_path / "m.keras", data=mnist)
    assert r["input"].startswith("raw pixels 0-255, (N, 28, 28, 1) float32")
    plain = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)  # what a user without convbn does
    assert plain.inputs[0].name == "pixels"
    got = plain.predict(pixels[..., None].astype(np.float32), verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(plain(pixels.astype(np.float32)).numpy(), want, atol=1e-4)  # (N, 28, 28) too
    accuracy = float(np.mean(got.argmax(1) == mnist["y_test"][: len(got)]))
    assert accuracy == pytest.approx(evaluate(run, data=mnist)["accuracy"], abs=1e-9)
    # TFLite, run with TensorFlow's interpreter alone
    export(run, "tflite", output=tmp_path / "m.tflite", data=mnist)
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "m.tflite"))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], (100, 28, 28, 1))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels[:100, ..., None].astype(np.float32))
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), want[:100],
                               atol=1e-3)
    # --no-preprocessing keeps the old contract: normalized images in
    r = export(run, "keras", output=tmp_path / "n.keras", data=mnist, preprocessing=False)
    old = keras.saving.load_model(tmp_path / "n.keras", safe_mode=True)
    assert r["input"].startswith("normalized images") and old.inputs[0].name != "pixels"
    np.testing.assert_allclose(old.predict(_normalized(cfg, pixels), verbose=0), want, atol=1e-4)


def test_commands_open_a_raw_pixel_export_as_its_network(trained, mnist, tmp_path):
    import keras

    from convbn_cli.analysis import evaluate
    from convbn_cli.analysis.recalibration import recalibrate
    from convbn_cli.export import export

    run = run_copy(trained, tmp_path)
    export(run, "keras", output=run / "raw.keras", data=mnist)
    export(run, "tflite", output=run / "raw.tflite", data=mnist)
    want = evaluate(run, data=mnist)["accuracy"]
    assert evaluate(run / "raw.keras", data=mnist)["accuracy"] == pytest.approx(want, abs=1e-9)
    assert evaluate(run / "raw.tflite", data=mnist)["accuracy"] == pytest.approx(want, abs=1e-3)
    saved = recalibrate(run / "raw.keras", batches=2, data=mnist)["checkpoint"]
    assert keras.saving.load_model(saved, safe_mode=True).inputs[0].name == "pixels"  # still takes raw pixels
    again = export(run / "raw.keras", "keras", fold_bn=True, output=tmp_path / "again.keras", data=mnist)
    assert again["max_abs_logit_diff"] < 1e-4 and again["folded"]  # an export of an export normalizes once


# --------------------------------------------------------------------------- predict

def _predict(*args):
    result = CliRunner().invoke(main, ["predict", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["predictions"]


def test_predict_on_pictures_gives_what_the_model_gives_on_the_arrays(trained, mnist, tmp_path):
    from PIL import Image

    from convbn_cli.runs.target import open_target

    cfg, _ = trained
    run = run_copy(trained, tmp_path)
    pixels = mnist["x_test"][:12]
    want = open_target(run).predict(_normalized(cfg, pixels)).argmax(1)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(pictures / f"{i:02d}.png")
        Image.fromarray(255 - img).save(tmp_path / f"paper{i:02d}.png")  # dark strokes on light paper
    np.save(tmp_path / "x.npy", pixels)
    from_pngs = _predict(run, pictures)
    assert [p["input"] for p in from_pngs] == [str(pictures / f"{i:02d}.png") for i in range(12)]
    assert [p["top"][0]["class"] for p in from_pngs] == want.tolist()
    assert [p["top"][0]["class"] for p in _predict(run, tmp_path / "x.npy")] == want.tolist()
    inverted = _predict(run, *[tmp_path / f"paper{i:02d}.png" for i in range(12)])
    assert [p["top"][0]["class"] for p in inverted] == want.tolist()  # --invert auto saw the light border
    top3 = _predict(run, pictures / "00.png", "--top-k", "3")[0]["top"]
    assert len(top3) == 3 and top3[0]["probability"] >= top3[1]["probability"] >= top3[2]["probability"]
    assert top3[0]["name"] == str(top3[0]["class"])
    # an export that takes raw pixels, and a TFLite file, give the same answers
    CliRunner().invoke(main, ["export", str(run), "--format", "tflite", "--output", str(run / "m.tflite")])
    assert [p["top"][0]["class"] for p in _predict(run / "m.tflite", pictures)] == want.tolist()
    text = CliRunner().invoke(main, ["predict", str(run), str(pictures / "00.png")]).output
    assert text.startswith(f"{pictures / '00.png'}  {want[0]} (")


def test_predict_names_fashion_classes(tmp_path, synthetic):
    from convbn_cli.data.registry import FASHION_MNIST

    cfg = load_config(raw=tiny_raw(tmp_path, **{"data.dataset": "fashion_mnist", "train.epochs": 1}))
    result = train(cfg, data=synthetic, log=lambda m: None, progress=False)
    np.save(tmp_path / "x.npy", synthetic["x_test"][:3])
    preds = _predict(result.run_dir, tmp_path / "x.npy", "--top-k", "10")
    assert all(sorted(t["name"] for t in p["top"]) == sorted(FASHION_MNIST.class_names) for p in preds)


def test_predict_refuses_bad_inputs_in_one_line(trained, tmp_path):
    run = run_copy(trained, tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "fake.png").write_bytes(b"not a png")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 30, 30), np.uint8))
    empty = tmp_path / "empty"
    empty.mkdir()
    # a header that claims 10^9 images: refused from the header, before anything is allocated
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 28, 28), np.uint8))
    header["shape"] = (10**9, 28, 28)
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    cases = {tmp_path / "missing.png": "no such file or directory",
             tmp_path / "notes.txt": "not an image (.png, .jpg, .jpeg), array (.npy, .npz) or directory",
             tmp_path / "fake.png": "not a readable image",
             tmp_path / "wrong.npy": "shape (2, 30, 30); expected (N, 28, 28)",
             empty: "no PNG/JPG/JPEG images in this directory",
             tmp_path / "huge.npy": "is more than 1 GiB"}
    for path, message in cases.items():
        r = CliRunner().invoke(main, ["predict", str(run), str(path)])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (path, r.output)


# --------------------------------------------------------------------------- runs and runs compare

def assert_png_not_blank(path, min_size=(200, 300)):
    import matplotlib.image

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1] and img[..., :3].std() > 0.05


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, synthetic):
    tmp = tmp_path_factory.mktemp("three")
    settings = [{"model.bn.decay": 0.9}, {"model.bn.decay": 0.5}, {"model.bn.decay": 0.9, "train.epochs": 1}]
    results = [train(load_config(raw=tiny_raw(tmp, **s)), data=synthetic, log=lambda m: None, progress=False)
               for s in settings]
    return tmp / "runs", results


def test_runs_lists_every_run_with_what_sets_it_apart(three_runs, tmp_path):
    root, results = three_runs
    r = CliRunner().invoke(main, ["runs", str(root), "--json"])
    assert r.exit_code == 0, r.output
    listing = json.loads(r.output)
    assert [x["run"] for x in listing["runs"]] == ["tiny/1", "tiny/2", "tiny/3"]
    assert listing["differing_keys"] == ["model.bn.decay", "train.epochs"]
    for line, result in zip(listing["runs"], results):
        saved = json.loads((result.run_dir / "results.json").read_text())
        assert line["test_acc"] == saved["test_acc"] and line["best_val_acc"] == saved["best_val_acc"]
        assert line["epochs_done"] == len(result.metrics) and line["dataset"] == "mnist"
    assert listing["runs"][1]["differs"] == {"model.bn.decay": 0.5, "train.epochs": 2}
    text = CliRunner().invoke(main, ["runs", str(root)]).output.splitlines()
    assert text[0].split() == ["run", "date", "(UTC)", "dataset", "epochs", "best", "val", "test", "time", "differs"]
    assert text[3].startswith("tiny/2") and "model.bn.decay=0.5 train.epochs=2" in text[3]
    assert f"{results[1].test_acc:.2%}" in text[3]
    # an unfinished run (no results.json yet) is listed as such; the default ROOT is ./runs
    unfinished = tmp_path / "runs" / "x" / "1"
    shutil.copytree(results[0].run_dir, unfinished)
    (unfinished / "results.json").unlink()
    import os

    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(main, ["runs"])
    finally:
        os.chdir("/")
    assert r.exit_code == 0 and "x/1" in r.output and "unfinished" in r.output
    assert CliRunner().invoke(main, ["runs", str(tmp_path / "nope")]).exit_code == 2


def test_runs_compare_shows_differences_and_overlays_curves(three_runs, tmp_path, monkeypatch):
    root, results = three_runs
    monkeypatch.chdir(tmp_path)
    a, b = results[0].run_dir, results[1].run_dir
    r = CliRunner().invoke(main, ["runs", "compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[2].split() == ["model.bn.decay", "0.9", "0.5"] and "curves: compare-1.png" in r.output
    assert_png_not_blank(tmp_path / "compare-1.png")
    again = CliRunner().invoke(main, ["runs", "compare", str(a), str(b), "--json"])
    assert json.loads(again.output)["plot"] == "compare-2.png"  # never over the earlier picture
    refused = CliRunner().invoke(main, ["runs", "compare", str(a), str(b), "--plot", "compare-1.png"])
    assert refused.exit_code == 2 and "add --force" in refused.output
    assert CliRunner().invoke(main, ["runs", "compare", str(a)]).exit_code == 2
    bad = CliRunner().invoke(main, ["runs", "compare", str(a), str(tmp_path)])
    assert bad.exit_code == 2 and "config.yaml is missing" in bad.output


# --------------------------------------------------------------------------- sweep

def test_sweep_validates_every_combination_before_training(tmp_path):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    r = CliRunner().invoke(main, ["sweep", str(config), "model.bn.decay=0.9,1.5", "train.epochs=0,1"])
    assert r.exit_code == 2
    assert "model.bn.decay=1.5,train.epochs=1: model.bn.decay: must be" in r.output
    assert "model.bn.decay=0.9,train.epochs=0: train.epochs" in r.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_sweep_of_2x2_survives_an_interruption(mnist_cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path, **{"data.max_train": 800, "data.max_test": 200,
                                                            "train.epochs": 1})))
    args = [sys.executable, "-m", "convbn_cli", "sweep", str(config), "model.bn.decay=0.5,0.99",
            "train.label_smoothing=0.0,0.1", "--no-progress"]
    sweep_dir = tmp_path / "runs" / "tiny" / "sweep-1"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(sweep_dir.glob("*/results.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # during the second combination (or right after the first)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"convbn sweep --resume {sweep_dir}" in err
    first = sweep_dir / "model.bn.decay=0.5,train.label_smoothing=0.0" / "results.json"
    done_at = first.stat().st_mtime_ns
    resumed = run_cli("sweep", "--resume", sweep_dir, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "[1/4] model.bn.decay=0.5,train.label_smoothing=0.0: done already" in resumed.stdout
    assert first.stat().st_mtime_ns == done_at  # a finished combination is not trained again
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [(r["model.bn.decay"], r["train.label_smoothing"]) for r in summary["rows"]] == [
        ("0.5", "0.0"), ("0.5", "0.1"), ("0.99", "0.0"), ("0.99", "0.1")]
    for row in summary["rows"]:
        name = f"model.bn.decay={row['model.bn.decay']},train.label_smoothing={row['train.label_smoothing']}"
        saved = json.loads((sweep_dir / name / "results.json").read_text())
        assert row["seeds_done"] == 1 and row["test_acc_mean"] == saved["test_acc"]
        assert row["bn_gap_mean"] == saved["inference_gap"]["gap"]
        assert load_config(sweep_dir / name / "config.yaml").model.bn.decay == float(row["model.bn.decay"])
    csv_rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("model.bn.decay,train.label_smoothing,seeds_done,seeds,test_acc_mean") \
        and len(csv_rows) == 5
    assert_png_not_blank(sweep_dir / "summary.png")
    assert "written: " in resumed.stdout and "BN gap (batch - moving)" in resumed.stdout


def test_sweep_seeds_give_mean_and_spread(tmp_path, synthetic, monkeypatch):
    from convbn_cli.train import sweep as sw

    raw = tiny_raw(tmp_path, **{"train.epochs": 1})
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    planned = sw.plan(config, ["model.bn.decay=0.5,0.9"], seeds=2)
    assert [r["name"] for r in planned["runs"]] == ["model.bn.decay=0.5,seed=1", "model.bn.decay=0.5,seed=2",
                                                   "model.bn.decay=0.9,seed=1", "model.bn.decay=0.9,seed=2"]
    path = sw.create(planned)
    import convbn_cli.data.sources as sources

    monkeypatch.setattr(sources, "fetch", lambda *a, **k: synthetic)  # where convbn_cli.data's lazy name leads
    summary = sw.run_sweep(path, log=lambda m: None, progress=False)
    row = summary["rows"][0]
    accs = [json.loads((path / f"model.bn.decay=0.5,seed={s}" / "results.json").read_text())["test_acc"]
            for s in (1, 2)]
    assert row["seeds_done"] == 2 and row["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))


def test_listing_comparing_and_planning_need_no_tensorflow(three_runs, tmp_path):
    import subprocess
    import sys

    root, results = three_runs
    code = ("import sys; from click.testing import CliRunner; from convbn_cli.cli import main; "
            "r = CliRunner().invoke(main, ['runs', sys.argv[1]]); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['runs', 'compare', sys.argv[2], sys.argv[3], '--plot', sys.argv[4]]); "
            "assert r.exit_code == 0, r.output; "
            "from convbn_cli.train import sweep; import convbn_cli.present.plots; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(results[0].run_dir), str(results[1].run_dir),
                          str(tmp_path / "c.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_analysis_names_are_the_functions_whatever_was_imported_first():
    import convbn_cli.analysis.evaluation  # noqa: F401  (a submodule import must not shadow the function)
    import convbn_cli.analysis.recalibration  # noqa: F401
    from convbn_cli.analysis import evaluate, recalibrate

    assert callable(evaluate) and callable(recalibrate)
