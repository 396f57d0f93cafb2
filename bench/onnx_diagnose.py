"""How long `convbn diagnose MODEL.onnx --data mnist` takes on an MNIST-sized net as PyTorch exports it (issue 38:
under 30 s on 2 cores), from the command's start to its exit, TensorFlow's start-up included.

The model: NCHW 1x28x28 -> Conv(16)-BN-ReLU-MaxPool -> Conv(32)-BN-ReLU-MaxPool -> Flatten -> Gemm(10), built
with onnx.helper (no PyTorch), random weights with its BN statistics set by `convbn recalibrate` (untimed), so
the timed run measures a model with real statistics (its head is random: the verdict is accuracy_at_chance, after
every measurement a trained model gets).

Measured (issue 38): 13.0 s on 2 shared cores (load average 8), TensorFlow's start ~7 s of it.

    python bench/onnx_diagnose.py [--repeat 1] [--batches 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model(path: Path, seed=0):
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    x, c = "input", 1
    for k, o in enumerate((16, 32)):
        w = init(f"w{k}", rng.normal(0, np.sqrt(2 / (9 * c)), (o, c, 3, 3)))
        bn = [init(f"{q}{k}", v) for q, v in (("g", rng.uniform(0.5, 1.5, o)), ("b", rng.normal(0, 0.1, o)),
                                                ("m", np.zeros(o)), ("v", np.ones(o)))]
        nodes += [helper.make_node("Conv", [x, w], [f"c{k}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{k}", *bn], [f"n{k}"], name=f"bn{k}"),
                  helper.make_node("Relu", [f"n{k}"], [f"r{k}"]),
                  helper.make_node("MaxPool", [f"r{k}"], [f"p{k}"], kernel_shape=[2, 2], strides=[2, 2])]
        x, c = f"p{k}", o
    nodes.append(helper.make_node("Flatten", [x], ["f"], axis=1))
    nodes.append(helper.make_node("Gemm", ["f", init("wf", rng.normal(0, 0.05, (10, 32 * 7 * 7))),
                                           init("bf", np.zeros(10))], ["logits"], transB=1))
    g = helper.make_graph(nodes, "mnist", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    m.ir_version = 8
    onnx.save(m, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--batches", type=int, default=20)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "raw.onnx"
        model(raw)
        subprocess.run([sys.executable, "-m", "convbn_cli", "-q", "recalibrate", str(raw), "--data", "mnist",
                        "--batches", "10", "--output", str(Path(d) / "model.onnx"), "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "convbn_cli", "diagnose", str(Path(d) / "model.onnx"), "--data",
                                "mnist", "--batches", str(a.batches)], capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if r.returncode not in (0, 4):
                sys.exit(r.stderr)
        print(r.stdout.splitlines()[-1])
        print(f"convbn diagnose model.onnx --data mnist (--batches {a.batches}): "
              f"median {statistics.median(times):.1f} s over {len(times)} run(s)")


if __name__ == "__main__":
    main()
