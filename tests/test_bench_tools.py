"""The benchmark tools' own arithmetic: what they time must be the network they name.

bench/kernel_ceiling.py compares convbn's training step with the same network rebuilt from bare TensorFlow ops; its
"+ BN" tier only says something about convbn's step if it computes what convbn's model computes.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO, tiny_raw

sys.path.insert(0, str(REPO / "bench"))

from kernel_ceiling import bare_network  # noqa: E402

from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.model import bn_layers, build_model  # noqa: E402

LAYERS = [  # every kind of layer kernel_ceiling rebuilds: a crop, pooling inside a conv block, 'valid' padding, a
    # stride, a pool layer, a dense layer with BN and one with a bias, a BN without its scale
    {"type": "crop", "border": [1, 2]},
    {"type": "conv", "filters": 8, "kernel": 3, "padding": "valid", "pool": 2},
    {"type": "conv", "filters": 16, "kernel": 3, "stride": 2, "bn": {"scale": False}},
    {"type": "pool", "kind": "avg", "size": 2},
    {"type": "conv", "filters": 16, "kernel": 3, "bn": False},
    {"type": "flatten"},
    {"type": "dense", "units": 12, "activation": "relu", "bn": True},
    {"type": "dense", "units": 10},
]


@pytest.mark.parametrize("layers", [LAYERS, LAYERS[:4] + [{"type": "global_pool"}, LAYERS[-1]]],
                         ids=["flatten", "global_pool"])
def test_kernel_ceiling_bn_tier_is_convbns_model_in_training_mode(tmp_path, layers):
    cfg = load_config(raw=tiny_raw(tmp_path, **{"model.layers": layers}))
    model = build_model(cfg)
    forward, bare = bare_network(cfg, tier=2)
    rng = np.random.default_rng(0)
    for p, kernel, bias, bn in bare:
        if kernel is None:
            continue
        layer = model.get_layer(p.name)
        for var, source in [(kernel, layer.kernel), (bias, getattr(layer, "bias", None))]:
            assert (var is None) == (source is None), p.name
            if var is not None:  # random, not Keras' zero biases: a bias left out must show
                var.assign(rng.normal(size=var.shape).astype("float32"))
                source.assign(var.numpy())
        if bn is not None:
            gamma, beta = model.get_layer(p.bn_name).gamma, model.get_layer(p.bn_name).beta
            for var, source in [(bn[0], gamma), (bn[1], beta)]:  # one the config turns off must stay unused
                var.assign(rng.uniform(0.5, 1.5, size=var.shape).astype("float32"))
                if source is not None:
                    source.assign(var.numpy())
    x = rng.normal(size=(32, *cfg.model.input_shape)).astype("float32")
    want = model(x, training=True).numpy()
    got = forward(x).numpy()
    assert got.shape == want.shape == (32, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_train_throughput_keras_network_is_convbns_network(tmp_path):
    """The Keras contender must train the network convbn trains: the same weights layer by layer (BN's gamma and
    beta only where the config keeps them), the same BN settings, and with convbn's weights copied in, the same
    logits in inference, for mnist_bn and for a net that crops its input (and pools inside a block, strides, turns
    a BN off and drops a BN's scale)."""
    import keras
    from train_throughput import config, keras_layers

    from convbn_cli.config import plan_layers

    cropped = tiny_raw(tmp_path, **{"model.layers": [{"type": "crop", "border": 3}, *LAYERS]})
    rng = np.random.default_rng(0)
    for cfg in (config("mnist_bn"), load_config(raw=cropped)):
        ours = build_model(cfg)
        theirs = keras.Sequential(keras_layers(cfg))
        bns = [layer for layer in theirs.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert [(b.momentum, b.epsilon, b.center, b.scale) for b in bns] == \
            [(p.bn.decay, p.bn.epsilon, p.bn.center, p.bn.scale) for p in plan_layers(cfg) if p.bn is not None]
        x = rng.uniform(size=(16, 28, 28, 1)).astype("float32")
        for _ in range(3):
            ours(x, training=True)  # moving statistics away from (0, 1)
        for bn in bn_layers(ours):  # gammas of both signs: a max-pool commutes only with an increasing BN
            for v in (bn.gamma, bn.beta):
                if v is not None:
                    v.assign(rng.uniform(-1.5, 1.5, size=v.shape).astype("float32"))
        theirs.set_weights(ours.get_weights())  # refused unless every weight's shape matches, in order
        np.testing.assert_allclose(theirs(x, training=False), ours(x, training=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, op_type, kind", [
    # names as TensorFlow's profiler traces them (train_throughput.py --profile), Keras' and convbn's
    ("StatefulPartitionedCall/gradient_tape/sequential_1/batch_normalization_1/batchnorm/RsqrtGrad", "RsqrtGrad",
     "batch norm"),
    ("while/body/_1/gradient_tape/while/convbn_1/dense1_bn_1/batchnorm/RsqrtGrad", "RsqrtGrad", "batch norm"),
    ("while/body/_1/gradient_tape/while/convbn_1/dense1_bn_1/moments/GatherV2", "GatherV2", "batch norm"),
    ("while/body/_1/gradient_tape/while/convbn_1/conv1_bn_1/FusedBatchNormGradV3", "_MklNativeFusedBatchNormGradV3",
     "batch norm"),
    ("while/body/_1/gradient_tape/while/convbn_1/conv1_1/convolution/Conv2DBackpropFilter",
     "_MklNativeConv2DBackpropFilter", "convolutions"),
    ("StatefulPartitionedCall/gradient_tape/sequential_1/re_lu_1/ReluGrad", "ReluGrad", "ReLU"),
    ("StatefulPartitionedCall/gradient_tape/sequential_1/dense_1/MatMul/MatMul", "_MklMatMul", "dense"),
    ("while/body/_1/while/convbn_1/pool1_1/MaxPool2d", "_MklNativeMaxPool", "pooling"),
    ("StatefulPartitionedCall/adam/Add_1", "AddV2", "optimizer"),
    ("while/body/_1/while/GatherV2", "GatherV2", "feeding"),
    ("while/body/_1/gradient_tape/while/categorical_crossentropy/softmax_cross_entropy_with_logits/mul", "Mul",
     "loss"),
])
def test_train_throughput_profile_puts_each_op_in_its_part(name, op_type, kind):
    from train_throughput import op_kind

    assert op_kind(name, op_type).startswith(kind)
