"""How close can a config's training step get to the matmul peak with TensorFlow's own kernels?

bench/step_time.py --against-peak gives the step's share of the float32 matmul peak. This script says what that
share could be at best on this machine: it rebuilds the config's network from its layer plan as bare TensorFlow
ops (no Keras, no data pipeline, no dropout) in three tiers, and times each one's training step against the
matmul probe, calls alternating in one process. A bare step is forward, backward (the gradients of the weights)
and the least optimizer there is, plain SGD (one subtraction per weight): without an update, consecutive steps
would not depend on each other and TensorFlow's loop would overlap them, which no training can (measured: about
5 ms a step faster on mnist_bn). The tiers:

    kernels      the conv and dense products and the pooling, nothing else
    + activation the same with each layer's activation (ReLU)
    + BN         the same with BN in training mode on TensorFlow's fused kernel (FusedBatchNormV3, which the
                 runtime maps to oneDNN), between each product and its activation, as convbn builds it

and convbn's own compiled training call last (step_time.make_caller). Every share is that side's GFLOP/s over
the probe's in the same round (bench/peak.training_flops: the products only), the median over the rounds.
The gap between the "+ BN" tier and convbn's step is what convbn's own code could still win; the tiers above it
are TensorFlow's kernels at these tensor sizes.

    python bench/kernel_ceiling.py --config configs/mnist_bn.yaml --set train.precision=float32 [KEY=VALUE ...]
                                   [--rounds 20]

(float32 only: the bare tiers are float32, and mnist_bn's `precision: auto` is bfloat16 on CPUs that have it.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TIERS = ("kernels", "+ activation", "+ BN")


def bare_network(cfg, tier: int):
    """(forward(images) -> logits, layers) of the config's network as bare TensorFlow ops at tier 0-2 of TIERS:
    float32, channels-last, no dropout, random weights. `layers` lists (planned layer, kernel, bias or None, BN's
    (gamma, beta) or None) for every conv and dense layer; at tier 2 with the model's weights copied in, forward
    is convbn's model in training mode (tests/test_bench_tools.py)."""
    import keras
    import tensorflow as tf

    from convbn_cli.config import plan_layers

    plan = plan_layers(cfg)
    layers = []
    for p in plan:
        t = p.spec.type
        if t in ("conv", "dense"):
            shape = [*p.spec.kernel, p.in_shape[-1], p.channels] if t == "conv" else [p.in_shape[0], p.channels]
            kernel = tf.Variable(tf.random.normal(shape, stddev=0.05))
            bias = tf.Variable(tf.zeros([p.channels])) if p.use_bias else None
            bn = None
            if tier >= 2 and p.bn is not None:
                bn = (tf.Variable(tf.ones([p.channels])), tf.Variable(tf.zeros([p.channels])))
            layers.append((p, kernel, bias, bn))
        elif t in ("crop", "pool", "global_pool", "flatten", "dropout"):
            layers.append((p, None, None, None))
        else:
            raise SystemExit(f"kernel_ceiling: layer type {t!r} ({p.name}) is not rebuilt here")

    def forward(h):
        for p, kernel, bias, bn in layers:
            s = p.spec
            if s.type == "conv":
                h = tf.nn.conv2d(h, kernel, s.stride, s.padding.upper(), dilations=s.dilation)
                if s.pool > 1:  # the block's pooling, before its BN
                    h = tf.nn.max_pool2d(h, s.pool, s.pool, "VALID")
            elif s.type == "dense":
                h = tf.matmul(h, kernel)
            elif s.type == "crop":
                (bh, bw) = s.border
                h = h[:, bh:h.shape[1] - bh, bw:h.shape[2] - bw, :]
            elif s.type == "pool":
                pool = tf.nn.max_pool2d if s.kind == "max" else tf.nn.avg_pool2d
                h = pool(h, s.size, s.stride or s.size, s.padding.upper())
            elif s.type == "global_pool":
                h = (tf.reduce_mean if s.kind == "avg" else tf.reduce_max)(h, axis=[1, 2])
            elif s.type == "flatten":
                h = tf.reshape(h, [tf.shape(h)[0], -1])
            if bias is not None:
                h = tf.nn.bias_add(h, bias)
            if bn is not None:  # the fused kernel wants 4-D: a dense layer's (N, C) as (N, 1, 1, C)
                gamma = bn[0] if p.bn.scale else tf.ones_like(bn[0])
                beta = bn[1] if p.bn.center else tf.zeros_like(bn[1])
                shape = tf.shape(h)
                h4 = h if h.shape.rank == 4 else tf.reshape(h, [shape[0], 1, 1, -1])
                h = tf.reshape(tf.compat.v1.nn.fused_batch_norm(h4, gamma, beta, epsilon=p.bn.epsilon)[0], shape)
            if tier >= 1 and kernel is not None and p.activation:
                h = keras.activations.get(p.activation)(h)
        return h

    return forward, layers


def bare_step(cfg, tier: int, steps: int):
    """A compiled call of `steps` training steps (forward, backward, plain SGD update) of bare_network(cfg, tier) on
    one batch of random images (speed only)."""
    import tensorflow as tf

    forward, layers = bare_network(cfg, tier)
    weights = [w for _, kernel, bias, bn in layers for w in (kernel, bias, *(bn or ())) if w is not None]
    x = tf.random.normal([cfg.data.batch_size, *cfg.model.input_shape])

    @tf.function
    def call():
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(forward(x)))
            grads = tape.gradient(loss, weights)
            for w, g in zip(weights, grads):
                if g is not None:  # BN's gamma or beta when the config turns it off
                    w.assign_sub(1e-6 * g)  # tiny: the weights stay in range over any number of calls
            total += loss
        return total

    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_bn.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    from convbn_cli.config import load_config
    from convbn_cli.tf_setup import import_tensorflow

    import_tensorflow()
    from peak import cpu_info, training_flops
    from step_time import make_caller, make_peak_caller

    trainer_call, name, step_flops, steps, dtype = make_caller(args.config, args.set)
    if dtype != "float32":
        raise SystemExit("kernel_ceiling: the bare tiers are float32; run it with train.precision=float32")
    cfg = load_config(args.config, args.set)
    probe, probe_name, probe_flops, _, _ = make_peak_caller(dtype)

    def timed(fn):
        def call() -> float:
            t0 = time.perf_counter()
            fn().numpy()
            return (time.perf_counter() - t0) / steps * 1000
        return call

    sides = [(timed(bare_step(cfg, t, steps)), TIERS[t]) for t in range(len(TIERS))]
    sides.append((trainer_call, f"convbn's training call ({name})"))
    # the bare sides run cfg.data.batch_size images a step; their share uses the trainer's FLOPs, so the trainer's
    # batch (its global batch, one replica here) must be the same
    assert abs(training_flops(cfg) * cfg.data.batch_size - step_flops) < 1
    for call, _ in [(probe, None), *sides]:  # warm-up: tracing and oneDNN's primitives
        call(), call()
    shares, ms = [[] for _ in sides], [[] for _ in sides]
    for r in range(args.rounds):
        order = list(range(len(sides))) if r % 2 == 0 else list(reversed(range(len(sides))))
        probe_ms = probe()
        for i in order:
            ms[i].append(sides[i][0]())
            shares[i].append(step_flops / ms[i][-1] / (probe_flops / probe_ms))
    print(cpu_info())
    print(f"{Path(args.config).name} {' '.join(args.set)}: {step_flops / 1e9:.2f} GFLOP a step (batch "
          f"{cfg.data.batch_size}, {steps} steps a call); shares of {probe_name}, each round's own probe, "
          f"{args.rounds} rounds:")
    for (_, label), s, m in zip(sides, shares, ms):
        q = statistics.quantiles(s, n=4)
        print(f"  {label}: {statistics.median(s):.0%} of the peak (quartiles {q[0]:.0%}-{q[2]:.0%}), "
              f"{statistics.median(m):.1f} ms a step")


if __name__ == "__main__":
    main()
