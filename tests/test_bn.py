"""BN is right by construction: per-channel statistics, (filters,) parameters, moving statistics updated only in
training, and the fused layer agreeing with Keras' BatchNormalization and with a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from conftest import tiny_raw  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.model import FusedBatchNorm, bn_layers, build_model  # noqa: E402

LAYOUTS = {"channels_last": -1, "channels_first": 1}


def make_bn(impl, axis, **kw):
    cls = FusedBatchNorm if impl == "fused" else keras.layers.BatchNormalization
    return cls(axis=axis, **kw)


def numpy_bn_train(x, axis, gamma, beta, eps):
    """Reference: normalize each channel over every other axis with its biased batch variance."""
    red = tuple(i for i in range(4) if i != axis % 4)
    mean, var = x.mean(red), x.var(red)  # np.var is the biased (divide by n) variance
    shape = [1, 1, 1, 1]
    shape[axis % 4] = -1
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) + beta.reshape(shape)
    return y, mean, var


def sample(layout, seed=0):
    rng = np.random.default_rng(seed)
    # channels with very different means and scales, so that per-activation or global statistics would show
    x = rng.normal(size=(6, 5, 7, 4)) * np.array([0.1, 1.0, 5.0, 20.0]) + np.array([-3.0, 0.0, 2.0, 50.0])
    x = x.astype(np.float32)
    return x if layout == "channels_last" else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("impl", ["fused", "keras"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_output_is_normalized_per_channel_over_n_h_w(impl, layout):
    axis = LAYOUTS[layout]
    x = sample(layout)
    bn = make_bn(impl, axis, epsilon=1e-5)
    y = bn(x, training=True).numpy()  # gamma=1, beta=0 at initialization: y is the normalized x
    red = tuple(i for i in range(4) if i != axis % 4)
    np.testing.assert_allclose(y.mean(red), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.var(red), 1.0, atol=2e-3)
    # one statistic per channel, not per activation: a single position is not normalized on its own
    assert np.abs(y.mean(0)).max() > 0.1
    for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance):
        assert tuple(w.shape) == (4,)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_and_keras_agree_with_each_other_and_numpy(layout):
    axis = LAYOUTS[layout]
    x = sample(layout, seed=1)
    rng = np.random.default_rng(2)
    gamma, beta = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    weight = tf.constant(rng.normal(size=x.shape).astype(np.float32))  # makes the loss channel- and position-aware
    outs = {}
    for impl in ("fused", "keras"):
        bn = make_bn(impl, axis, momentum=0.8, epsilon=1e-3)
        bn.build(x.shape)
        bn.gamma.assign(gamma)
        bn.beta.assign(beta)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = bn(xt, training=True)
            loss = tf.reduce_sum(tf.square(y) * weight)
        gx, gg, gb = tape.gradient(loss, [xt, bn.gamma, bn.beta])
        outs[impl] = dict(y=y.numpy(), gx=gx.numpy(), gg=gg.numpy(), gb=gb.numpy(),
                          mm=bn.moving_mean.numpy(), mv=bn.moving_variance.numpy(),
                          infer=bn(x, training=False).numpy())
    f, k = outs["fused"], outs["keras"]
    for key in f:
        np.testing.assert_allclose(f[key], k[key], rtol=2e-4, atol=2e-4, err_msg=key)
    ref_y, mean, var = numpy_bn_train(x.astype(np.float64), axis, gamma, beta, 1e-3)
    np.testing.assert_allclose(f["y"], ref_y, rtol=1e-4, atol=1e-4)
    # the moving-statistics convention: biased batch variance, moving = decay * moving + (1 - decay) * batch
    np.testing.assert_allclose(f["mm"], 0.8 * 0 + 0.2 * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f["mv"], 0.8 * 1 + 0.2 * var, rtol=1e-5)
    # inference uses the moving statistics
    shape = [1, 1, 1, 1]
    shape[axis % 4] = -1
    ref_inf = (x - f["mm"].reshape(shape)) / np.sqrt(f["mv"].reshape(shape) + 1e-3) * gamma.reshape(shape) \
        + beta.reshape(shape)
    np.testing.assert_allclose(f["infer"], ref_inf, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["fused", "keras"])
def test_center_and_scale_off(impl):
    x = sample("channels_last")
    bn = make_bn(impl, -1, center=False, scale=False)
    y = bn(x, training=True).numpy()
    assert bn.gamma is None and bn.beta is None
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0, atol=1e-4)


def _model(tmp_path, **over):
    return build_model(load_config(raw=tiny_raw(tmp_path, **over)))


def test_model_bn_params_have_shape_filters_and_no_redundant_conv_bias(tmp_path):
    model = _model(tmp_path)
    assert [layer.name for layer in model.layers][1:] == [
        "conv1", "conv1_bn", "conv1_relu", "conv2", "conv2_bn", "conv2_relu", "global_pool1", "dense1"]
    for name, filters in (("conv1", 4), ("conv2", 6)):
        assert model.get_layer(name).bias is None  # BN's beta is the shift; a conv bias would be redundant
        bn = model.get_layer(f"{name}_bn")
        assert isinstance(bn, FusedBatchNorm)
        for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance):
            assert tuple(w.shape) == (filters,)
    raw_over = {"model.bn": {"center": False, "impl": "keras"}}
    model = _model(tmp_path, **raw_over)
    assert model.get_layer("conv1").bias is not None  # no beta: the conv keeps its bias
    assert isinstance(model.get_layer("conv1_bn"), keras.layers.BatchNormalization)


def test_moving_statistics_change_in_training_steps_only(tmp_path):
    model = _model(tmp_path)
    x = tf.constant(np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype(np.float32))

    def snapshot():
        return [v.numpy().copy() for layer in bn_layers(model) for v in (layer.moving_mean, layer.moving_variance)]

    before = snapshot()
    model(x, training=False)
    model.predict(x, verbose=0)
    after_inference = snapshot()
    assert all(np.array_equal(a, b) for a, b in zip(before, after_inference))
    model(x, training=True)
    after_training = snapshot()
    assert all(not np.allclose(a, b) for a, b in zip(before, after_training))


def test_channels_first_model_matches_channels_last(tmp_path):
    last = _model(tmp_path)
    first = _model(tmp_path, **{"model.data_format": "channels_first"})
    assert first.get_layer("conv1_bn").axis == 1
    for a, b in zip(last.weights, first.weights):
        b.assign(a)
    x = np.random.default_rng(3).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(last(x, training=training), first(x, training=training), atol=1e-4)
    np.testing.assert_allclose(last.get_layer("conv2_bn").moving_mean, first.get_layer("conv2_bn").moving_mean,
                               atol=1e-5)


def test_dense_bn_is_per_unit_keras(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["model"]["layers"][-1:-1] = [{"type": "dense", "units": 12, "activation": "relu", "bn": True}]
    model = build_model(load_config(raw=raw))
    bn = model.get_layer("dense1_bn")
    assert isinstance(bn, keras.layers.BatchNormalization) and tuple(bn.gamma.shape) == (12,)
    assert model.get_layer("dense1").bias is None and model.get_layer("dense2").bias is not None


def test_a_conv_block_that_pools_normalizes_the_pooled_values_per_channel(tmp_path):
    """`pool: 2` on a conv: conv -> max-pool -> BN -> ReLU, BN's statistics taken over the pooled values."""
    raw = tiny_raw(tmp_path)
    raw["model"]["layers"][0] = {"type": "conv", "filters": 4, "kernel": 3, "pool": 2}
    cfg = load_config(raw=raw)
    model = build_model(cfg)
    names = [layer.name for layer in model.layers]
    assert names[1:5] == ["conv1", "conv1_pool", "conv1_bn", "conv1_relu"]
    assert tuple(model.get_layer("conv1_bn").output.shape) == (None, 14, 14, 4)
    x = np.random.default_rng(4).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    conv = model.get_layer("conv1")(x)
    pooled = tf.nn.max_pool2d(conv, 2, 2, "VALID").numpy()
    bn = model.get_layer("conv1_bn")
    before = bn.moving_mean.numpy().copy()
    model(x, training=True)
    # the moving mean moved towards the per-channel mean of the *pooled* conv output (decay 0.9)
    expected = 0.9 * before + 0.1 * pooled.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(expected, 0.9 * before + 0.1 * conv.numpy().mean(axis=(0, 1, 2)), atol=1e-4)


def test_a_pooling_conv_block_is_planned_and_refused_where_it_cannot_pool(tmp_path):
    from convbn_cli.config import plan_layers
    from convbn_cli.errors import ConfigError

    raw = tiny_raw(tmp_path)
    raw["model"]["layers"][1] = {"type": "conv", "filters": 6, "kernel": 3, "stride": 2, "pool": 2}
    plan = plan_layers(load_config(raw=raw))
    assert plan[1].out_shape == (3, 3, 6)  # 28 -> 14 (stride 2) -> 7 (stride 2) -> 3 (pool 2)
    assert "max-pool 2 before BN" in plan[1].spec.note(plan[1])
    raw["model"]["layers"][1]["pool"] = 8
    with pytest.raises(ConfigError, match=r"model.layers\[1\] \(conv2\): pool 8 collapses the conv's 7x7 output"):
        plan_layers(load_config(raw=raw))


def test_folding_keeps_the_bn_of_a_block_that_pools_before_it(tmp_path):
    """A BN after a max-pool is not folded into the conv (a negative gamma does not commute with max); the others
    are, and the exported model computes the same."""
    from convbn_cli.model.fold import standard_model

    raw = tiny_raw(tmp_path)
    raw["model"]["layers"][0] = {"type": "conv", "filters": 4, "kernel": 3, "pool": 2}
    model = build_model(load_config(raw=raw))
    x = np.random.default_rng(5).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    for _ in range(3):
        model(x, training=True)  # moving statistics away from (0, 1)
    folded, folded_names, kept = standard_model(model, fold_bn=True)
    assert "conv1_bn" in kept and "conv2_bn" in folded_names
    np.testing.assert_allclose(folded(x, training=False), model(x, training=False), atol=1e-4)


def test_a_crop_layer_drops_the_border_in_the_model_and_its_export(tmp_path):
    """`{type: crop, border: b}` plans (and builds) the centre (28 - 2b)^2 of the image: pixels in the border change
    nothing, one inside does; the BN after the conv still folds, and the folded model computes the same."""
    from convbn_cli.config import plan_layers
    from convbn_cli.errors import ConfigError
    from convbn_cli.model.fold import standard_model

    keras.utils.set_random_seed(0)
    raw = tiny_raw(tmp_path)
    raw["model"]["layers"].insert(0, {"type": "crop", "border": [2, 3]})
    cfg = load_config(raw=raw)
    plan = plan_layers(cfg)
    assert [p.out_shape for p in plan[:2]] == [(24, 22, 1), (12, 11, 4)]
    model = build_model(cfg)
    assert tuple(model.get_layer(plan[0].name).output.shape[1:]) == (24, 22, 1)
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)
    for _ in range(3):
        model(x, training=True)  # moving statistics away from (0, 1)
    border, inside = x.copy(), x.copy()
    border[:, :2] = border[:, -2:] = border[:, :, :3] = border[:, :, -3:] = 0.5
    inside[:, 2, 3:25] = 1.0 - inside[:, 2, 3:25]  # the first row of the centre
    base = model(x, training=False).numpy()
    np.testing.assert_array_equal(model(border, training=False).numpy(), base)
    assert np.abs(model(inside, training=False).numpy() - base).max() > 1e-4  # ~7e-3: well above float noise
    folded, folded_names, _ = standard_model(model, fold_bn=True)
    assert "conv1_bn" in folded_names
    np.testing.assert_allclose(folded(x, training=False), base, atol=1e-4)
    raw["model"]["layers"][0]["border"] = 14
    with pytest.raises(ConfigError, match=r"model.layers\[0\] \(crop1\): border 14x14 leaves nothing of its "
                                          r"28x28 input"):
        plan_layers(load_config(raw=raw))


def test_the_runs_listing_names_a_block_that_pools_before_bn():
    from convbn_cli.runs.listing import architecture

    flat = {"model.layers[0].type": "conv", "model.layers[0].filters": 16, "model.layers[0].pool": 2,
            "model.layers[1].type": "conv", "model.layers[1].filters": 48, "model.layers[1].pool": 1,
            "model.layers[2].type": "flatten", "model.layers[3].type": "dense", "model.layers[3].units": 10}
    assert architecture(flat) == "c16p-c48-d10"
    cropped = {"model.layers[0].type": "crop", "model.layers[0].border[0]": 3, "model.layers[0].border[1]": 3,
               **{k.replace(f"[{i}]", f"[{i + 1}]"): v for i in (3, 2, 1, 0) for k, v in flat.items() if f"[{i}]" in k}}
    assert architecture(cropped) == "cr3-c16p-c48-d10"
    assert architecture({**cropped, "model.layers[0].border[1]": 2}) == "cr3x2-c16p-c48-d10"


@pytest.mark.parametrize("kernel, padding, size, pooled_size", [(3, "same", 28, 14), (2, "valid", 27, 13)])
def test_a_pooling_conv_block_counts_its_unpooled_output_in_the_memory_estimate(tmp_path, kernel, padding, size,
                                                                                 pooled_size):
    """The conv's own output is kept for the backward pass before the block pools it: the same values as a conv
    followed by a separate pool layer (also where pooling drops an odd last row and column: 27 -> 13)."""
    from convbn_cli.config import plan_layers
    from convbn_cli.config.plan import estimate

    conv_spec = {"type": "conv", "filters": 4, "kernel": kernel, "padding": padding}
    inline = tiny_raw(tmp_path)
    inline["model"]["layers"][0] = {**conv_spec, "pool": 2}
    separate = tiny_raw(tmp_path)
    separate["model"]["layers"][0:1] = [conv_spec, {"type": "pool", "kind": "max", "size": 2}]
    per_image = [estimate(plan_layers(load_config(raw=r)), 32).activations_per_image for r in (inline, separate)]
    # separate: conv, BN and ReLU at 28x28x4, the pool's output at 14x14x4; inline: conv at 28x28x4, the pooled
    # output, BN and ReLU at 14x14x4: fewer values (BN and ReLU on a quarter), the conv's output counted in both
    conv, pooled = size * size * 4, pooled_size * pooled_size * 4
    assert per_image[1] - per_image[0] == (3 * conv + pooled) - (conv + 3 * pooled)
