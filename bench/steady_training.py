"""Is training steady? Windows of 20 training steps of the mnist_bn net, timed one by one, with the CPU time each
thread spent in every window, and the machine's conv probe (bench/peak.py) before and after.

    python bench/steady_training.py [--windows 40] [--setup convbn|tf-default] [--progress] [--json]

--setup picks how tf.data is configured: `convbn` (what `convbn train` does, the default: autotuning off,
fixed parallelism) or `tf-default` (tf.data's autotuning on, as convbn ran before the fix); a window counts as
steady when its images/s is within 15% of the median. For every window the CPU seconds of each thread
(grouped by name: tf_data_private, tf_inter_op, tf_intra_op, python main, ...) are read from /proc, so a
slow window says where the time went.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STEPS_PER_WINDOW = 20
BATCH = 128


def thread_cpu() -> Counter:
    """CPU seconds per thread name of this process so far (Linux /proc; empty elsewhere)."""
    out, tick = Counter(), os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = "main" if task.name == str(os.getpid()) else (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[_group(name)] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def process_counters() -> dict:
    """This process's user and system CPU seconds and page faults so far (Linux /proc/self/stat)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"user_s": int(fields[11]) / tick, "system_s": int(fields[12]) / tick, "minor_faults": int(fields[7]),
            "major_faults": int(fields[9])}


def machine_counters() -> dict:
    """Whole-machine CPU seconds: user, system, iowait, steal (the hypervisor's), from /proc/stat."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    tick = os.sysconf("SC_CLK_TCK")
    return {"m_user_s": (int(cpu[0]) + int(cpu[1])) / tick, "m_system_s": int(cpu[2]) / tick,
            "m_iowait_s": int(cpu[4]) / tick, "m_steal_s": int(cpu[7]) / tick}


def _delta(after: dict, before: dict) -> dict:
    return {k: round(after[k] - before[k], 3) for k in after}


def _group(name: str) -> str:
    # TensorFlow names its pool threads tf_<pool>; numbered suffixes are folded into one group
    return name.rstrip("0123456789_-") or name


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--setup", choices=["convbn", "tf-default"], default="convbn")
    ap.add_argument("--intra", type=int, default=None, help="TensorFlow intra-op threads (experiments)")
    ap.add_argument("--inter", type=int, default=None, help="TensorFlow inter-op threads (experiments)")
    ap.add_argument("--tfdata-threads", type=int, default=None, help="tf.data's private pool size (experiments)")
    ap.add_argument("--autotune", choices=["on", "off"], default=None, help="tf.data autotuning (experiments)")
    ap.add_argument("--progress", action="store_true", help="a tqdm bar as on a terminal (to stderr)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.setup == "tf-default" and args.autotune is None:
        args.autotune = "on"  # tf.data's autotuning back on: the pipeline as convbn had it before the fix

    from convbn_cli.tf_setup import import_tensorflow

    tf = import_tensorflow()
    import peak

    from convbn_cli.config import load_config
    from convbn_cli.data import fetch
    from convbn_cli.data.pipeline import make_splits, train_dataset
    from convbn_cli.model import build_model
    from convbn_cli.train import distribute
    from convbn_cli.train.optim import make_optimizer
    from convbn_cli.train.steps import make_train_step

    cfg = load_config(ROOT / "configs" / "mnist_bn.yaml", [f"data.batch_size={BATCH}", "data.val_split=0",
                                                           "train.schedule.name=constant"])
    distribute.setup_devices(cfg)  # the thread settings convbn applies (train/distribute.py)
    if args.intra is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    probe_before = peak.conv_tf(1.0, 3)
    splits = make_splits(fetch("mnist", log=lambda m: None, progress=False), cfg)
    model = build_model(cfg)
    optimizer = make_optimizer(cfg.train, 10_000)
    step, sums = make_train_step(model, optimizer, cfg.train)
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=args.windows * STEPS_PER_WINDOW, unit="batch", file=sys.stderr)

    def batches():
        epoch = 0
        while True:
            ds = train_dataset(splits, cfg, epoch)
            if args.autotune:
                opts = tf.data.Options()
                opts.autotune.enabled = args.autotune == "on"
                ds = ds.with_options(opts)
            if args.tfdata_threads:
                opts = tf.data.Options()
                opts.threading.private_threadpool_size = args.tfdata_threads
                opts.threading.max_intra_op_parallelism = 1
                ds = ds.with_options(opts)
            yield from ds
            epoch += 1

    it = batches()
    for _ in range(10):  # warm-up: tracing, oneDNN primitives, the tf.data pipeline filling up
        step(*next(it))
    float(sums["count"].numpy())
    windows = []
    for _ in range(args.windows):
        cpu0, proc0, mach0, t0 = thread_cpu(), process_counters(), machine_counters(), time.perf_counter()
        longest = 0.0
        for _ in range(STEPS_PER_WINDOW):
            ts = time.perf_counter()
            step(*next(it))
            longest = max(longest, time.perf_counter() - ts)  # dispatch time (the step itself runs on)
            if bar is not None:
                bar.update(1)
        float(sums["count"].numpy())  # the host sync convbn's trainer makes every 20 steps
        dt = time.perf_counter() - t0
        cpu = thread_cpu() - cpu0
        windows.append({"images_per_s": STEPS_PER_WINDOW * BATCH / dt, "seconds": round(dt, 3),
                        "longest_call_s": round(longest, 3),
                        **_delta(process_counters(), proc0), **_delta(machine_counters(), mach0),
                        "cpu_s": {k: round(v, 3) for k, v in cpu.most_common(6)}, "threads": threading.active_count()})
    if bar is not None:
        bar.close()
    probe_after = peak.conv_tf(1.0, 3)
    rates = [w["images_per_s"] for w in windows]
    med = statistics.median(rates)
    steady = sum(abs(r / med - 1) <= 0.15 for r in rates)
    result = {"cpu": peak.cpu_info(), "setup": args.setup, "progress": args.progress,
              "tfdata_threads": args.tfdata_threads, "autotune": args.autotune,
              "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                             "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
              "median_images_per_s": med, "min_over_median": min(rates) / med, "max_over_median": max(rates) / med,
              "windows_within_15pct": steady, "windows": windows,
              "conv_probe_gflops_before": probe_before, "conv_probe_gflops_after": probe_after}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(result["cpu"])
    print(f"setup {args.setup}, threads {result['tf_threads']}, progress bar {'on' if args.progress else 'off'}")
    print("conv probe before: " + " ".join(f"{v:.0f}" for v in probe_before) + " GFLOP/s; after: "
          + " ".join(f"{v:.0f}" for v in probe_after))
    print("img/s per window: " + " ".join(f"{r:.0f}" for r in rates))
    print(f"median {med:.0f} img/s; min {min(rates) / med:.2f}x, max {max(rates) / med:.2f}x the median; "
          f"{steady}/{len(rates)} windows within 15%")
    slow = min(windows, key=lambda w: w["images_per_s"])
    fast = max(windows, key=lambda w: w["images_per_s"])
    for label, w in (("slowest", slow), ("fastest", fast)):
        print(f"{label} window: " + ", ".join(f"{k} {v}" for k, v in w.items() if k != "cpu_s")
              + f"; CPU s by thread: {w['cpu_s']}")


if __name__ == "__main__":
    main()
