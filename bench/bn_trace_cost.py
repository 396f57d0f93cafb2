"""What the BN trace (output.bn_trace, on by default) costs a training step: trace on against off, side by side in one
process (this machine's speed drifts: BENCHMARKS.md), on mnist_bn's step by default.

Both sides are convbn's own trainer (data in memory, the in-graph training call of train/steps.py; as
bench/step_time.py builds them). Off: the BN layers' batch-statistics variables removed before the step is traced,
so the step keeps nothing (model/batch_trace.py's record is a no-op) and nothing is read. On: the layers keep their
batch statistics in every step and the trace subscriber itself (train/trace.py's BNTrace) reads them after every
call, sampling every `output.bn_trace` steps as in training. Rounds alternate: each side runs a block of calls that
holds exactly one sample (`every` steps), the ratio is the median of the per-round ratios of the blocks' times.
Not counted: the trace file's write once per epoch and its two pictures at the end of the run.
`--tensorboard`: the trace side also writes each sample's TensorBoard summaries (train/events.py's TensorBoard
subscriber listening to the trace, as in training, where TensorBoard is always on), to a temporary folder.

    python bench/bn_trace_cost.py [--config configs/mnist_bn.yaml] [--set KEY=VALUE ...] [--every N] [--rounds 10]
                                  [--tensorboard]
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


def make_side(config, overrides, traced: bool, tensorboard: bool = False):
    """(block(): seconds for one block of calls, description, steps per block) for one side."""
    import tensorflow as tf

    from convbn_cli.config import load_config
    from convbn_cli.data import fetch
    from convbn_cli.data.pipeline import epoch_order
    from convbn_cli.model.batch_trace import ATTRIBUTE
    from convbn_cli.model.bn import bn_layers
    from convbn_cli.train import distribute
    from convbn_cli.train.loop import Trainer
    from convbn_cli.train.trace import BNTrace, sampling_interval

    cfg = load_config(config, [*overrides, f"output.root={tempfile.mkdtemp()}"])
    trainer = Trainer(cfg, distribute.make_strategy(cfg), [], log=lambda m: None)
    trainer.setup(fetch(cfg.data.dataset, log=lambda m: None))
    tracer = None
    if traced:
        tracer = BNTrace()
        tracer.on_start(trainer)  # a fresh run: the subscriber's own set-up, nothing read from disk
        if tensorboard:
            from types import SimpleNamespace

            from convbn_cli.train.events import TensorBoard

            # its set-up reads only the config and the run's tensorboard folder: a temporary one
            run = SimpleNamespace(tensorboard=Path(tempfile.mkdtemp()))
            TensorBoard(bn_trace=tracer).on_start(SimpleNamespace(cfg=cfg, run=run))
    else:
        for bn in bn_layers(trainer.model):
            object.__delattr__(bn, ATTRIBUTE)  # before the first trace of the step: it keeps nothing
    k = cfg.train.steps_per_execution
    every = sampling_interval(cfg.output.bn_trace or 1, trainer.steps)  # as the subscriber samples, both sides
    calls = max(1, -(-every // k))  # a block: the calls that cross one multiple of `every`
    order = tf.constant(epoch_order(trainer.splits.size("train"), trainer.global_batch, cfg.train.seed, 0))
    state = {"step": 0}

    def block() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            start = state["step"] % (trainer.steps - k)
            trainer.train_steps(order, tf.constant(0, tf.int64), tf.constant(start), tf.constant(k))
            state["step"] += k
            if tracer is not None:
                trainer.last_chunk = k
                tracer.on_step(trainer, state["step"])
        trainer.sums["loss"].numpy()  # wait for the last call
        return time.perf_counter() - t0

    label = ("on, with TensorBoard's summaries" if tensorboard else "on") if traced else "off"
    return block, f"trace {label} ({Path(config).name} {' '.join(overrides)}, every {every} steps)", calls * k


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_bn.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--every", type=int, default=None, help="output.bn_trace (default: the config's)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tensorboard", action="store_true", help="the trace side writes TensorBoard's bn/ summaries")
    args = ap.parse_args()
    from convbn_cli.tf_setup import import_tensorflow

    import_tensorflow()
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import cpu_info

    overrides = [*args.set, *([f"output.bn_trace={args.every}"] if args.every else [])]
    sides = [make_side(args.config, overrides, traced=False),
             make_side(args.config, overrides, traced=True, tensorboard=args.tensorboard)]
    for block, *_ in sides:  # warm-up: tracing and the first execution of every kernel
        block()
    times = [[], []]
    for r in range(args.rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate who goes first
            times[i].append(sides[i][0]())
    print(cpu_info())
    for (_, name, steps), seconds in zip(sides, times):
        ms = [s / steps * 1000 for s in seconds]
        print(f"{name}: {statistics.median(ms):.2f} ms/step (median of {len(ms)} blocks of {steps} steps; "
              f"{min(ms):.2f}-{max(ms):.2f})")
    ratios = [(on / sides[1][2]) / (off / sides[0][2]) for off, on in zip(*times)]  # per step
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"cost of the trace: {statistics.median(ratios) - 1:+.2%} of the step (median of per-round ratios on/off; "
          f"quartiles {q[0] - 1:+.2%} to {q[2] - 1:+.2%})")


if __name__ == "__main__":
    main()
