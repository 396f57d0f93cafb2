"""Issue 38, part 1 and 4: `diagnose`, `inspect-bn`, `recalibrate` and `export --fold-bn` on ONNX models, on a
corpus of 33 onnx.helper models (tests/onnx_corpus.py: healthy ones and one fault each) whose correct accuracy
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

pytestmark = pytest.mark.heavy  # 33 models diagnosed, recalibrated and folded: ~30 s, the slow tier (conftest.py)

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


# --------------------------------------------------------------------------- issue 38's new checks on ONNX models

def _found(r, name):
    return [f for f in r["findings"] if f.name == name]


def test_batch_dependent_predictions_on_onnx_names_the_training_mode_node_and_the_reductions(corpus):
    healthy = _diagnose(corpus, "cnn_nchw")
    assert not _found(healthy, "batch_dependent_predictions") and "batch_dependence" in healthy["passed"]
    r = _diagnose(corpus, "training_mode_export")
    (f,) = _found(r, "batch_dependent_predictions")
    assert f.severity == "error" and f.layers == ["bn_7"] and "bn_7" in f.message and "model.eval()" in f.fix
    assert f.evidence["accuracy_with_running_statistics"] > 0.95  # the running statistics it holds, measured
    (f,) = _found(_diagnose(corpus, "reduce_mean_bn"), "batch_dependent_predictions")
    assert f.layers == f.evidence["nodes"] and len(f.layers) == 2 and all("reducemean" in n for n in f.layers)


def test_decay_too_fast_on_onnx_reads_the_momentum_attribute(corpus):
    (f,) = _found(_diagnose(corpus, "momentum_ported_wrong"), "decay_too_fast")
    assert f.evidence["decay"] == pytest.approx(0.1) and f.evidence["pytorch_momentum"] == pytest.approx(0.9)
    assert "nn.BatchNorm2d(momentum=0.01 to 0.1)" in f.fix
    # a momentum of 0.1 whose statistics measure as precise BN's: the decay alone is no fault
    r = _diagnose(corpus, "momentum_fast_statistics_precise")
    assert not _found(r, "decay_too_fast") and "decay_too_fast" in r["passed"]
    r = _diagnose(corpus, "momentum_absent")  # the same noisy statistics, but no momentum attribute: not judged
    assert not _found(r, "decay_too_fast") and "no momentum attribute" in r["not_applied"]["decay_too_fast"]
    assert _diagnose(corpus, "cnn_nchw")["not_applied"] == {}


def test_layer_order_on_onnx_reports_what_the_graph_shows(corpus):
    assert not _found(_diagnose(corpus, "cnn_nchw"), "layer_order")
    (f,) = _found(_diagnose(corpus, "relu_before_bn"), "layer_order")
    assert f.severity == "info" and f.layers == ["bn_8"] and f.evidence["order"]["bn_8"]["after_activation"]
    (f,) = _found(_diagnose(corpus, "dropout_before_bn"), "layer_order")
    assert "dropout" in f.message and f.evidence["dropout_nodes_in_graph"]


def test_epsilon_dominates_on_onnx_is_measured(corpus):
    found = _found(_diagnose(corpus, "tiny_variance_big_epsilon"), "epsilon_dominates")
    assert found and all(f.evidence["lower_epsilon"]["material"] for f in found)
    # two of six channels constant (variance 0, below epsilon): a lower epsilon changes nothing there
    _, models, _ = corpus
    from convbn_cli.analysis.onnx_graph import open_onnx

    bn = open_onnx(models["constant_channels_epsilon"][0]).bns[0]
    assert (bn.moving_variance.numpy() <= bn.epsilon).mean() > 0.25
    assert not _found(_diagnose(corpus, "constant_channels_epsilon"), "epsilon_dominates")


def test_workers_disagree_on_onnx_workers(corpus):
    from onnx_corpus import workers

    from convbn_cli.cli import main

    d, _, (x, y) = corpus
    for name, model in zip(("w1", "w2"), workers(x, y)):
        onnx.save(model, d / f"{name}.onnx")
    onnx.save(workers(x, y, apart=False)[1], d / "w_same.onnx")
    onnx.save(workers(x, y, seed=40, apart=False)[1], d / "w_other.onnx")
    run = dict(data=str(d / "data.npz"), batches=BATCHES)
    r = diagnose(str(d / "w1.onnx"), workers=[str(d / "w2.onnx")], **run)
    (f,) = _found(r, "workers_disagree")
    assert r["workers"] == [str(d / "w2.onnx")] and f.layers and "SyncBatchNorm" in f.fix
    assert set(f.evidence["accuracy_by_worker"]) == {str(d / "w1.onnx"), str(d / "w2.onnx")}
    r = diagnose(str(d / "w1.onnx"), workers=[str(d / "w_same.onnx")], **run)
    assert not _found(r, "workers_disagree") and "workers" in r["passed"]
    (f,) = _found(diagnose(str(d / "w1.onnx"), workers=[str(d / "w_other.onnx")], **run), "workers_disagree")
    assert f.severity == "error" and "weights differ" in f.message
    r = CliRunner().invoke(main, ["diagnose", str(d / "w1.onnx"), str(d / "relu_before_bn.onnx"), "--data",
                                  str(d / "data.npz")])
    assert r.exit_code == 2 and "not workers of one model" in r.output and "Traceback" not in r.output


def test_the_gap_fixs_decay_advice_on_onnx_only_where_the_momentum_is_known(corpus):
    """_gap_fix's decay advice on an ONNX model: checked (decay_checked, through the ONNX context) where the nodes
    carry a momentum, and the recalibrate-first advice alone where they do not."""
    from onnx_corpus import CNN, Net, _momentum, _stale, to_onnx

    d, _, (x, y) = corpus
    for momentum in (0.5, None):
        net = _momentum(momentum)(_stale(Net(CNN, seed=11).fit(x[:, None] / 255.0, y)))
        onnx.save(to_onnx(net), d / f"gap_{momentum}.onnx")
        (f,) = _found(diagnose(str(d / f"gap_{momentum}.onnx"), data=str(d / "data.npz"), batches=BATCHES),
                      "inference_training_gap")
        if momentum is None:
            assert f.evidence["decays"] == [] and f.evidence.get("decay_checked") is None
            assert "does not come back" not in f.fix and "convbn recalibrate" in f.fix
        else:
            assert f.evidence["decays"] == [0.5] and f.evidence["decay_checked"]["ok"]
            assert "so that it does not come back: a lower momentum" in f.fix


# --------------------------------------------------------------------------- a model exported in training mode

def _training_mode_nodes(path):
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"
            and any(a.name == "training_mode" and a.i for a in n.attribute)]


def test_recalibrate_writes_a_training_mode_export_in_inference_mode_and_says_so(corpus):
    """Before, the file written kept training_mode=1: it normalized with each batch's statistics and ignored the
    recomputed ones the report measured. Now it runs them, one image as in a batch."""
    from convbn_cli.cli import main

    d, models, (x, _) = corpus
    path = models["training_mode_export"][0]
    out = d / "training_mode_export-recal-test.onnx"
    r = CliRunner().invoke(main, ["recalibrate", str(path), "--data", str(d / "data.npz"), "--batches", "4",
                                  "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "exported in training mode" in r.output and "inference mode" in r.output and "model.eval()" in r.output
    assert _training_mode_nodes(path) and not _training_mode_nodes(out)
    xs = x[:64, None].astype(np.float32) / 255
    np.testing.assert_allclose(_logits(out, xs[:1]), _logits(out, xs)[:1], atol=1e-4)


def test_export_folds_a_training_mode_export_in_inference_mode_and_says_so(corpus):
    """Before: exit 1, "exported logits differ" (the reference ran the inference-mode graph, the file read back
    kept training_mode=1)."""
    from convbn_cli.cli import main

    d, models, _ = corpus
    path = models["training_mode_export"][0]
    out = d / "training_mode_export-folded-test.onnx"
    r = CliRunner().invoke(main, ["export", str(path), "--format", "onnx", "--fold-bn", "--data",
                                  str(d / "data.npz"), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "exported in training mode" in r.output and "model.eval()" in r.output
    assert out.is_file() and not _training_mode_nodes(out)
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]


# --------------------------------------------------------------------------- recalibrate's output file

def test_recalibrate_never_replaces_a_file_that_appeared_while_it_measured(corpus, monkeypatch):
    import convbn_cli.analysis.onnx_doctor as doctor

    d, models, _ = corpus
    out = d / "appeared.onnx"
    measure = doctor.precise_bn

    def appearing(*a, **kw):
        out.write_bytes(b"someone else's")
        return measure(*a, **kw)

    monkeypatch.setattr(doctor, "precise_bn", appearing)
    with pytest.raises(ConvbnError, match="already exists"):
        recalibrate(str(models["stale"][0]), batches=2, data_source=str(d / "data.npz"), output=str(out))
    assert out.read_bytes() == b"someone else's"


def test_recalibrate_refuses_a_symlink_output_even_with_force(corpus):
    d, models, _ = corpus
    target = d / "kept.onnx"
    target.write_bytes(b"kept")
    link = d / "link.onnx"
    link.symlink_to(target)
    with pytest.raises(ConvbnError, match="not a .onnx file"):
        recalibrate(str(models["stale"][0]), batches=2, data_source=str(d / "data.npz"), output=str(link),
                    force=True)
    assert link.is_symlink() and target.read_bytes() == b"kept"
