"""Step time of two training setups side by side, in one process, their compiled calls alternating.

This machine's speed drifts by up to 2x over tens of seconds (BENCHMARKS.md), so two figures taken a minute
apart cannot be compared. Here both trainers (convbn's own: data in memory, the in-graph training call of
train/loop.py) are built in one process and their calls of `train.steps_per_execution` steps alternate, round
after round; each side's figure is the median over its calls, and the ratio is the median of the per-round ratios
(each round's two calls ran within a second of each other).

    python bench/step_time.py --config NEW.yaml [--set K=V ...] --against OLD.yaml [--against-set K=V ...]
                              [--rounds 30]

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
    """(call(): ms per step of one compiled call, description, FLOPs of a step, steps per call) for a config's
    trainer (also bench/step_profile.py's)."""
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
    return call, name, training_flops(cfg) * trainer.global_batch, k


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_fast.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--against", required=True, help="the other config (e.g. an older commit's)")
    ap.add_argument("--against-set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    from convbn_cli.tf_setup import import_tensorflow

    import_tensorflow()
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import cpu_info

    sides = [make_caller(args.against, args.against_set), make_caller(args.config, args.set)]
    for call, *_ in sides:  # warm-up: first execution of every kernel
        call(), call()
    times = [[], []]
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate who goes first
        for i in order:
            times[i].append(sides[i][0]())
    print(cpu_info())
    for (_, name, flops, _), ms in zip(sides, times):
        med = statistics.median(ms)
        print(f"{name}: {med:.1f} ms/step (median of {len(ms)} calls; {min(ms):.1f}-{max(ms):.1f}), "
              f"{flops / med / 1e6:.0f} GFLOP/s")
    ratios = [a / b for a, b in zip(*times)]
    print(f"step time, {sides[0][1]} / {sides[1][1]}: {statistics.median(ratios):.2f}x (median of per-round ratios; "
          f"quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}-{statistics.quantiles(ratios, n=4)[2]:.2f})")


if __name__ == "__main__":
    main()
