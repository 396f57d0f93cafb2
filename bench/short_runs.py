"""Short runs end at the accuracy their weights have (issue 22): `convbn train mnist_bn data.max_train=5000
train.epochs=1`, with the shipped decay 0.99 and with TF1's 0.999, over several seeds.

For each run it reports the test accuracy of the run's final model (what the summary prints and `convbn eval RUN`
opens), the same weights' test accuracy with each batch's own BN statistics (`convbn eval RUN --bn-stats batch`),
the test accuracy before precise BN (what a run without it ended at), which mechanism ran, and the wall time.

`--warmup` measures the alternative issue 22 named instead: a warm-up of the moving average, effective decay
min(decay, (1 + t) / (10 + t)) at BN update t (tf.train.ExponentialMovingAverage's num_updates), patched into
convbn's two BN layers for this process only; combine it with `--set train.precise_bn=off` to see it alone.

    python bench/short_runs.py [--seeds 0 1 2] [--decays 0.99 0.999] [--warmup] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return f"{model} ({' '.join(sorted(f for f in flags if f.startswith(('avx512_bf16', 'amx', 'avx2'))))})"


def use_warmup():
    """Make convbn build BN layers whose moving average warms up (see the module docstring)."""
    import tensorflow as tf

    from convbn_cli.model import builder
    from convbn_cli.model.fused_bn import FusedBatchNorm
    from convbn_cli.model.keras_bn import BatchNormalization

    def warm(cls):
        class Warm(cls):
            def build(self, input_shape):
                super().build(input_shape)
                self.decay = self.momentum
                self.updates_done = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                    name="updates_done", autocast=False)

            def call(self, inputs, training=None, **kwargs):
                if not (training and self.trainable):
                    return super().call(inputs, training=training, **kwargs)
                t = self.updates_done
                self.momentum = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))  # read by the parent's update
                try:
                    out = super().call(inputs, training=training, **kwargs)
                finally:
                    self.momentum = self.decay
                self.updates_done.assign_add(1.0)
                return out

        Warm.__name__ = f"Warmup{cls.__name__}"
        return Warm

    classes = {FusedBatchNorm: warm(FusedBatchNorm), BatchNormalization: warm(BatchNormalization)}
    original = builder.make_bn_layer

    def make(*args, **kwargs):
        layer = original(*args, **kwargs)
        return classes[type(layer)].from_config(layer.get_config())

    builder.make_bn_layer = make


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.99, 0.999])
    parser.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides")
    parser.add_argument("--warmup", action="store_true", help="BN moving averages with a warm-up of the decay")
    args = parser.parse_args()
    if args.warmup:
        use_warmup()

    from convbn_cli.analysis import evaluate
    from convbn_cli.config import load_config
    from convbn_cli.data import fetch
    from convbn_cli.train import train

    data = fetch("mnist", log=lambda m: None)
    print(f"machine: {cpu()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for decay in args.decays:
            for seed in args.seeds:
                overrides = ["data.max_train=5000", "train.epochs=1", f"model.bn.decay={decay}",
                             f"train.seed={seed}", f"output.root={tmp}", *args.set]
                cfg = load_config(ROOT / "configs" / "mnist_bn.yaml", overrides)
                t0 = time.perf_counter()
                result = train(cfg, data=data, log=lambda m: None, progress=False, warn=lambda m: None)
                seconds = time.perf_counter() - t0
                res = json.loads((result.run_dir / "results.json").read_text())
                opened = evaluate(result.run_dir, data=data)["accuracy"]
                batch = evaluate(result.run_dir, bn_stats="batch", data=data)["accuracy"]
                row = {"decay": decay, "seed": seed, "test_acc": res["test_acc"], "eval_acc": opened,
                       "batch_stats_acc": batch, "before": (res.get("before_precise_bn") or {}).get("test_acc"),
                       "mechanism": res["bn_statistics"]["mechanism"], "seconds": seconds}
                rows.append(row)
                before = f"{row['before']:.2%}" if row["before"] is not None else "-"
                print(f"decay {decay:<6g} seed {seed}: test {row['test_acc']:.2%} (eval opens {opened:.2%}), "
                      f"batch statistics {batch:.2%}, gap {batch - row['test_acc']:+.2%}; before precise BN "
                      f"{before}; {row['mechanism']}; {seconds:.1f} s", flush=True)
    worst = max(abs(r["batch_stats_acc"] - r["test_acc"]) for r in rows)
    print(f"largest |batch-statistics accuracy - test accuracy|: {worst:.2%} (target: <= 2 points)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
