"""Time to 99% MNIST test accuracy: configs/mnist_fast.yaml trained by `convbn_cli.train` in fresh processes.

For each seed a fresh Python process runs convbn's own training (data from the cache, model build, tracing,
tf.data pipeline, per-epoch checkpoints: all counted) and, every K steps, pauses the clock to evaluate on the
MNIST test set; the run stops the first time test accuracy reaches the target. Evaluation time is excluded
from the training time and reported apart. The schedule is the config's own (its total length is fixed in
advance), so stopping early never changes the learning rates the model saw; nothing is tuned on the test set
by this script.

    python bench/time_to_accuracy.py [--config configs/mnist_fast.yaml] [--seeds 0 1 2] [--every 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Reached(Exception):
    pass


def one_run(config, seed, every, target, out, overrides=()):
    """Runs inside the fresh process."""
    t_process = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from convbn_cli.tf_setup import import_tensorflow

    import_tensorflow()
    from convbn_cli.config import load_config
    from convbn_cli.data.pipeline import eval_dataset, make_splits
    from convbn_cli.model import Evaluator
    from convbn_cli.train import train

    cfg = load_config(config, [*overrides, f"train.seed={seed}", f"output.root={tempfile.mkdtemp()}"])
    state = {"eval_s": 0.0, "evals": []}
    t0 = time.perf_counter()
    t_import = t0 - t_process

    def check(step, model):
        if step % every:
            return
        t_eval = time.perf_counter()
        if "evaluate" not in state:
            from convbn_cli.data import fetch

            state["evaluate"] = Evaluator(model, cfg.dataset.num_classes)
            splits = make_splits(fetch(cfg.data.dataset, log=lambda m: None), cfg)
            state["test"] = eval_dataset(splits, cfg, "test", 2000)
        acc = state["evaluate"](state["test"])["accuracy"]
        state["evals"].append((step, acc))
        state["eval_s"] += time.perf_counter() - t_eval
        if acc >= target:
            raise Reached

    reached = False
    try:
        result = train(cfg, log=lambda m: None, progress=False, on_step=check)
        state["evals"].append(("end", result.test_acc))
        reached = result.test_acc >= target
    except Reached:
        reached = True
    train_s = time.perf_counter() - t0 - state["eval_s"]
    Path(out).write_text(json.dumps({"seed": seed, "reached": reached, "train_s": train_s, "eval_s": state["eval_s"],
                                     "import_s": t_import, "accuracy": state["evals"][-1][1],
                                     "step": state["evals"][-1][0], "evals": state["evals"]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_fast.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--every", type=int, default=50, help="evaluate every K training steps")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (to try recipes)")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        one_run(args.config, int(args._one[0]), args.every, args.target, args._one[1], args.set)
        return
    rows = []
    for seed in args.seeds:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--config", args.config, "--every", str(args.every),
                            "--target", str(args.target), "--_one", str(seed), f.name, "--set", *args.set],
                           check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            row = json.loads(Path(f.name).read_text())
            row["process_s"] = time.perf_counter() - t0
            rows.append(row)
            trail = " ".join(f"{s}:{a:.4f}" for s, a in row["evals"])
            print(f"seed {seed}: evaluations (step:accuracy) {trail}")
            print(f"seed {seed}: {'reached' if row['reached'] else 'MISSED'} {row['accuracy']:.4f} at step "
                  f"{row['step']} after {row['train_s']:.1f}s of training (+{row['eval_s']:.1f}s evaluation, "
                  f"{row['import_s']:.1f}s imports; process {row['process_s']:.1f}s)", flush=True)
    med = statistics.median(r["train_s"] for r in rows)
    print(f"{Path(args.config).name}: median training time to {args.target:.1%} test accuracy: {med:.1f}s over "
          f"{len(rows)} seeds; every seed reached it: {all(r['reached'] for r in rows)}")


if __name__ == "__main__":
    main()
