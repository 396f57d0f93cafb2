"""Issue 25, exports: `convbn export --format onnx` (tf2onnx, checked with onnxruntime like the other formats);
ONNX models and SavedModel directories are targets of eval and predict; every export carries its class names
and input contract, so a copy away from its run still predicts with names."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")


def stdout_json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_onnx_and_savedmodel_exports_are_targets_with_their_class_names(run_copy, cli, mnist, tmp_path):
    from convbn_cli.formats import runtime
    from convbn_cli.formats.catalog import format_of

    digits = []
    for i in range(6):
        Image.fromarray(mnist["x_test"][i]).save(tmp_path / f"d{i}.png")
        digits.append(tmp_path / f"d{i}.png")
    reference = stdout_json(cli("predict", run_copy, *digits, "--json", "--top-k", "3"))
    test_acc = stdout_json(cli("eval", run_copy, "--json"))["accuracy"]
    exports = {}
    for fmt, name in (("onnx", "model.onnx"), ("savedmodel", "model_savedmodel"), ("keras", "model.keras")):
        r = cli("export", run_copy, "--format", fmt)
        assert r.exit_code == 0 and f"wrote {run_copy / 'export' / name}" in r.output, r.output
        diff = float(r.output.split("max |logit difference| on 256 test images: ")[1].split()[0])
        assert diff <= 1e-4
        exports[fmt] = run_copy / "export" / name
    for fmt in ("onnx", "savedmodel"):
        assert stdout_json(cli("eval", exports[fmt], "--json"))["accuracy"] == pytest.approx(test_acc, abs=1e-9)
    for fmt, path in exports.items():
        away = tmp_path / "away" / path.name  # no run directory above it: the export says what it is
        away.parent.mkdir(exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy)(path, away)
        about = runtime.read(format_of(away), away).about  # what the file says, as its reader reads it
        assert about["class_names"] == [str(d) for d in range(10)] and about["input"] == "pixels", fmt
        got = stdout_json(cli("predict", away, *digits, "--json", "--top-k", "3"))
        assert got["class_names"] == reference["class_names"]
        for a, b in zip(got["predictions"], reference["predictions"]):
            assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]], fmt
            np.testing.assert_allclose([t["probability"] for t in a["top"]], [t["probability"] for t in b["top"]],
                                       atol=1e-5)


def test_inference_only_formats_are_refused_where_a_keras_model_is_needed(run_copy, cli):
    assert cli("export", run_copy, "--format", "onnx").exit_code == 0
    assert cli("export", run_copy, "--format", "savedmodel").exit_code == 0
    for target in (run_copy / "export" / "model.onnx", run_copy / "export" / "model_savedmodel"):
        r = cli("inspect-bn", target)
        # The ONNX export is read (ONNX models are inspect-bn targets) but its BN was folded into the convs: the
        # line says so and what to inspect instead; a SavedModel runs only in eval and predict.
        want = "exported from" if target.suffix == ".onnx" else "in eval and predict"
        assert r.exit_code == 2 and want in r.output and len(r.output.strip().splitlines()) == 1, r.output
