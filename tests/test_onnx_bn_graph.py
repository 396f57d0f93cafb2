"""Issue 38: what convbn reads from an ONNX model's graph (analysis/onnx_graph.py), without running it on data: the
input layout, the BN layers, the channel axis through Transposes, and where folding is not valid. Fast (well
under a second); tests/test_onnx_bn_doctor.py measures the corpus in the slow tier."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx_corpus import CNN, POOL_FIRST, SHARED, WRONG_AXIS, Net, images, to_onnx  # noqa: E402

from convbn_cli.analysis.onnx_graph import channel_axis, fold_target, open_onnx  # noqa: E402
from convbn_cli.errors import TargetError  # noqa: E402


@pytest.fixture(scope="module")
def data():
    x, y = images(128)
    return x[:, None].astype(np.float64) / 255, y


def _open(tmp_path, net, layout="NCHW", name="m", **kw):
    onnx.save(to_onnx(net, layout), tmp_path / f"{name}.onnx")
    return open_onnx(tmp_path / f"{name}.onnx", **kw)


def test_layout_bn_layers_and_channel_axes_come_from_the_graph(tmp_path, data):
    net = Net(CNN).fit(*data)
    nchw, nhwc = _open(tmp_path, net, "NCHW", "a"), _open(tmp_path, net, "NHWC", "b")
    assert (nchw.layout, nchw.framework, nhwc.layout, nhwc.framework) == ("NCHW", "pytorch", "NHWC", "keras")
    assert nhwc.hwc == nchw.hwc == (8, 8, 1)
    for m in (nchw, nhwc):
        assert [bn.channels for bn in m.bns] == [6, 8]
        assert [channel_axis(m, bn.nodes[0].input[0]) for bn in m.bns] == [1, 1]
        np.testing.assert_allclose(m.bns[1].moving_variance.numpy(), net.p[5]["var"], rtol=1e-6)
    wrong = _open(tmp_path, Net(WRONG_AXIS).fit(*data), name="c")
    assert channel_axis(wrong, wrong.bns[0].nodes[0].input[0]) == 3  # the conv's channels, after the Transpose
    assert "does not normalize the channels" in fold_target(wrong, wrong.bns[0])


def test_folding_is_refused_across_a_negative_max_pool_and_into_a_shared_weight(tmp_path, data):
    net = Net(POOL_FIRST)
    net.p[2]["gamma"][0] = -1.0
    m = _open(tmp_path, net.fit(*data), name="p")
    assert "max-pool" in fold_target(m, m.bns[0])
    net = Net(POOL_FIRST).fit(*data)  # every scale positive: a max-pool passes a positive factor on
    m = _open(tmp_path, net, name="q")
    assert not isinstance(fold_target(m, m.bns[0]), str)
    shared = _open(tmp_path, Net(SHARED).fit(*data), name="s")
    assert [len(bn.nodes) for bn in shared.bns] == [1, 2]  # a BN called twice is one layer of two nodes
    assert "shared" in fold_target(shared, shared.bns[1])


def test_an_input_whose_layout_the_graph_does_not_say_needs_layout(tmp_path, data):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Flatten", ["input"], ["f"]),
                           helper.make_node("Gemm", ["f", "w"], ["out"], transB=1)], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])],
                          [onnx.numpy_helper.from_array(np.ones((2, 36), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "amb.onnx")
    with pytest.raises(TargetError, match="--layout NCHW"):
        open_onnx(tmp_path / "amb.onnx")
    assert open_onnx(tmp_path / "amb.onnx", "NHWC").hwc == (3, 4, 3)


def test_a_bn_on_the_input_is_measured_and_a_training_mode_export_is_one_line(tmp_path, data):
    from onnx import TensorProto, helper

    from convbn_cli.analysis.onnx_measure import Runner, precise_bn

    def model(**attrs):
        inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
                 (("g", [2.0]), ("b", [0.0]), ("m", [0.5]), ("v", [0.25]), ("w", np.ones((2, 64))))]
        g = helper.make_graph([helper.make_node("BatchNormalization", ["input", "g", "b", "m", "v"], ["n"], **attrs),
                               helper.make_node("Flatten", ["n"], ["f"]),
                               helper.make_node("Gemm", ["f", "w"], ["out"], transB=1)], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    onnx.save(model(), tmp_path / "in.onnx")
    m = open_onnx(tmp_path / "in.onnx")
    x = data[0][:64].astype(np.float32)
    mean, var = precise_bn(Runner(m), [x[:32], x[32:]])[m.bns[0].name]
    halves = [x[:32], x[32:]]
    np.testing.assert_allclose(mean, [np.mean([h.mean() for h in halves])], rtol=1e-6)
    np.testing.assert_allclose(var, [np.mean([h.var() for h in halves])], rtol=1e-5)
    onnx.save(model(training_mode=1), tmp_path / "train.onnx")
    with pytest.raises(TargetError, match="training mode|not a readable ONNX"):
        open_onnx(tmp_path / "train.onnx")


def test_the_new_checks_graph_facts_training_mode_reductions_momentum_and_order(tmp_path, data):
    from onnx_corpus import DROPOUT_BN, REDUCE_BN, RELU_FIRST, TRAIN_MODE

    from convbn_cli.analysis.onnx_checks import graph_orders

    healthy = _open(tmp_path, Net(CNN).fit(*data), name="h")
    assert healthy.batch_mixing == [] and all(bn.momentum_given and not bn.training_mode for bn in healthy.bns)
    orders = graph_orders(healthy).values()  # conv -> BN -> ReLU: BN before its activation, nothing to note
    assert all(o["before_activation"] and not o["after_activation"] and not o["dropout_before"] for o in orders)
    trained = _open(tmp_path, Net(TRAIN_MODE).fit(*data), name="t")  # opened now, no longer refused
    assert trained.batch_mixing == [trained.bns[0].name] and trained.bns[0].training_mode
    assert "training mode" in fold_target(trained, trained.bns[0])
    reduced = _open(tmp_path, Net(REDUCE_BN).fit(*data), name="r")
    assert reduced.bns == [] and [n.split("_")[0] for n in reduced.batch_mixing] == ["reducemean"] * 2
    relu = _open(tmp_path, Net(RELU_FIRST).fit(*data), name="o")
    assert [o["after_activation"] is not None for o in graph_orders(relu).values()] == [True, False]
    drop = _open(tmp_path, Net(DROPOUT_BN).fit(*data), name="d")
    assert [o["dropout_before"] for o in graph_orders(drop).values()][0].startswith("dropout")
    net = Net(CNN).fit(*data)
    for p in [q for (kind, *_), q in zip(net.plan, net.p) if kind == "bn"]:
        p["momentum"] = None
    assert not any(bn.momentum_given for bn in _open(tmp_path, net, name="n").bns)


def test_eval_and_predict_feed_an_nchw_onnx_model_its_layout(tmp_path, data):
    """formats/runtime.py's ONNX reader (what eval and predict run): a PyTorch-style NCHW model takes (N, H, W, C)
    images like every other target and is fed them as NCHW; a tf2onnx NHWC model as they are. Before, an NCHW
    model got NHWC images (its signature read (1, 8, 8): one row of 8x1 pixels per channel)."""
    from convbn_cli.formats.runtime import read_onnx

    net = Net(CNN).fit(*data)
    want = net.forward(data[0][:16])
    nhwc = data[0][:16].transpose(0, 2, 3, 1).astype(np.float32)
    for layout in ("NCHW", "NHWC"):
        onnx.save(to_onnx(net, layout), tmp_path / f"{layout}.onnx")
        opened = read_onnx(tmp_path / f"{layout}.onnx")
        assert opened.shape == (8, 8, 1), layout
        np.testing.assert_allclose(opened.predict(nhwc), want, atol=1e-3, err_msg=layout)


def test_eval_and_predict_take_layout_where_the_graph_does_not_say(tmp_path):
    """An input (N, 3, 4, 3) read straight by a Flatten says nothing of its layout: as before it is fed NHWC, and
    eval and predict take --layout NCHW (runs/target.open_target's layout) to feed it NCHW."""
    from onnx import TensorProto, helper

    from convbn_cli.runs.target import open_target

    w = np.random.default_rng(0).normal(size=(2, 36)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Flatten", ["input"], ["f"]),
                           helper.make_node("Gemm", ["f", "w"], ["out"], transB=1)], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])],
                          [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "amb.onnx")
    x = np.random.default_rng(1).normal(size=(5, 4, 3, 3)).astype(np.float32)  # (N, H, W, C) for NCHW (3, 4, 3)
    t = open_target(str(tmp_path / "amb.onnx"), runnable_only=True, layout="NCHW")
    np.testing.assert_allclose(t.predict(x), x.transpose(0, 3, 1, 2).reshape(5, -1) @ w.T, rtol=1e-5)
    x = np.random.default_rng(2).normal(size=(5, 3, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(open_target(str(tmp_path / "amb.onnx"), runnable_only=True).predict(x),
                               x.reshape(5, -1) @ w.T, rtol=1e-5)


def test_onnxruntime_failures_to_run_are_one_line_and_the_arena_is_named():
    """formats/runtime._run_error, what eval's reader and the in-memory variants both raise."""
    from convbn_cli.formats.runtime import MAX_ONNX_ARENA_BYTES, _run_error

    e = _run_error("m.onnx", RuntimeError("Available memory of 0 is smaller than requested bytes of 8"))
    assert str(e) == f"m.onnx: onnxruntime could not run it (more memory than the {MAX_ONNX_ARENA_BYTES >> 20} MiB " \
                     "an ONNX model may take)"
    assert str(_run_error("m.onnx", RuntimeError("bad\n  node"))) == "m.onnx: onnxruntime could not run it (bad node)"
