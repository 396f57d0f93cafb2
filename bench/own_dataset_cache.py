"""Decode once, then fast (issue 37): MNIST's 60,000 training images written out as 28x28 PNG files in the
ImageFolder layout (PATH/<digit>/<n>.png), then, each in a fresh process:

1. the first use: `load_own` lists, hashes, decodes (threads) and caches them: seconds, images per second and the
   process's peak RSS (target: under 1.5 GB);
2. a later use: the same call served from convbn's cache (the files' states unchanged): seconds;
3. MNIST's own cache, `sources.fetch("mnist")` (read and verified against the published hashes): seconds.

Target: (2) within 2x of (3). Rounds alternate (2) and (3) so that both see the same machine; the medians are
reported. No TensorFlow is imported by any of them (neither path needs it).

    python bench/own_dataset_cache.py [--rounds 5] [--images 60000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
what, folder, cache = sys.argv[1], sys.argv[2], Path(sys.argv[3])
start = time.perf_counter()
if what == "mnist":
    from convbn_cli.data.sources import fetch
    arrays = fetch("mnist", log=lambda m: None, progress=False)
    n = len(arrays["y_train"]) + len(arrays["y_test"])
    built = False
else:
    from convbn_cli.data.own.dataset import load_own
    own = load_own(folder, cache_root=cache, log=lambda m: None, progress=False)
    n, built = sum(len(d.labels) for d in own.splits.values()), own.built
took = time.perf_counter() - start
print(json.dumps({"what": what, "seconds": took, "images": n, "built": built,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cpu() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        found = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in found)
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores; {flags or 'no avx2'})"


def write_pngs(folder: Path, count: int, data_dir: str) -> None:
    """MNIST's first `count` training images as PNG files, one folder per digit."""
    from PIL import Image

    from convbn_cli.data.sources import fetch

    os.environ["CONVBN_DATA_DIR"] = data_dir
    arrays = fetch("mnist", log=lambda m: None, progress=False)
    for d in range(int(arrays["y_train"].max()) + 1):
        (folder / str(d)).mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(zip(arrays["x_train"][:count], arrays["y_train"][:count])):
        Image.fromarray(x).save(folder / str(int(y)) / f"{i:05d}.png")


def child(what: str, folder: Path, cache: Path, data_dir: str) -> dict:
    env = {**os.environ, "CONVBN_DATA_DIR": data_dir}
    done = subprocess.run([sys.executable, "-c", CHILD, what, str(folder), str(cache)], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--keep", type=Path, default=None, help="write the PNG folder here and keep it")
    args = ap.parse_args()
    data_dir = os.environ.get("CONVBN_DATA_DIR") or str(Path.home() / ".cache" / "convbn")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "mnist-png"
        cache = Path(tmp) / "cache"
        if not folder.is_dir():
            write_pngs(folder, args.images, data_dir)
        size = sum(p.stat().st_size for p in folder.rglob("*.png"))
        first = child("own", folder, cache, data_dir)
        assert first["built"], first
        later, mnist = [], []
        for _ in range(args.rounds):
            again = child("own", folder, cache, data_dir)
            assert not again["built"], again
            later.append(again["seconds"])
            mnist.append(child("mnist", folder, cache, data_dir)["seconds"])
    result = {
        "machine": cpu(), "python": platform.python_version(), "images": first["images"],
        "png_bytes": size, "first_use_s": round(first["seconds"], 2),
        "images_per_s": round(first["images"] / first["seconds"]), "first_use_peak_rss_mb": round(first["peak_rss_mb"]),
        "later_use_s": round(statistics.median(later), 3), "mnist_cache_s": round(statistics.median(mnist), 3),
        "ratio": round(statistics.median(later) / statistics.median(mnist), 2), "rounds": args.rounds,
        "later_use_all_s": [round(s, 3) for s in later], "mnist_cache_all_s": [round(s, 3) for s in mnist],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
