"""`convbn runs`: every run under a root at a glance, and what sets runs apart (no TensorFlow).

A run is any directory holding a config.yaml written by convbn (runs/<name>/<n>/, and the runs of a sweep,
runs/<name>/sweep-<k>/<combination>/). Its line is made from the files the run wrote: results.json when it
finished, otherwise metrics.jsonl, so a run that is still going or was interrupted shows how far it got.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

from ..config.loader import as_trained, read_yaml
from ..errors import ConfigError, ConvbnError
from .rundir import RunDir, RunDirError, best_row, final_val, moving_val_acc

MAX_DEPTH = 6  # runs/<name>/sweep-<k>/<combination>/ is 3 below the root; deeper folders are not convbn's
IGNORED_KEYS = ("output.",)  # where a run was written says nothing about how it trained
LAYER_KEYS = "model.layers["  # summarized in one short column (architecture) instead of ~20 keys per layer
SORT_KEYS = {"run": "run", "date": "date", "test": "test_acc", "val": "val_acc", "best_val": "val_acc",
             "time": "time_s", "epochs": "epochs_done"}


def architecture(config: dict) -> str:
    """The layers in one short word, `c12-p-c24-p-c48-g-d10`: c = conv (filters, `/2` for stride 2, `p` when it
    pools before its BN), p = pool, g = global pool, dr = dropout, d = dense (units), cr = crop (its border);
    flatten is implied."""
    parts, i = [], 0
    while f"{LAYER_KEYS}{i}].type" in config:
        at = f"{LAYER_KEYS}{i}]."
        kind = config[at + "type"]
        if kind == "conv":
            stride = config.get(at + "stride[0]", config.get(at + "stride", 1))
            strided = f"/{stride}" if stride != 1 else ""
            parts.append(f"c{config.get(at + 'filters')}{strided}" + ("p" if config.get(at + "pool", 1) != 1 else ""))
        elif kind == "dense":
            parts.append(f"d{config.get(at + 'units')}")
        elif kind == "crop":
            bh = config.get(at + "border[0]", config.get(at + "border", 1))
            bw = config.get(at + "border[1]", bh)
            parts.append(f"cr{bh}" if bw == bh else f"cr{bh}x{bw}")
        elif kind != "flatten":
            parts.append({"pool": "p", "global_pool": "g", "dropout": "dr"}.get(kind, str(kind)))
        i += 1
    return "-".join(parts) or "-"


def sort_runs(summaries: list, key: str) -> list:
    """Runs ordered by `key` (a column: run, date, test, best_val, time, epochs; or a config key), numbers as
    numbers, runs without a value last."""
    field = SORT_KEYS.get(key)

    def value(s):  # numbers first, by value; then text; then the runs without one
        v = s.get(field) if field else s["config"].get(key)
        if v is None:
            return (2, 0.0, "")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1, 0.0, str(v))

    if field is None and not any(key in s["config"] for s in summaries):
        raise ConvbnError(f"--sort {key}: not a column ({', '.join(SORT_KEYS)}) nor a config key of these runs")
    return sorted(summaries, key=value)


def find_runs(root) -> list[Path]:
    """Run directories under `root` (or `root` itself), in natural order (runs/x/2 before runs/x/10)."""
    root = Path(root)
    if not root.is_dir():
        raise ConvbnError(f"{root}: no such directory")
    found = []
    for here, dirs, files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if "config.yaml" in files and ({"metrics.jsonl", "results.json", "checkpoints"} & set(files + dirs)):
            found.append(Path(here))
            dirs[:] = []  # nothing of interest inside a run (export/, checkpoints/, ...)
        elif depth >= MAX_DEPTH:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def flatten(node, prefix="") -> dict:
    """{"model.bn.decay": 0.9, "model.layers[0].filters": 32, ...}: the dotted keys the overrides use."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list):
        out = {}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def summarize(path: Path, root: Path | None = None) -> dict:
    """One run's line: name, date, dataset, epochs, best validation and test accuracy, time, status, config."""
    run = RunDir(path)
    try:
        config = flatten(as_trained(read_yaml(run.config)))  # an older run's: as it trained
    except ConfigError as e:
        raise RunDirError(e.problems[0]) from None
    results = run.read_results()
    metrics = run.read_metrics()
    shown, moving = final_val(results)
    if not results:  # unfinished: the best epoch so far, as the final model would measure it (settled statistics)
        best, key = best_row(metrics)
        if best is not None and key == "val_acc":
            shown, moving = best["val_acc"], moving_val_acc(best)
            moving = None if moving is None or abs(moving - shown) < 5e-5 else moving
    info = run.read_run_info()
    when = info.get("time") or datetime.datetime.fromtimestamp(
        run.config.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    name = str(path.relative_to(root)) if root is not None and path != root else str(path)
    return {
        "run": name, "path": str(path), "date": when[:16].replace("T", " "),
        "dataset": config.get("data.dataset", config.get("data.dataset.path")),  # a name, or your own's path
        "epochs_done": metrics[-1]["epoch"] if metrics else 0, "epochs": config.get("train.epochs"),
        # val_acc: the validation accuracy of the model the next command opens (`convbn eval RUN --split val`);
        # val_acc_moving: the best epoch's with the moving BN statistics, where it differs; best_val_acc: as recorded
        "val_acc": shown, "val_acc_moving": moving, "best_val_acc": results.get("best_val_acc", shown),
        "test_acc": results.get("test_acc"),
        "time_s": results.get("wall_time_s", metrics[-1]["wall_time_s"] if metrics else None),
        "status": ("stopped early" if results.get("stopped_early") else "finished") if results else "unfinished",
        "architecture": architecture(config),
        "config": config,
    }


def differing_keys(summaries: list) -> list:
    """The config keys whose values are not the same in every run (a key missing from some runs differs)."""
    keys = sorted({k for s in summaries for k in s["config"]})
    return [k for k in keys if not k.startswith(IGNORED_KEYS + (LAYER_KEYS,))
            and len({json.dumps(s["config"].get(k), sort_keys=True) for s in summaries}) > 1]


def list_runs(root, sort: str | None = None) -> dict:
    """{root, runs: [summary + "differs": {key: value}], differing_keys}; a run whose files are unreadable is
    listed with its problem rather than stopping the listing. `sort`: see sort_runs (default: by path)."""
    root = Path(root)
    summaries, broken = [], []
    for path in find_runs(root):
        try:
            summaries.append(summarize(path, root))
        except (ConvbnError, OSError) as e:  # damaged, hand-edited, unreadable: listed with its problem
            broken.append({"run": str(path), "problem": str(e)})
    keys = differing_keys(summaries)
    for s in summaries:
        s["differs"] = {k: s["config"].get(k) for k in keys}
    if sort:
        summaries = sort_runs(summaries, sort)
    return {"root": str(root), "runs": summaries, "differing_keys": keys, "unreadable": broken,
            "architectures_differ": len({s["architecture"] for s in summaries}) > 1}


def compare_runs(paths) -> dict:
    """{runs: [summary], differing_keys, metrics: {run: rows}} of the runs named (each a run directory)."""
    summaries, metrics = [], {}
    paths = [Path(p) for p in paths]
    for p in paths:
        RunDir.open(p)  # a clear error for something that is not a run directory
    # each run named by its path below the runs' common folder (small/1, wide/1): short column heads and legends
    common = Path(os.path.commonpath([p.resolve() for p in paths]))
    for p in paths:
        s = summarize(p.resolve(), common if common not in (p.resolve(), Path("/")) else None)
        summaries.append(s)
        metrics[s["run"]] = RunDir(p).read_metrics()
    keys = differing_keys(summaries)
    for s in summaries:
        s["differs"] = {k: s["config"].get(k) for k in keys}
    return {"runs": summaries, "differing_keys": keys, "metrics": metrics,
            "architectures_differ": len({s["architecture"] for s in summaries}) > 1}
