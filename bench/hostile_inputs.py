"""Issue 27's hostile inputs, each given to a fresh `convbn` process: its exit code, its peak resident memory
(ru_maxrss of the child), its time and its error lines. Every case must end in one line, without a hang, well
under 1 GB (TensorFlow's import alone is ~0.6 GB).

    python bench/hostile_inputs.py [--dir /tmp/convbn-hostile]

The files are small on disk but declare (or inflate to) gigabytes: PNG headers declaring 10^6 x 64 and
60000 x 1000 pixels, an .npz of 999,999 zero images (0.76 MB compressed), .keras archives whose config.json
inflates to 2 GiB or whose weights member to 3 GiB, a sparse 2 GiB metrics.jsonl, FIFOs, NaN and out-of-range
data. Making the archives compresses 5.8 GB of zeros: about a minute, once (they are kept in --dir).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
from short_runs import cpu

WRAP = ("import resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-m', 'convbn_cli', *sys.argv[1:]], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.PIPE, text=True, timeout=120)\n"
        "sys.stderr.write(p.stderr); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def png_declaring(path: Path, width: int, height: int) -> None:
    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def zip_streamed(path: Path, members: dict) -> None:
    """A zip whose members (name -> (head bytes, fill byte, total size)) are streamed in, never held whole."""
    if path.exists():
        return
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, (head, fill, total) in members.items():
            with z.open(name, "w", force_zip64=True) as f:
                f.write(head)
                left, chunk = total - len(head), bytes([fill]) * (16 << 20)
                while left > 0:
                    f.write(chunk[:left])
                    left -= len(chunk)


def make_files(d: Path) -> None:
    import keras

    d.mkdir(parents=True, exist_ok=True)
    inp = keras.Input((28, 28, 1))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, use_bias=False)(inp))
    keras.Model(inp, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))).save(d / "m.keras")
    png_declaring(d / "tall.png", 10**6, 64)
    png_declaring(d / "wide.png", 60000, 1000)
    head = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 28, 28), np.uint8))
    header["shape"] = (999_999, 28, 28)
    np.lib.format.write_array_header_1_0(head, header)
    zip_streamed(d / "zeros.npz", {"x.npy": (head.getvalue(), 0, len(head.getvalue()) + 999_999 * 784)})
    meta = (b'{"keras_version": "3.15.1"}', 32, 27)
    config = json.dumps({"module": "keras", "class_name": "Functional", "config": {}}).encode()
    zip_streamed(d / "bigconfig.keras", {"metadata.json": meta, "config.json": (config, 32, 2 << 30),
                                         "model.weights.h5": (b"", 0, 1)})
    zip_streamed(d / "bigweights.keras", {"metadata.json": meta, "config.json": (config, 32, len(config)),
                                          "model.weights.h5": (b"\x89HDF\r\n\x1a\n", 0, 3 << 30)})
    run = d / "runs" / "x" / "1"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("model:\n  layers: [{type: dense, units: 10}]\n")
    with open(run / "metrics.jsonl", "wb") as f:
        f.truncate(2 << 30)  # sparse: nothing on disk
    np.savez(d / "labels255.npz", x=np.zeros((50, 28, 28), np.uint8), y=np.full(50, 255))
    np.savez(d / "nan.npz", x=np.full((50, 28, 28), np.nan, np.float32), y=np.zeros(50, np.int64))
    np.save(d / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    np.save(d / "nanpix.npy", np.full((2, 28, 28), np.nan, np.float32))
    for name in ("fifo.npz", "fifo.png"):
        if not (d / name).exists():
            os.mkfifo(d / name)


CASES = [
    ("predict, PNG declaring 10^6 x 64", ["predict", "m.keras", "tall.png"]),
    ("predict, PNG declaring 60000 x 1000", ["predict", "m.keras", "wide.png"]),
    ("predict, .npz of 999,999 images", ["predict", "m.keras", "zeros.npz"]),
    ("predict, empty array", ["predict", "m.keras", "empty.npy"]),
    ("predict, NaN pixels", ["predict", "m.keras", "nanpix.npy"]),
    ("predict, FIFO input", ["predict", "m.keras", "fifo.png"]),
    ("eval, .keras whose config.json inflates to 2 GiB", ["eval", "bigconfig.keras"]),
    ("diagnose, .keras with a 3 GiB weights member", ["diagnose", "bigweights.keras", "--data", "labels255.npz"]),
    ("runs, 2 GiB sparse metrics.jsonl", ["runs", "runs", "--json"]),
    ("diagnose --data labels 255", ["diagnose", "m.keras", "--data", "labels255.npz"]),
    ("diagnose --data NaN images", ["diagnose", "m.keras", "--data", "nan.npz"]),
    ("diagnose --scale nan", ["diagnose", "m.keras", "--data", "labels255.npz", "--scale", "nan"]),
    ("diagnose --data FIFO", ["diagnose", "m.keras", "--data", "fifo.npz"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/convbn-hostile", type=Path)
    args = ap.parse_args()
    make_files(args.dir)
    print(f"machine: {cpu()}")
    print(f"{'case':50s} {'exit':>4s} {'peak RSS':>9s} {'s':>5s}  error lines")
    for name, argv in CASES:
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, "-c", WRAP, *argv], capture_output=True, text=True, timeout=300,
                               cwd=args.dir)
            code, rss = (int(v) for v in p.stdout.split())
            err = p.stderr
        except (subprocess.TimeoutExpired, ValueError):
            code, rss, err = -1, 0, "HUNG or failed"
        lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Error:", "HUNG")) or "Traceback" in ln]
        print(f"{name:50s} {code:4d} {rss / 1024:6.0f} MB {time.time() - t0:5.1f}  {' | '.join(lines)[:110]}")


if __name__ == "__main__":
    main()
