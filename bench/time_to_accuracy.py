"""Time to 99% MNIST test accuracy, by the timing protocol of BENCHMARKS.md ("Timing protocol").

Two readings. `--strict` (the headline, docs/record.md): the whole schedule fixed in advance is trained, and the
accuracy is that of the final weights (moving BN statistics) on the 10,000 test images, evaluated once after the
last step; at least 25 seeds, reported as mean, standard deviation, minimum and the share of seeds at or above
the target (airbench's and the CIFAR-10 speedruns' reading). Without it, the first-crossing reading: the clock
stops at the first of the evaluations every `--every` steps that reaches the target, a selection on the test set
(kept as a secondary column; under --strict the same evaluations are made, the clock paused, and never stop it).

For each seed a fresh Python process trains configs/mnist_fast.yaml (or --config) through convbn's own `train()`.
What is timed, as the protocol says:
- the training: from the first training step to the last one run, with the epoch ends' work (validation,
  checkpoints, files) inside it; the clock is paused while the script evaluates (every `--every` steps, and once
  after the last step) and stops the first time the accuracy reaches the target;
- reported apart, never counted: imports, reading the cached dataset into memory, building the model and
  optimizer ("setup"), and compiling the training call ("compile": one call that runs zero steps, so tracing and
  graph optimization happen before the clock starts);
- the accuracy is that of the weights at that step (moving BN statistics, as `convbn eval` would measure).
The schedule's length is the config's own, fixed in advance, so stopping early never changes the learning rates
the model saw. `--split val` measures on a validation split carved from the training set (the last 10% unless
the config has one): recipes are chosen that way, the test set only reports. A headline figure takes at least 10
seeds (the default); the machine's peak probe (bench/peak.py) runs first and is printed beside the result.

    python bench/time_to_accuracy.py [--strict] [--config configs/mnist_fast.yaml] [--seeds 0 1 ... 9] [--every 25]
                                     [--target 0.99] [--split test|val] [--no-peak] [--set KEY=VALUE ...]
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


def one_run(config, seed, every, target, out, overrides=(), split="test", strict=False):
    """Runs inside the fresh process; writes its measurements to `out` (JSON)."""
    t_process = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from convbn_cli.tf_setup import import_tensorflow

    tf = import_tensorflow()
    from convbn_cli.config import load_config
    from convbn_cli.data import fetch
    from convbn_cli.data.pipeline import epoch_order, eval_dataset, make_splits, steps_per_epoch
    from convbn_cli.model import Evaluator
    from convbn_cli.train import train

    cfg = load_config(config, [*overrides, f"train.seed={seed}", f"output.root={tempfile.mkdtemp()}"])
    if split == "val" and cfg.data.val_split == 0:
        cfg = load_config(config, [*overrides, f"train.seed={seed}", f"output.root={cfg.output.root}",
                                   "data.val_split=0.1"])
    t_imported = time.perf_counter()
    arrays = fetch(cfg.data.dataset, log=lambda m: None)  # in memory before the clock starts (the protocol)
    splits = make_splits(arrays, cfg)
    last = steps_per_epoch(splits.size("train"), cfg.data.batch_size) * cfg.train.epochs
    clock = {"eval_s": 0.0, "evals": [], "calls": []}  # calls: (step, call back began, call back ended)

    class Clock:
        """Starts the clock once the training call is compiled; pauses it while evaluating."""

        def on_start(self, trainer):
            clock["setup_s"] = time.perf_counter() - clock["t_train"]
            t0 = time.perf_counter()
            if trainer.train_steps is not None:  # one call of zero steps: tracing and graph optimization
                # the epoch's order as the trainer makes it: the same shape and dtype, so no second trace
                order = tf.constant(epoch_order(splits.size("train"), trainer.global_batch, seed, 0))
                trainer.train_steps(order, tf.constant(0, tf.int64), tf.constant(0), tf.constant(0))
            clock["compile_s"] = time.perf_counter() - t0
            clock["t0"] = time.perf_counter()

        def on_step(self, trainer, step):
            now = time.perf_counter()
            try:
                evaluate_now(step, trainer.model)
            finally:
                clock["calls"].append((step, now, time.perf_counter()))

    def evaluate_now(step, model):
        # every `every` steps (a call may run several: whenever one crosses a multiple), and after the last step
        previous = clock["calls"][-1][0] if clock["calls"] else 0
        if step // every == previous // every and step != last:
            return
        t_eval = time.perf_counter()
        if "evaluate" not in clock:
            clock["evaluate"] = Evaluator(model, cfg.dataset.num_classes)
            clock["data"] = eval_dataset(splits, cfg, split, 2000)
        acc = clock["evaluate"](clock["data"])["accuracy"]
        clock["evals"].append((step, acc))
        clock["eval_s"] += time.perf_counter() - t_eval
        if acc >= target and "crossed" not in clock:
            clock["crossed"] = (step, time.perf_counter() - clock["t0"] - clock["eval_s"])
        if acc >= target and not strict:
            raise Reached

    reached = False
    clock["t_train"] = time.perf_counter()
    try:
        train(cfg, data=arrays, log=lambda m: None, progress=False, subscribers=[Clock()])
    except Reached:
        reached = True
    if strict:  # the final weights' accuracy, the last evaluation (after the last step)
        assert clock["evals"][-1][0] == last, clock["evals"][-1]
        reached = clock["evals"][-1][1] >= target
    # to the end of the last training call (its evaluation subtracted): an epoch end after the last step (validation,
    # checkpoints) and finishing the run (precise BN, testing, files) are not training steps
    train_s = clock["calls"][-1][2] - clock["t0"] - clock["eval_s"]
    calls = clock["calls"]
    # the training calls alone: the gaps between call backs (an epoch end's files sit in one gap: the median per
    # step excludes it)
    gaps = [(b[0] - a[0], b[1] - a[2]) for a, b in zip(calls, calls[1:])]
    typical = statistics.median(g / max(n, 1) for n, g in gaps) if gaps else 0.0
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import training_flops

    gflops = training_flops(cfg) * cfg.data.batch_size / typical / 1e9 if typical else 0.0
    Path(out).write_text(json.dumps({
        "seed": seed, "reached": reached, "train_s": train_s, "eval_s": clock["eval_s"],
        "import_s": t_imported - t_process, "setup_s": clock["setup_s"] + (clock["t_train"] - t_imported),
        "compile_s": clock["compile_s"], "ms_per_step": 1000 * typical, "gflops": gflops,
        "first_call_s": calls[0][1] - clock["t0"], "slowest_calls_s": sorted(g for _, g in gaps)[-5:],
        "accuracy": clock["evals"][-1][1], "step": clock["evals"][-1][0], "evals": clock["evals"],
        "steps": last, "strict": strict, "first_crossing": clock.get("crossed")}))


def strict_summary(args, rows) -> None:
    """The strict reading: the whole schedule's training time, and the final accuracy's mean, spread, minimum and
    share at the target; the first crossings (a selection on the test set) apart."""
    acc = [r["accuracy"] for r in rows]
    times = [r["train_s"] for r in rows]
    crossings = [r["first_crossing"][1] for r in rows if r["first_crossing"]]
    at_target = sum(a >= args.target for a in acc)
    print(f"{Path(args.config).name} {' '.join(args.set)} (strict: {rows[0]['steps']} steps, final weights, "
          f"{args.split} set evaluated once after the last step), {len(rows)} seeds: accuracy mean "
          f"{statistics.mean(acc):.2%} (std {statistics.stdev(acc) if len(acc) > 1 else 0.0:.2%}, min {min(acc):.2%}), "
          f"{at_target}/{len(rows)} seeds >= {args.target:.1%}; training time median {statistics.median(times):.2f}s "
          f"(mean {statistics.mean(times):.2f}s, {min(times):.2f}-{max(times):.2f}s), median step "
          f"{statistics.median(r['ms_per_step'] for r in rows):.1f} ms")
    if crossings:
        print(f"secondary (first crossing of {args.target:.1%} among evaluations every {args.every} steps, a "
              f"selection on the {args.split} set): median {statistics.median(crossings):.2f}s, "
              f"{len(crossings)}/{len(rows)} seeds crossed")


def peak_probe() -> str:
    """The machine's reference speeds (bench/peak.py, in its own process, before the runs), as one line."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "peak.py"), "--seconds", "1", "--json"],
                         capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    probe = json.loads(out.stdout)
    parts = [f"{k} {statistics.median(v):.0f}" for k, v in probe.items() if isinstance(v, list)]
    return "peak probe (GFLOP/s, median of 3 windows): " + ", ".join(parts)


def report(seed, row):
    trail = " ".join(f"{s}:{a:.4f}" for s, a in row["evals"])
    print(f"seed {seed}: evaluations (step:accuracy) {trail}")
    what = ("final" if row.get("strict") else "reached") if row["reached"] else "MISSED"
    print(f"seed {seed}: {what} {row['accuracy']:.4f} at step {row['step']} "
          f"after {row['train_s']:.2f}s of training ({row['ms_per_step']:.1f} ms/step = {row['gflops']:.0f} "
          f"GFLOP/s; first call {row['first_call_s']:.2f}s, slowest calls "
          f"{', '.join(f'{g:.2f}' for g in row['slowest_calls_s'][-3:])}s); apart: compile {row['compile_s']:.1f}s, "
          f"setup {row['setup_s']:.1f}s, evaluation {row['eval_s']:.1f}s, imports {row['import_s']:.1f}s; "
          f"process {row['process_s']:.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_fast.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="measure on the test set (reporting) or on a validation split (choosing a recipe)")
    ap.add_argument("--every", type=int, default=25, help="evaluate every K training steps")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--no-peak", action="store_true", help="skip the peak probe (choosing recipes)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (to try recipes)")
    ap.add_argument("--strict", action="store_true",
                    help="train the whole schedule; the final weights' accuracy, evaluated once (the headline)")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        one_run(args.config, int(args._one[0]), args.every, args.target, args._one[1], args.set, args.split,
                args.strict)
        return
    if args.strict and len(args.seeds) < 25 and args.split == "test":
        print(f"note: {len(args.seeds)} seeds; a strict headline takes at least 25 (--seeds $(seq 0 24))")
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import cpu_info  # noqa: E402  (bench/peak.py: CPU model and the flags that matter)

    print(cpu_info(), flush=True)
    probe = None if args.no_peak else peak_probe()
    if probe:
        print(probe, flush=True)
    rows = []
    for seed in args.seeds:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--config", args.config, "--every", str(args.every),
                            "--target", str(args.target), "--split", args.split, "--_one", str(seed), f.name,
                            *(["--strict"] if args.strict else []), "--set", *args.set],
                           check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            row = json.loads(Path(f.name).read_text())
        row["process_s"] = time.perf_counter() - t0
        rows.append(row)
        report(seed, row)
    if args.strict:
        strict_summary(args, rows)
        if probe:
            print(probe)
        return
    times = sorted(r["train_s"] for r in rows)
    print(f"{Path(args.config).name} {' '.join(args.set)}: median training time to {args.target:.1%} {args.split} "
          f"accuracy {statistics.median(times):.2f}s over {len(rows)} seeds (fastest {times[0]:.2f}s, slowest "
          f"{times[-1]:.2f}s); every seed reached it: {all(r['reached'] for r in rows)}; median step "
          f"{statistics.median(r['ms_per_step'] for r in rows):.1f} ms")
    if probe:
        print(probe)


if __name__ == "__main__":
    main()
