"""Step time of two training setups side by side, in one process, their compiled calls alternating.

This machine's speed drifts by up to 2x over tens of seconds (BENCHMARKS.md), so two figures taken a minute
apart cannot be compared. Here both trainers (convbn's own: data in memory, the in-graph training call of
train/steps.py) are built in one process and their calls of `train.steps_per_execution` steps alternate, round
after round; each side's figure is the median over its calls, and the ratio is the median of the per-round ratios
(each round's two calls ran within a second of each other).

    python bench/step_time.py --config NEW.yaml [--set K=V ...] --against OLD.yaml [--against-set K=V ...]
                              [--rounds 30]
    python bench/step_time.py --config configs/mnist_bn.yaml --set train.precision=float32 --against-peak

(mnist_bn runs ten steps per call itself since issue 40, and `precision: auto` would measure a bfloat16 share.)

`--against-peak` alternates the trainer's calls with bench/peak.py's matmul probe instead (float32, or bfloat16 for
a bfloat16 trainer): the step's share of the matmul peak, each round's share taken from two calls a second apart.

To compare with an older commit's config: `git show COMMIT:configs/mnist_fast.yaml > /tmp/old.yaml`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_caller(config, overrides):
    """(call(): ms per step of one compiled call, description, FLOPs of a step, steps per call, compute dtype) for a
    config's trainer (also bench/step_profile.py's)."""
    import tensorflow as tf

    from convbn_cli.config import load_config
    from convbn_cli.data import fetch
    from convbn_cli.data.pipeline import epoch_order
    from convbn_cli.train import distribute
    from convbn_cli.train.loop import Trainer

    cfg = load_config(config, [*overrides, f"output.root={tempfile.mkdtemp()}"])
    trainer = Trainer(cfg, distribute.make_strategy(cfg), [], log=lambda m: None)
    trainer.setup(fetch(cfg.data.dataset, log=lambda m: None))
    k = cfg.train.steps_per_execution
    order = tf.constant(epoch_order(trainer.splits.size("train"), trainer.global_batch, cfg.train.seed, 0))
    state = {"start": 0}

    def call() -> float:
        start = state["start"] % (trainer.steps - k)
        t0 = time.perf_counter()
        trainer.train_steps(order, tf.constant(0, tf.int64), tf.constant(start), tf.constant(k))
        trainer.sums["loss"].numpy()  # wait for the call
        state["start"] += k
        return (time.perf_counter() - t0) / k * 1000

    sys.path.insert(0, str(ROOT / "bench"))
    from peak import training_flops

    name = f"{Path(config).name} {' '.join(overrides)} ({trainer.precision}, batch {trainer.global_batch})"
    dtype = "bfloat16" if trainer.precision == "mixed_bfloat16" else "float32"
    return call, name, training_flops(cfg) * trainer.global_batch, k, dtype


def make_peak_caller(dtype: str, matmuls: int = 8):
    """The matmul probe as a side: (call(): ms per matmul over `matmuls` of them, description, FLOPs of one)."""
    import tensorflow as tf
    from peak import N, matmul_fn

    fn, flops = matmul_fn(getattr(tf, dtype))

    def call() -> float:
        t0 = time.perf_counter()
        for _ in range(matmuls):
            fn()
        return (time.perf_counter() - t0) / matmuls * 1000

    return call, f"the {dtype} matmul peak probe (bench/peak.py; its step: one {N}x{N} matmul)", flops, 1, dtype


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_fast.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    other = ap.add_mutually_exclusive_group(required=True)
    other.add_argument("--against", help="the other config (e.g. an older commit's)")
    other.add_argument("--against-peak", action="store_true", help="the matmul peak probe as the other side")
    ap.add_argument("--against-set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    from convbn_cli.tf_setup import import_tensorflow

    import_tensorflow()
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import cpu_info

    new = make_caller(args.config, args.set)
    sides = [make_peak_caller(new[4]) if args.against_peak else make_caller(args.against, args.against_set), new]
    for call, *_ in sides:  # warm-up: first execution of every kernel
        call(), call()
    times = [[], []]
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate who goes first
        for i in order:
            times[i].append(sides[i][0]())
    print(cpu_info())
    for (_, name, flops, *_), ms in zip(sides, times):
        med = statistics.median(ms)
        print(f"{name}: {med:.1f} ms/step (median of {len(ms)} calls; {min(ms):.1f}-{max(ms):.1f}), "
              f"{flops / med / 1e6:.0f} GFLOP/s")
    ratios = [a / b for a, b in zip(*times)]
    if args.against_peak:  # GFLOP/s of the step over GFLOP/s of the probe, round by round
        shares = [r * sides[1][2] / sides[0][2] for r in ratios]
        q = statistics.quantiles(shares, n=4)
        print(f"{sides[1][1]}: {statistics.median(shares):.0%} of {sides[0][1]} (median of per-round shares; "
              f"quartiles {q[0]:.0%}-{q[2]:.0%})")
        return
    print(f"step time, {sides[0][1]} / {sides[1][1]}: {statistics.median(ratios):.2f}x (median of per-round ratios; "
          f"quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}-{statistics.quantiles(ratios, n=4)[2]:.2f})")


if __name__ == "__main__":
    main()
