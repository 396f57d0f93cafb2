"""How long the `convbn` command makes a person wait where it has nothing to compute (issue 24):

1. a wrong path: `convbn eval runs/missing` (exit 2), from start to exit, N times;
2. the end of a training: `convbn train seed_toy train.epochs=1`, from its last line to the process's exit, and the
   whole run.

    python bench/command_latency.py [--repeat 5] [--train-args train.epochs=1 ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from short_runs import cpu


def timed(args, cwd):
    """(seconds to the exit, seconds from the last line to the exit, exit code, last line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd)
    last, text = t0, ""
    for line in proc.stdout:
        last, text = time.perf_counter(), line.rstrip()
    proc.wait()
    end = time.perf_counter()
    return end - t0, end - last, proc.returncode, text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--train-args", nargs="*", default=["train.epochs=1", "--no-progress"])
    args = parser.parse_args()
    print(f"machine: {cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        errors = [timed(["eval", "runs/missing"], tmp) for _ in range(args.repeat)]
        assert all(code == 2 for _, _, code, _ in errors), errors
        print(f"convbn eval runs/missing: exit 2 after {statistics.median(e[0] for e in errors):.2f} s (median of "
              f"{args.repeat}; max {max(e[0] for e in errors):.2f} s): {errors[0][3]}")
        total, tail, code, line = timed(["train", "seed_toy", *args.train_args], tmp)
        print(f"convbn train seed_toy {' '.join(args.train_args)}: exit {code} after {total:.1f} s, "
              f"{tail:.2f} s after its last line ({line[:60]}...)")


if __name__ == "__main__":
    main()
