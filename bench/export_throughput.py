"""Inference throughput of a model exported with BN folded into the convolutions vs the unfolded model.

Both are standard Keras models rebuilt from the same checkpoint (see convbn_cli/model/fold.py), run in
the same process, alternating, on the same batch, so that machine noise affects both alike.

    python bench/export_throughput.py RUN_DIR [--batch 256] [--rounds 7] [--seconds 1.5]

With no RUN_DIR, a model is built from configs/mnist_bn.yaml with random weights and BN statistics
(throughput does not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convbn_cli.tf_setup import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import numpy as np  # noqa: E402

from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.model import bn_layers, build_model  # noqa: E402
from convbn_cli.model.fold import standard_model  # noqa: E402
from convbn_cli.runs.target import open_target  # noqa: E402


def images_per_s(fn, x, seconds):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x).numpy()
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args()
    if args.run_dir:
        target = open_target(args.run_dir)
        model, source = target.model, target.source
    else:
        model = build_model(load_config(Path(__file__).resolve().parents[1] / "configs" / "mnist_bn.yaml"))
        rng = np.random.default_rng(0)
        for layer in bn_layers(model):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2, size=layer.moving_variance.shape).astype(np.float32))
        source = "configs/mnist_bn.yaml (random weights)"
    unfolded, _, _ = standard_model(model, fold_bn=False)
    folded, names, _ = standard_model(model, fold_bn=True)
    x = tf.constant(np.random.default_rng(1).uniform(size=(args.batch, 28, 28, 1)).astype(np.float32))
    fns = {"unfolded": tf.function(lambda t: unfolded(t, training=False)),
           "folded": tf.function(lambda t: folded(t, training=False))}
    diff = float(np.abs(fns["unfolded"](x).numpy() - fns["folded"](x).numpy()).max())
    for fn in fns.values():  # warm-up: tracing and first-run allocations
        images_per_s(fn, x, 0.5)
    rates = {k: [] for k in fns}
    for _ in range(args.rounds):  # alternate, so drifts in machine speed hit both
        for k, fn in fns.items():
            rates[k].append(images_per_s(fn, x, args.seconds))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"model: {source}; BN folded: {', '.join(names)}; max |logit diff| {diff:.2e}")
    print(f"batch {args.batch}, {args.rounds} alternating rounds of {args.seconds}s, median images/s:")
    for k in fns:
        print(f"  {k:9s} {med[k]:9.0f}   (rounds: {', '.join(f'{r:.0f}' for r in rates[k])})")
    print(f"folded / unfolded: {med['folded'] / med['unfolded']:.2f}x")


if __name__ == "__main__":
    main()
