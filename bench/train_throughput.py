"""Training throughput: convbn's training step vs the plain Keras 3 way (and PyTorch eager, if installed).

The same network, batch 128, the same number of steps. By default every contender runs in a fresh process of
its own (a warm-up run, then the timed run), contenders alternating round by round (their order reversed
every other round), and the machine's reference probe (bench/peak.py's 3x3 conv forward+backward) runs before
and after every round. A round whose probe fell below 85% of the median probe ran during one of the machine's
slow phases: it is reported and left out of the medians, not silently mixed in. `--same-process` runs every
contender in this one process instead (as before; PyTorch's OpenMP threads, spinning after their turn, then
slow down the others: see BENCHMARKS.md "Steady training").

    python bench/train_throughput.py [--net mnist_bn|classic|both] [--steps 100] [--rounds 7] [--same-process]
                                     [--contenders convbn,keras,...] [--per-call 10]
    python bench/train_throughput.py --profile [--net mnist_bn] [--contenders convbn,keras] [--steps 100]

`--profile`: instead of timing, each contender (a fresh process) trains its warm-up epoch, then one epoch under
TensorFlow's profiler; the op time of each part of the network (convolutions, BN, pooling, ...) per step is printed
side by side, with the wall time per step: where one step is faster than the other, and what each runs that the
other does not (TensorFlow contenders only).

Contenders:
  convbn   convbn's trainer: FusedBatchNorm on conv layers, `--per-call` steps per compiled call (default 10), the
           batches gathered inside the graph from the images in memory (train/steps.py, make_in_graph_steps)
  convbn-tfdata  convbn's compiled step, one call per step, fed by its tf.data pipeline (the trainer before
           issue 16; still its path under a tf.distribute strategy)
  convbn-bf16  `convbn` with train.precision: mixed_bfloat16 (bfloat16 compute, float32 variables and BN stats)
  keras    keras.Sequential with keras.layers.BatchNormalization, compile() with default settings, model.fit
           on in-memory NumPy arrays - what a user would write by hand (Keras 3 on a CPU-only machine: no XLA, the
           "auto" of jit_compile; BN as tf.nn.moments + tf.nn.batch_normalization, not TensorFlow's fused kernel)
  keras-xla  the same with compile(jit_compile=True)
  keras-spe  the same with compile(steps_per_execution=--per-call)
  torch    the same network in PyTorch eager mode on the CPU (only if torch is installed; never a dependency)
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convbn_cli.tf_setup import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.data.pipeline import batch_loader, epoch_order, make_splits, train_dataset  # noqa: E402
from convbn_cli.model import build_model  # noqa: E402
from convbn_cli.train.optim import make_optimizer  # noqa: E402
from convbn_cli.train.steps import make_in_graph_steps, make_train_step  # noqa: E402

BATCH = 128

# The classic network of the BN-on-conv question: 2 x (conv5x5-BN-ReLU-maxpool) + dense-BN-ReLU + dense.
CLASSIC = {
    "model": {"bn": {"decay": 0.99}, "layers": [
        {"type": "conv", "filters": 32, "kernel": 5}, {"type": "pool", "size": 2},
        {"type": "conv", "filters": 64, "kernel": 5}, {"type": "pool", "size": 2},
        {"type": "flatten"}, {"type": "dense", "units": 256, "activation": "relu", "bn": True},
        {"type": "dense", "units": 10}]},
    "train": {"optimizer": {"name": "adam", "lr": 0.001}},
    "data": {"batch_size": BATCH, "val_split": 0.0},
}


OVERRIDES = []  # --set KEY=VALUE: convbn's contenders only (a lever to try, e.g. model.data_format=channels_first)


def config(net, overrides=()):
    if net == "classic":
        return load_config(raw=CLASSIC, overrides=list(overrides)) if overrides else load_config(raw=CLASSIC)
    return load_config(ROOT / "configs" / "mnist_bn.yaml",
                       [f"data.batch_size={BATCH}", "data.val_split=0", "train.label_smoothing=0",
                        "train.schedule.name=constant", *overrides])


def real_mnist(n):
    """The first n real MNIST training images (from convbn's cache), else random ones of the same shape."""
    try:
        from convbn_cli.data import fetch

        a = fetch("mnist", log=lambda m: None, progress=False)
        return {"x_train": a["x_train"][:n], "y_train": a["y_train"][:n], "x_test": a["x_test"][:1],
                "y_test": a["y_test"][:1]}
    except Exception:  # noqa: BLE001  no cache and no network: the rate does not depend on the pixels
        return fake_mnist(n)


def fake_mnist(n):
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), "y_train": rng.integers(0, 10, n),
            "x_test": np.zeros((1, 28, 28), np.uint8), "y_test": np.zeros(1, np.int64)}


# --------------------------------------------------------------------------- contenders

PER_CALL = 10  # --per-call


def convbn_contender(cfg, arrays, steps, precision="float32"):
    """The trainer's own path: make_in_graph_steps, PER_CALL steps per call (as Trainer.calls runs it)."""
    bs = cfg.data.batch_size  # --set data.batch_size=256: the same images in fewer, larger steps
    steps = steps * BATCH // bs
    model = build_model(cfg, precision=precision)
    optimizer = make_optimizer(cfg.train, total_steps=10**6)
    train_step, _ = make_train_step(model, optimizer, cfg.train)
    splits = make_splits(arrays, cfg)
    train_steps = make_in_graph_steps(train_step.replica_step, batch_loader(splits, cfg), bs, cfg.train)
    epoch = [0]

    def run():
        epoch[0] += 1
        order = tf.constant(epoch_order(splits.size("train"), bs, cfg.train.seed, epoch[0]))
        done = 0
        while done < steps:
            k = min(PER_CALL, steps - done)
            train_steps(order, tf.constant(epoch[0], tf.int64), tf.constant(done), tf.constant(k))
            done += k
        float(optimizer.iterations.numpy())  # wait for the last step
        return steps * bs

    return run


def convbn_tfdata_contender(cfg, arrays, steps, precision="float32"):
    model = build_model(cfg, precision=precision)
    optimizer = make_optimizer(cfg.train, total_steps=10**6)
    train_step, _ = make_train_step(model, optimizer, cfg.train)
    splits = make_splits(arrays, cfg)
    epoch = [0]

    def run():
        epoch[0] += 1
        n = 0
        for x, y in train_dataset(splits, cfg, epoch[0]).take(steps):
            train_step(x, y)
            n += 1
        float(optimizer.iterations.numpy())  # wait for the last step
        return n * BATCH

    return run


def keras_layers(cfg):
    """The same network as plain Keras layers, as people write it: each planned layer's own Keras layer (Conv2D,
    Dense, pooling, Cropping2D... as convbn's builder makes them, model/layers.py), then Keras'
    BatchNormalization where convbn has its BN, then the activation (a block that pools before its BN: Conv2D,
    MaxPooling2D, BN, ReLU)."""
    from convbn_cli.config import plan_layers
    from convbn_cli.model.layers import keras_layer

    out = [keras.Input((28, 28, 1))]
    for p in plan_layers(cfg):
        out.append(keras_layer(p, "channels_last", None))
        if getattr(p.spec, "pool", 1) > 1:
            out.append(keras.layers.MaxPooling2D(p.spec.pool))
        if p.bn is not None:
            out.append(keras.layers.BatchNormalization(momentum=p.bn.decay, epsilon=p.bn.epsilon, center=p.bn.center,
                                                       scale=p.bn.scale))
        if p.activation:
            out.append(keras.layers.Activation(p.activation))
    return out


def keras_contender(cfg, arrays, steps, **compile_args):
    """compile_args: what a user could change in compile() (jit_compile, steps_per_execution); none by default."""
    model = keras.Sequential(keras_layers(cfg))
    model.compile(optimizer=keras.optimizers.Adam(cfg.train.optimizer.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  **compile_args)
    x = (arrays["x_train"][: steps * BATCH, :, :, None] / 255.0).astype(np.float32)
    y = arrays["y_train"][: steps * BATCH]

    def run(epochs=1):  # one fit() call for all the epochs, as a user writes it
        model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)
        return len(y) * epochs

    return run


def torch_contender(cfg, arrays, steps):
    import torch
    from torch import nn

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    layers, c, hw, flat = [], 1, 28, None
    for s in cfg.model.layers:
        if s.type == "crop" and s.border[0] != s.border[1] or s.type == "conv" and (s.pool > 1 or s.stride != [1, 1]):
            raise ValueError("the torch contender builds square crops and stride-1 convs without in-block pooling")
        if s.type == "crop":
            layers.append(nn.ZeroPad2d(-s.border[0]))  # negative padding crops
            hw -= 2 * s.border[0]
        elif s.type == "conv":
            k = s.kernel[0]
            layers += [nn.Conv2d(c, s.filters, k, padding=k // 2 if s.padding == "same" else 0, bias=False),
                       nn.BatchNorm2d(s.filters, momentum=0.01, eps=1e-3), nn.ReLU()]
            c = s.filters
            hw = hw if s.padding == "same" else hw - k + 1
        elif s.type == "pool":
            layers.append(nn.MaxPool2d(s.size[0]))
            hw //= s.size[0]
        elif s.type == "flatten":
            layers.append(nn.Flatten())
            flat = c * hw * hw
        elif s.type == "dropout":
            layers.append(nn.Dropout(s.rate))
        elif s.type == "dense":
            if s.bn is not None:
                layers += [nn.Linear(flat, s.units, bias=False), nn.BatchNorm1d(s.units, momentum=0.01, eps=1e-3),
                           nn.ReLU()]
            else:
                layers.append(nn.Linear(flat, s.units))
            flat = s.units
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.optimizer.lr)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy((arrays["x_train"][: steps * BATCH, None] / 255.0).astype(np.float32))
    y = torch.from_numpy(arrays["y_train"][: steps * BATCH].astype(np.int64))

    def run():
        model.train()
        perm = torch.randperm(len(y))
        for i in range(steps):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        return steps * BATCH

    return run


def measure(run):
    t0 = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - t0)


def bench(net, steps, rounds, names):
    cfg = config(net)
    arrays = fake_mnist(steps * BATCH)
    contenders = {}
    for name in names:
        try:
            contenders[name] = make_contender(name, cfg, arrays, steps)
        except ImportError:  # torch not installed
            pass
    for run in contenders.values():  # warm-up: tracing, allocations
        run()
    rates = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            rates[name].append(measure(run))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nnetwork: {net} ({sum(int(np.prod(w.shape)) for w in build_model(cfg).trainable_weights):,} "
          f"trainable parameters), batch {BATCH}, {steps} steps x {rounds} alternating rounds")
    for name in contenders:
        print(f"  {name:7s} {med[name]:8.0f} images/s   (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})")
    for name in contenders:
        if name != "keras" and "keras" in med:
            print(f"  {name} / keras model.fit: {med[name] / med['keras']:.2f}x"
                  + (f";  {name} / torch eager: {med[name] / med['torch']:.2f}x"
                     if "torch" in med and name != "torch" else ""))
    return med


CONTENDERS = ("convbn", "convbn-tfdata", "keras", "keras-xla", "keras-spe", "convbn-bf16", "torch")
SLOW_PHASE = 0.85  # a round whose probe is below this share of the median probe ran in a slow phase


def make_contender(name, cfg, arrays, steps):
    """The run() of contender `name` (CONTENDERS) on `cfg`'s network."""
    make = {"convbn": lambda: convbn_contender(cfg, arrays, steps),
            "convbn-tfdata": lambda: convbn_tfdata_contender(cfg, arrays, steps),
            "convbn-bf16": lambda: convbn_contender(cfg, arrays, steps, "mixed_bfloat16"),
            "keras": lambda: keras_contender(cfg, arrays, steps),
            "keras-xla": lambda: keras_contender(cfg, arrays, steps, jit_compile=True),
            "keras-spe": lambda: keras_contender(cfg, arrays, steps, steps_per_execution=PER_CALL),
            "torch": lambda: torch_contender(cfg, arrays, steps)}
    return make[name]()


def one_contender(net, name, steps, epochs=1) -> float:
    """In a fresh process: build one contender, warm it up (one epoch: tracing, allocations), then time `epochs`
    epochs of `steps` steps together; images/s over their total time."""
    cfg = config(net, OVERRIDES if name.startswith("convbn") else ())
    run = make_contender(name, cfg, real_mnist(steps * BATCH), steps)
    run()  # warm-up: tracing, allocations
    t0 = time.perf_counter()
    n = run(epochs) if name.startswith("keras") else sum(run() for _ in range(epochs))
    return n / (time.perf_counter() - t0)


def op_kind(name: str, op_type: str) -> str:
    """What part of the network an op from the profiler's trace belongs to, for convbn's and Keras' graphs alike:
    by op type where the type says it (fused kernels), by the layer in the op's name otherwise (Keras' BN is a
    dozen elementwise ops under `batch_normalization/`, convbn's BN of a dense layer the same under `dense1_bn/`,
    Keras' tracing adding `_1` to a layer's name)."""
    low = name.lower()
    if "conv2d" in op_type.lower():
        return "convolutions (forward and gradients)"
    if "batchnorm" in op_type.lower() or "batch_normalization" in low or re.search(r"_bn(_\d+)?(/|$)", low):
        return "batch norm (forward and gradients)"
    if "pool" in op_type.lower():
        return "pooling"
    if op_type in ("Relu", "ReluGrad") or "/re_lu" in low:
        return "ReLU"
    if "matmul" in op_type.lower():
        return "dense layers (matmuls)"
    if "adam" in low or "optimizer" in low:
        return "optimizer (Adam)"
    if op_type.startswith(("Iterator", "Prefetch")) or "gather" in op_type.lower():
        return "feeding the batch"
    return "loss, metrics, loop, the rest"


def profile_contender(net, name, steps) -> dict:
    """In a fresh process: one contender's warm-up epoch, then one epoch under the profiler; its op time per step
    by op_kind and its wall time per step."""
    import tempfile

    sys.path.insert(0, str(ROOT / "bench"))
    from step_profile import read_trace

    if name == "torch":
        raise SystemExit("--profile: torch is not a TensorFlow contender")
    cfg = config(net, OVERRIDES if name.startswith("convbn") else ())
    run = make_contender(name, cfg, real_mnist(steps * BATCH), steps)
    run()
    t0 = time.perf_counter()
    run()
    wall = (time.perf_counter() - t0) / steps * 1000
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        run()
        tf.profiler.experimental.stop()
        by_kind = {kind: [ms, n] for kind, (ms, n) in read_trace(Path(logdir), steps, kind=op_kind)[0].items()}
    return {"wall_ms": wall, "by_kind": by_kind}


def run_child(name, net, steps, *extra):
    """This script in a fresh process for one contender (`--one`): its finished subprocess."""
    import subprocess

    return subprocess.run([sys.executable, __file__, "--one", name, "--net", net, "--steps", str(steps), *extra,
                           "--per-call", str(PER_CALL), "--set", *OVERRIDES], capture_output=True, text=True,
                          timeout=1800)


def profile_processes(net, steps, contenders):
    import json

    got = {}
    if "torch" in contenders:
        print("--profile: torch left out (TensorFlow's profiler sees TensorFlow contenders only)")
    for name in [c for c in contenders if c != "torch"]:
        out = run_child(name, net, steps, "--profile")
        if out.returncode != 0:
            raise SystemExit(f"{name} failed: {out.stderr[-2000:]}")
        got[name] = json.loads(out.stdout.splitlines()[-1])
    kinds = sorted({k for g in got.values() for k in g["by_kind"]},
                   key=lambda k: -max(g["by_kind"].get(k, [0, 0])[0] for g in got.values()))
    print(f"\nnetwork: {net}, batch {BATCH}; op time per training step (ms, summed over TensorFlow's compute "
          f"threads, so above the wall time), one profiled epoch of {steps} steps after a warm-up one and a timed "
          "one, each contender in a fresh process")
    print("| part | " + " | ".join(f"{c} ms (ops)" for c in got) + " |")
    print("| --- |" + " ---: |" * len(got))
    for k in kinds:
        cells = [got[c]["by_kind"].get(k, [0.0, 0]) for c in got]
        print(f"| {k} | " + " | ".join(f"{ms:.2f} ({n:.0f})" for ms, n in cells) + " |")
    print("| all ops | " + " | ".join(f"{sum(v[0] for v in g['by_kind'].values()):.2f} "
                                      f"({sum(v[1] for v in g['by_kind'].values()):.0f})" for g in got.values())
          + " |")
    print("| wall time per step (the timed epoch) | " + " | ".join(f"{g['wall_ms']:.2f}" for g in got.values())
          + " |")


def bench_processes(net, steps, rounds, contenders, epochs=1):
    import json

    import peak

    def probe():
        return statistics.median(peak.conv_tf(1.0, 2))

    rates, kept, slow_rounds, probes = {c: [] for c in contenders}, {c: [] for c in contenders}, [], []
    available = list(contenders)
    for r in range(rounds):
        before = probe()
        order = available if r % 2 == 0 else available[::-1]
        got = {}
        for name in order:
            out = run_child(name, net, steps, "--epochs", str(epochs))
            if out.returncode == 3:  # not installed (torch)
                available.remove(name)
                continue
            if out.returncode != 0:
                raise SystemExit(f"{name} failed: {out.stderr[-2000:]}")
            got[name] = json.loads(out.stdout.splitlines()[-1])["images_per_s"]
        after = probe()
        probes.append((before, after))
        for name, v in got.items():
            rates[name].append(v)
        print(f"  round {r + 1}: probe {before:.0f}/{after:.0f} GFLOP/s; "
              + ", ".join(f"{k} {v:.0f}" for k, v in got.items()), flush=True)
    typical = statistics.median([p for pair in probes for p in pair])
    for r, (before, after) in enumerate(probes):
        if min(before, after) < SLOW_PHASE * typical:
            slow_rounds.append(r + 1)
        else:
            for name in available:
                kept[name].append(rates[name][r])
    med = {k: statistics.median(v) for k, v in kept.items() if v}
    flops = peak.training_flops(config(net))
    print(f"\nnetwork: {net} ({flops / 1e6:.1f} MFLOP per training image), batch {BATCH}, {steps} steps x {epochs} "
          f"timed epoch(s) after a warm-up one; each contender in a fresh process, {rounds} alternating rounds; "
          f"probe median {typical:.0f} GFLOP/s")
    if slow_rounds:
        print(f"  rounds in a slow phase of the machine (probe < {SLOW_PHASE:.0%} of its median), left out: "
              f"{slow_rounds}")
    for name in available:
        if name in med:
            print(f"  {name:13s} {med[name]:7.0f} images/s = {med[name] * flops / 1e9:5.1f} GFLOP/s   "
                  f"(rounds: {', '.join(f'{v:.0f}' for v in rates[name])})")
    if "keras" in med:
        for name in ("convbn", "convbn-tfdata", "convbn-bf16", "keras-xla", "keras-spe", "torch"):
            if name in med:
                print(f"  {name} / keras model.fit: {med[name] / med['keras']:.2f}x")
    return med


def main():
    global PER_CALL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", choices=["mnist_bn", "classic", "both"], default="both")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--same-process", action="store_true", help="every contender in this process (the old way)")
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up one (each process)")
    ap.add_argument("--per-call", type=int, default=PER_CALL,
                    help="training steps per compiled call (convbn's, and keras-spe's steps_per_execution)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for convbn")
    ap.add_argument("--contenders", default="convbn,keras,convbn-bf16,torch",
                    help="comma-separated, from: " + ", ".join(CONTENDERS))
    ap.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)  # a child process: one contender
    ap.add_argument("--profile", action="store_true",
                    help="op time per part of the step, contenders side by side, instead of timing")
    args = ap.parse_args()
    import json
    import os

    PER_CALL = args.per_call
    OVERRIDES[:] = args.set
    if args.one and args.profile:
        print(json.dumps(profile_contender(args.net, args.one, args.steps)))
        return
    if args.one:
        try:
            rate = one_contender(args.net, args.one, args.steps, args.epochs)
        except ImportError:
            sys.exit(3)
        print(json.dumps({"contender": args.one, "images_per_s": rate}))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    import peak

    print(f"{peak.cpu_info()}; TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    for net in (["mnist_bn", "classic"] if args.net == "both" else [args.net]):
        if args.profile:
            profile_processes(net, args.steps, [c for c in args.contenders.split(",") if c])
        elif args.same_process:
            bench(net, args.steps, args.rounds, [c for c in args.contenders.split(",") if c])
        else:
            bench_processes(net, args.steps, args.rounds, [c for c in args.contenders.split(",") if c], args.epochs)


if __name__ == "__main__":
    main()
