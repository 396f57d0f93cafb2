"""Short runs end at the accuracy their weights have (issue 22): `convbn train mnist_bn data.max_train=5000
train.epochs=1`, with the shipped decay 0.99 and with TF1's 0.999, over several seeds.

For each run it reports the test accuracy of the run's final model (what the summary prints and `convbn eval RUN`
opens), the same weights' test accuracy with each batch's own BN statistics (`convbn eval RUN --bn-stats batch`),
the test accuracy before precise BN (what a run without it ended at), which mechanism ran, and the wall time.

    python bench/short_runs.py [--seeds 0 1 2] [--decays 0.99 0.999] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return f"{model} ({' '.join(sorted(f for f in flags if f.startswith(('avx512_bf16', 'amx', 'avx2'))))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.99, 0.999])
    parser.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides")
    args = parser.parse_args()

    from convbn_cli.analysis import evaluate
    from convbn_cli.config import load_config
    from convbn_cli.train import train
    from convbn_cli.data import fetch

    data = fetch("mnist", log=lambda m: None)
    print(f"machine: {cpu()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for decay in args.decays:
            for seed in args.seeds:
                overrides = ["data.max_train=5000", "train.epochs=1", f"model.bn.decay={decay}",
                             f"train.seed={seed}", f"output.root={tmp}", *args.set]
                cfg = load_config(ROOT / "configs" / "mnist_bn.yaml", overrides)
                t0 = time.perf_counter()
                result = train(cfg, data=data, log=lambda m: None, progress=False, warn=lambda m: None)
                seconds = time.perf_counter() - t0
                res = json.loads((result.run_dir / "results.json").read_text())
                opened = evaluate(result.run_dir, data=data)["accuracy"]
                batch = evaluate(result.run_dir, bn_stats="batch", data=data)["accuracy"]
                row = {"decay": decay, "seed": seed, "test_acc": res["test_acc"], "eval_acc": opened,
                       "batch_stats_acc": batch, "before": (res.get("before_precise_bn") or {}).get("test_acc"),
                       "mechanism": res["bn_statistics"]["mechanism"], "seconds": seconds}
                rows.append(row)
                before = f"{row['before']:.2%}" if row["before"] is not None else "-"
                print(f"decay {decay:<6g} seed {seed}: test {row['test_acc']:.2%} (eval opens {opened:.2%}), "
                      f"batch statistics {batch:.2%}, gap {batch - row['test_acc']:+.2%}; before precise BN "
                      f"{before}; {row['mechanism']}; {seconds:.1f} s", flush=True)
    worst = max(abs(r["batch_stats_acc"] - r["test_acc"]) for r in rows)
    print(f"largest |batch-statistics accuracy - test accuracy|: {worst:.2%} (target: <= 2 points)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
