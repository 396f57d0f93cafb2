"""This machine's reference speed: float32 (and bfloat16) matmul GFLOP/s, and a 3x3 conv's forward+backward.

Every other benchmark states its GFLOP/s as a share of these figures, and bench/steady_training.py runs the
conv probe before and after its windows to tell a slow machine from a slow program.

    python bench/peak.py [--seconds 2] [--windows 3] [--json]

Each figure is the median over `--windows` windows of `--seconds` each, every window reported. Threads: what
TensorFlow and NumPy choose by default (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convbn_cli.tf_setup import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import numpy as np  # noqa: E402

N = 2048  # matmul size: large enough to be compute-bound, small enough for a 2-second window
CONV = dict(batch=128, size=28, channels=32, kernel=3)


def cpu_info() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni"))
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(keep) or 'none of avx2/avx512/amx'}"


def training_flops(cfg) -> float:
    """Floating-point operations of one training image of the config's network: for each conv and dense layer,
    2 x multiply-adds forward, and as much again for each of the two backward products (the gradient of the
    weights, and of the input - which the first layer does not need). BN, ReLU, pooling and the optimizer are
    elementwise (well under 2% here) and not counted: this is the work the matmul peak can be compared with."""
    from convbn_cli.config import plan_layers

    total, first = 0.0, True
    for p in plan_layers(cfg):
        if p.spec.type == "conv":  # on the conv's own output: a block that pools before its BN pools after it
            kh, kw = p.spec.kernel
            macs = int(np.prod(p.spec.conv_shape(p.in_shape))) * kh * kw * p.in_shape[-1]
        elif p.spec.type == "dense":
            macs = p.out_shape[0] * int(np.prod(p.in_shape))
        else:
            continue
        total += 2 * macs * (2 if first else 3)
        first = False
    return total


def _windows(step, flops_per_call, seconds, windows) -> list:
    step()  # warm-up (tracing, oneDNN primitive creation)
    out = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            n += 1
        out.append(n * flops_per_call / (time.perf_counter() - t0) / 1e9)
    return out


def matmul_fn(dtype):
    """(call, FLOPs per call) of one N x N matmul in `dtype` (also bench/step_time.py's --against-peak side)."""
    a = tf.random.normal((N, N), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    fn = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    return (lambda: fn().numpy()), 2 * N**3


def matmul_tf(dtype, seconds, windows) -> list:
    return _windows(*matmul_fn(dtype), seconds, windows)


def matmul_numpy(seconds, windows) -> list:
    a = np.random.default_rng(0).standard_normal((N, N), dtype=np.float32)
    return _windows(lambda: a @ a, 2 * N**3, seconds, windows)


def conv_step(dtype=tf.float32):
    """(step function, FLOPs per call) of one 3x3 conv's forward and backward (input and weight gradients)."""
    c = CONV
    x = tf.cast(tf.random.normal((c["batch"], c["size"], c["size"], c["channels"])), dtype)
    w = tf.Variable(tf.cast(tf.random.normal((c["kernel"], c["kernel"], c["channels"], c["channels"])) * 0.1, dtype))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, w, 1, "SAME")
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        gx, gw = tape.gradient(loss, [x, w])
        corner = (slice(0, 1),) * 4
        return tf.reduce_sum(tf.cast(gx[corner], tf.float32)) + tf.reduce_sum(tf.cast(gw[corner], tf.float32))

    forward = 2 * c["batch"] * c["size"] ** 2 * c["kernel"] ** 2 * c["channels"] ** 2
    return (lambda: step().numpy()), 3 * forward  # forward, input gradient, weight gradient


def conv_tf(seconds, windows, dtype=tf.float32) -> list:
    fn, flops = conv_step(dtype)
    return _windows(fn, flops, seconds, windows)


def has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure(seconds=2.0, windows=3) -> dict:
    out = {"cpu": cpu_info(), "tensorflow": tf.__version__,
           "matmul_f32_tf": matmul_tf(tf.float32, seconds, windows),
           "matmul_f32_numpy": matmul_numpy(seconds, windows),
           "conv3x3_f32_fwd_bwd": conv_tf(seconds, windows)}
    if has_bf16():
        out["matmul_bf16_tf"] = matmul_tf(tf.bfloat16, seconds, windows)
        out["conv3x3_bf16_fwd_bwd"] = conv_tf(seconds, windows, tf.bfloat16)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.seconds, args.windows)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(result["cpu"], f"TensorFlow {result['tensorflow']}")
    for key, values in result.items():
        if isinstance(values, list):
            print(f"{key:22s} median {statistics.median(values):7.1f} GFLOP/s   windows: "
                  + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
