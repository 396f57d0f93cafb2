"""Exports take raw 0-255 pixels and every command opens them as their network; predict on pictures and arrays
gives what the model gives on the arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import tiny_raw  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.train import train  # noqa: E402

# --------------------------------------------------------------------------- exports take raw pixels

def _normalized(cfg, pixels):
    from convbn_cli.data.pipeline import normalizer

    return normalizer(cfg)(pixels[..., None]).numpy()


def test_an_export_fed_raw_pixels_agrees_with_eval(run_copy, trained, mnist, tmp_path):
    import keras

    from convbn_cli.analysis import evaluate
    from convbn_cli.export import export
    from convbn_cli.runs.target import open_target

    cfg, result = trained
    run = run_copy
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


def test_commands_open_a_raw_pixel_export_as_its_network(run_copy, trained, mnist, tmp_path):
    import keras

    from convbn_cli.analysis import evaluate
    from convbn_cli.analysis.recalibration import recalibrate
    from convbn_cli.export import export

    run = run_copy
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


def test_predict_on_pictures_gives_what_the_model_gives_on_the_arrays(run_copy, trained, mnist, tmp_path):
    from PIL import Image

    from convbn_cli.runs.target import open_target

    cfg, _ = trained
    run = run_copy
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
    text = CliRunner().invoke(main, ["predict", str(run), str(pictures / "00.png"), "--uncertain-below", "0"]).output
    assert text.startswith(f"{pictures / '00.png'}  {want[0]} (")
    # this tiny model is never sure (its top probabilities are 10-40%): by default it says so
    text = CliRunner().invoke(main, ["predict", str(run), str(pictures / "00.png")]).output
    assert text.startswith(f"{pictures / '00.png'}  uncertain: {want[0]} (")


def test_predict_names_fashion_classes(tmp_path, synthetic):
    from convbn_cli.data.registry import FASHION_MNIST

    cfg = load_config(raw=tiny_raw(tmp_path, **{"data.dataset": "fashion_mnist", "train.epochs": 1}))
    result = train(cfg, data=synthetic, log=lambda m: None, progress=False)
    np.save(tmp_path / "x.npy", synthetic["x_test"][:3])
    preds = _predict(result.run_dir, tmp_path / "x.npy", "--top-k", "10")
    assert all(sorted(t["name"] for t in p["top"]) == sorted(FASHION_MNIST.class_names) for p in preds)


def test_predict_refuses_bad_inputs_in_one_line(run_copy, trained, tmp_path):
    run = run_copy
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
             tmp_path / "notes.txt": "not an image (.png, .jpg, .jpeg), array (.npy, .npz), CSV of pixels or "
                                     "directory",
             tmp_path / "wrong.npy": "shape (2, 30, 30); expected (N, 28, 28)",
             empty: "no PNG/JPG/JPEG images in this directory",
             tmp_path / "huge.npy": "is more than 10,000 images"}
    for path, message in cases.items():
        r = CliRunner().invoke(main, ["predict", str(run), str(path)])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (path, r.output)
    # a picture that cannot be read is not bad usage: reported in one line, and the exit code says some failed
    r = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "fake.png")])
    assert r.exit_code == 1 and r.output == f"error: {tmp_path / 'fake.png'}: not a readable image (not a PNG or " \
        "JPEG, or damaged at its start)\n", r.output
