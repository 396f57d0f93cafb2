"""Time to 99% MNIST test accuracy: configs/mnist_fast.yaml trained by `convbn_cli.train` in fresh processes.

For each seed a fresh Python process runs convbn's own training (data from the cache, model build, tracing,
tf.data pipeline, per-epoch checkpoints: all counted) and, every K steps, pauses the clock to evaluate on the
MNIST test set; the run stops the first time test accuracy reaches the target. Evaluation time is excluded
from the training time and reported apart. The schedule is the config's own (its total length is fixed in
advance), so stopping early never changes the learning rates the model saw; nothing is tuned on the test set
by this script. `--split val` measures on a validation split carved from the training set instead (the last
`data.val_split` of it; 0.1 when the config has none): that is how recipes are chosen, the test set only reports.

    python bench/time_to_accuracy.py [--config configs/mnist_fast.yaml] [--seeds 0 1 2 3 4] [--every 50]
                                     [--target 0.99] [--split test|val] [--set KEY=VALUE ...]
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


def one_run(config, seed, every, target, out, overrides=(), split="test"):
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
    if split == "val" and cfg.data.val_split == 0:
        cfg = load_config(config, [*overrides, f"train.seed={seed}", f"output.root={cfg.output.root}",
                                   "data.val_split=0.1"])
    state = {"eval_s": 0.0, "evals": [], "first_step_s": None}
    t0 = time.perf_counter()
    t_import = t0 - t_process

    calls = []  # (step, time the call back began, time it ended): the gaps between are training calls

    def check(step, model):
        now = time.perf_counter()
        if state["first_step_s"] is None:  # data, model build, tracing and the first compiled call
            state["first_step_s"] = now - t0
        try:
            evaluate_now(step, model)
        finally:
            calls.append((step, now, time.perf_counter()))

    from convbn_cli.data import fetch
    from convbn_cli.data.pipeline import steps_per_epoch

    arrays = fetch(cfg.data.dataset, log=lambda m: None)  # read once (counted, as train() would read it)
    splits = make_splits(arrays, cfg)
    last = steps_per_epoch(splits.size("train"), cfg.data.batch_size) * cfg.train.epochs

    def evaluate_now(step, model):
        # every `every` steps (a call may run several: whenever one crosses a multiple), and after the last step
        # (before train() finishes up)
        previous = calls[-1][0] if calls else 0
        if step // every == previous // every and step != last:
            return
        t_eval = time.perf_counter()
        if "evaluate" not in state:
            state["evaluate"] = Evaluator(model, cfg.dataset.num_classes)
            state["test"] = eval_dataset(splits, cfg, split, 2000)
        acc = state["evaluate"](state["test"])["accuracy"]
        state["evals"].append((step, acc))
        state["eval_s"] += time.perf_counter() - t_eval
        if acc >= target:
            raise Reached

    reached = False
    try:
        result = train(cfg, data=arrays, log=lambda m: None, progress=False, on_step=check)
        final = result.test_acc if split == "test" else state["evaluate"](state["test"])["accuracy"]
        state["evals"].append(("end", final))
        reached = final >= target
    except Reached:
        reached = True
    train_s = time.perf_counter() - t0 - state["eval_s"]
    # where the time went: the training calls (gaps between call backs) against the epoch boundaries, where
    # validation, checkpoints, BN statistics, TensorBoard and plots run between two calls
    gaps = [(b[0] - a[0], b[1] - a[2]) for a, b in zip(calls, calls[1:])]
    typical = statistics.median(g / max(n, 1) for n, g in gaps) if gaps else 0.0
    steps_s = sum(min(g, 2 * typical * n) for n, g in gaps)
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import training_flops

    gflops = training_flops(cfg) * cfg.data.batch_size / typical / 1e9 if typical else 0.0
    breakdown = {"first_call_s": state["first_step_s"], "calls_s": steps_s, "gflops": gflops,
                 "between_epochs_s": sum(g for _, g in gaps) - steps_s,
                 "ms_per_step": 1000 * typical, "steps": calls[-1][0] if calls else 0}
    Path(out).write_text(json.dumps({"seed": seed, "reached": reached, "train_s": train_s, "eval_s": state["eval_s"],
                                     "import_s": t_import, "breakdown": breakdown,
                                     "accuracy": state["evals"][-1][1],
                                     "step": state["evals"][-1][0], "evals": state["evals"]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_fast.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="measure on the test set (reporting) or on a validation split (choosing a recipe)")
    ap.add_argument("--every", type=int, default=50, help="evaluate every K training steps")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (to try recipes)")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        one_run(args.config, int(args._one[0]), args.every, args.target, args._one[1], args.set, args.split)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import cpu_info  # noqa: E402  (bench/peak.py: CPU model and the flags that matter)

    print(cpu_info(), flush=True)
    rows = []
    for seed in args.seeds:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--config", args.config, "--every", str(args.every),
                            "--target", str(args.target), "--split", args.split, "--_one", str(seed), f.name,
                            "--set", *args.set],
                           check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            row = json.loads(Path(f.name).read_text())
            row["process_s"] = time.perf_counter() - t0
            rows.append(row)
            trail = " ".join(f"{s}:{a:.4f}" for s, a in row["evals"])
            print(f"seed {seed}: evaluations (step:accuracy) {trail}")
            b = row["breakdown"]
            print(f"seed {seed}: time: first call done after {b['first_call_s']:.1f}s (data, model, tracing); "
                  f"{b['steps']} steps at {b['ms_per_step']:.1f} ms = {b['gflops']:.0f} GFLOP/s ({b['calls_s']:.1f}s); "
                  f"{b['between_epochs_s']:.1f}s more between calls (epoch ends: validation, checkpoints, files)")
            print(f"seed {seed}: {'reached' if row['reached'] else 'MISSED'} {row['accuracy']:.4f} at step "
                  f"{row['step']} after {row['train_s']:.1f}s of training (+{row['eval_s']:.1f}s evaluation, "
                  f"{row['import_s']:.1f}s imports; process {row['process_s']:.1f}s)", flush=True)
    med = statistics.median(r["train_s"] for r in rows)
    print(f"{Path(args.config).name} {' '.join(args.set)}: median training time to {args.target:.1%} {args.split} "
          f"accuracy: {med:.1f}s over {len(rows)} seeds; every seed reached it: {all(r['reached'] for r in rows)}")


if __name__ == "__main__":
    main()
