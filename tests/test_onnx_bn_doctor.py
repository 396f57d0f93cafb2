"""Issue 38, part 1 and 4: `diagnose`, `inspect-bn`, `recalibrate` and `export --fold-bn` on ONNX models, on a
corpus of 25 onnx.helper models (tests/onnx_corpus.py: healthy ones and one fault each) whose correct accuracy
on a synthetic dataset is known. Each diagnose is a fraction of a second, the corpus together ~15 s: slow tier.

PyTorch is not used: its CPU wheel (~200 MB from download.pytorch.org, more from PyPI with its CUDA
dependencies) does not fit CI's install time; the corpus is built as torch.onnx.export writes models (NCHW,
BatchNormalization nodes with initializers) and as tf2onnx does (NHWC input, Transposes around NCHW convs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnx_corpus import CORPUS, build, images, moments  # noqa: E402

from convbn_cli.analysis.diagnose import diagnose  # noqa: E402
from convbn_cli.analysis.inspection import inspect_bn  # noqa: E402
from convbn_cli.analysis.recalibration import recalibrate  # noqa: E402
from convbn_cli.errors import ConvbnError  # noqa: E402
from convbn_cli.export import export  # noqa: E402
from convbn_cli.present.reports import DiagnoseReport  # noqa: E402

pytestmark = pytest.mark.heavy  # 25 models diagnosed, recalibrated and folded: ~20 s, the slow tier (conftest.py)

BATCHES = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{name: (path, Net)} of every corpus model, and the data: data.npz, and shuffled.npz (other labels)."""
    d = tmp_path_factory.mktemp("onnx_corpus")
    x, y = images()
    np.savez(d / "data.npz", x=x, y=y)
    np.savez(d / "shuffled.npz", x=x, y=np.random.default_rng(1).permutation(y))
    models = {}
    for name in CORPUS:
        model, net = build(name, x, y)
        onnx.save(model, d / f"{name}.onnx")
        models[name] = (d / f"{name}.onnx", net)
    return d, models, (x, y)


def _diagnose(corpus, name):
    d, models, _ = corpus
    kw = dict(CORPUS[name][6])
    data = d / ("shuffled.npz" if kw.pop("shuffled", False) else "data.npz")
    return diagnose(str(models[name][0]), data=str(data), batches=BATCHES, **kw)


def test_every_fault_is_caught_by_its_check_and_no_healthy_model_is_warned(corpus):
    assert len(CORPUS) >= 20
    wrong = {}
    for name, spec in CORPUS.items():
        r = _diagnose(corpus, name)
        json.dumps(DiagnoseReport(r).to_json())  # the --json report of every model
        got = {f.name for f in r["findings"]}
        serious = {f.name for f in r["findings"] if f.severity != "info"}
        expected = spec[5]
        if expected and not expected <= got:
            wrong[name] = f"missed {expected - got}; found {got}"
        if not expected:
            verdict = DiagnoseReport(r).verdict()
            if serious or not verdict.startswith("verdict: BN looks healthy"):
                wrong[name] = f"healthy but warned: {serious} ({verdict})"
        assert r["kind"] == "onnx" and r["images"] == BATCHES * 128
    assert wrong == {}


def test_healthy_models_are_healthy_in_numpy_too(corpus):
    """The healthy models classify the synthetic images (their accuracy is measured, not assumed): NumPy and
    onnxruntime agree on their logits, and the diagnosis measures the same accuracy."""
    import onnxruntime as ort

    _, models, (x, y) = corpus
    for name in [n for n, spec in CORPUS.items() if not spec[5]]:
        path, net = models[name]
        xs = x[:256, None].astype(np.float64) / 255
        want = net.forward(xs)
        assert (want.argmax(1) == y[:256]).mean() > 0.95, name
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = xs if CORPUS[name][1] == "NCHW" else xs.transpose(0, 2, 3, 1)
        got = session.run(None, {"input": feed.astype(np.float32)})[0]
        np.testing.assert_allclose(got, want, atol=1e-3, err_msg=name)


def test_inspect_bn_reads_the_onnx_initializers(corpus):
    _, models, _ = corpus
    r = inspect_bn(str(models["shared_bn"][0]))
    assert len(r["layers"]) == 2  # the BN called twice is one layer
    net = models["shared_bn"][1]
    layer = r["layers"][list(r["layers"])[1]]
    np.testing.assert_allclose(layer["moving_variance"], net.p[4]["var"], rtol=1e-6)
    assert layer["impl"] == "onnx" and layer["channels"] == 6


def _numpy_precise_bn(net, x, batches):
    """The statistics precise BN gives, recomputed in NumPy: layer by layer, the mean over 128-image batches of
    each batch's mean and biased variance, the layers before already recomputed."""
    xs = [x[i:i + 128, None].astype(np.float64) / 255 for i in range(0, batches * 128, 128)]
    out = []
    for k, (kind, *_) in enumerate(net.plan):
        if kind == "bn":
            m, v = zip(*[moments(net.forward(b, k)) for b in xs])
            net.p[k]["mean"], net.p[k]["var"] = np.mean(m, 0), np.mean(v, 0)
            out.append((net.p[k]["mean"].copy(), net.p[k]["var"].copy()))
    return out


def test_recalibrate_raises_a_stale_models_accuracy_with_numpys_statistics(corpus):
    d, models, (x, _) = corpus
    path, net = models["stale"]
    r = recalibrate(str(path), batches=BATCHES, data_source=str(d / "data.npz"))
    out = d / "stale-recalibrated.onnx"
    assert r["checkpoint"] == str(out) and out.is_file()
    assert r["after"]["accuracy"] > r["before"]["accuracy"] + 0.2 and r["after"]["accuracy"] > 0.95
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    bns = [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]
    for node, (mean, var) in zip(bns, _numpy_precise_bn(net, x, BATCHES), strict=True):
        np.testing.assert_allclose(inits[node.input[3]], mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
        np.testing.assert_allclose(inits[node.input[4]], var, rtol=1e-5)
    with pytest.raises(ConvbnError, match="already exists; add --force"):
        recalibrate(str(path), batches=BATCHES, data_source=str(d / "data.npz"))
    with pytest.raises(ConvbnError, match="is the model being recalibrated"):
        recalibrate(str(path), batches=BATCHES, data_source=str(d / "data.npz"), output=str(path), force=True)
    assert recalibrate(str(path), batches=2, data_source=str(d / "data.npz"), force=True)["checkpoint"] == str(out)


def _logits(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name, folds", [
    ("cnn_nchw", 2), ("cnn_nhwc_tf2onnx", 2), ("mlp_gemm_bn", 1), ("matmul_bn", 1), ("cnn_gemm_bn", 2),
    ("conv_bias", 2), ("pool_then_bn_negative_gamma", 0), ("shared_bn", 1), ("wrong_axis", 0),
    ("transposes_between", 1), ("gemm_reshape_bn", 1)])
def test_fold_keeps_logits_and_never_folds_where_it_is_not_valid(corpus, name, folds):
    d, models, (x, _) = corpus
    path = models[name][0]
    out = d / f"{name}-folded-test.onnx"
    r = export(str(path), "onnx", fold_bn=True, output=str(out), data_source=str(d / "data.npz"))
    assert len(r["folded"]) == folds and r["max_abs_logit_diff"] < 1e-4
    xs = x[:200, None].astype(np.float32) / 255
    xs = xs if CORPUS[name][1] == "NCHW" else xs.transpose(0, 2, 3, 1)
    assert np.abs(_logits(out, xs) - _logits(path, xs)).max() < 1e-4
    left = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    before = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    assert left == before - folds  # each folded layer here has one node
    if name == "pool_then_bn_negative_gamma":
        assert "max-pool" in r["kept_why"][r["kept"][0]]
    if name == "shared_bn":  # the BN called after the same conv twice: that conv's weight is shared
        assert "shared" in next(iter(r["kept_why"].values()))


def test_export_refuses_to_fold_stale_statistics_and_names_recalibrate(corpus):
    d, models, _ = corpus
    path = models["stale_mlp"][0]
    with pytest.raises(ConvbnError, match="only works in training mode.*convbn recalibrate"):
        export(str(path), "onnx", fold_bn=True, data_source=str(d / "data.npz"))
    assert not (d / "stale_mlp-folded.onnx").exists()
    fixed = recalibrate(str(path), batches=BATCHES, data_source=str(d / "data.npz"))["checkpoint"]
    r = export(fixed, "onnx", fold_bn=True, data_source=str(d / "data.npz"))
    assert r["folded"] and r["max_abs_logit_diff"] < 1e-4


def test_the_commands_take_onnx_models_and_bad_input_is_one_line(corpus):
    from convbn_cli.cli import main

    d, models, _ = corpus
    runner = CliRunner()
    healthy, stale = models["cnn_nchw"][0], models["stale"][0]
    r = runner.invoke(main, ["diagnose", str(healthy), "--data", str(d / "data.npz"), "--batches", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["kind"] == "onnx"
    r = runner.invoke(main, ["diagnose", str(stale), "--data", str(d / "data.npz"), "--batches", "4"])
    assert r.exit_code == 4 and "inference_training_gap" in r.output
    r = runner.invoke(main, ["inspect-bn", str(healthy)])
    assert r.exit_code == 0 and "onnx" in r.output
    r = runner.invoke(main, ["diagnose", str(healthy)])  # no --data
    assert r.exit_code == 2 and "needs --data" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["export", str(healthy), "--fold-bn", "--data", str(d / "data.npz")])
    assert r.exit_code == 2 and "--format onnx" in r.output
    r = runner.invoke(main, ["recalibrate", str(healthy), "--data", str(d / "data.npz"), "--output",
                             str(d / "x.keras")])
    assert r.exit_code == 2 and "must end in .onnx" in r.output
