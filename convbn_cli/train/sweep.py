"""`convbn sweep`: train every combination of some settings, one after another, and summarize them side by side.

    convbn sweep mnist_bn model.bn.decay=0.9,0.99,0.999 train.epochs=1 --seeds 2

writes runs/<name>/sweep-<k>/ holding sweep.json (the plan: every combination's resolved config), one run
directory per combination and seed (model.bn.decay=0.99,seed=1/), and summary.csv, summary.json and
summary.png, rewritten after every run. Every combination is validated before the first one trains. An
interrupted sweep continues with `convbn sweep --resume DIR`: finished runs are skipped, an interrupted one
resumes exactly from its checkpoint (train --resume), the rest start.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import signal
import statistics
from pathlib import Path

from ..config import dump_config, load_config
from ..errors import ConfigError, ConvbnError
from ..files import write_json_atomic, write_text_atomic
from ..runs.rundir import RunDirError, make_numbered, read_json

PLAN = "sweep.json"
MAX_RUNS = 1000


class SweepInterrupted(ConvbnError):
    def __init__(self, signum, sweep_dir, run):
        self.exit_code = 128 + signum
        super().__init__(f"sweep interrupted by {signal.Signals(signum).name} at {run}; continue with "
                         f"`convbn sweep --resume {sweep_dir}` (finished runs are kept, an interrupted one resumes "
                         "from its checkpoint)")


def parse_axes(specs) -> tuple[list, list]:
    """(fixed overrides, axes [(key, [values])]) from KEY=V1,V2,... arguments; a single value is a fixed
    override. A value written as a YAML list or mapping ([28, 28, 1]) is one value, commas and all."""
    fixed, axes = [], []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key:
            raise ConfigError([f"{spec!r}: expected KEY=VALUE or KEY=V1,V2,..."])
        split = [values] if values.lstrip().startswith(("[", "{")) else values.split(",")
        if any(not v.strip() for v in split):
            raise ConfigError([f"{spec}: an empty value in the list"])
        if key in [k for k, _ in axes]:
            raise ConfigError([f"{key}: swept twice"])
        if len(split) == 1:
            fixed.append(spec)
        else:
            axes.append((key, [v.strip() for v in split]))
    return fixed, axes


def plan(config, specs, seeds: int = 1) -> dict:
    """Every combination (x seeds) as {name, values, seed, overrides, config}, each validated now: one line per
    problem, naming the combination, before anything trains."""
    fixed, axes = parse_axes(specs)
    base = load_config(config, fixed)
    combos = list(itertools.product(*[[(k, v) for v in values] for k, values in axes])) or [()]
    if len(combos) * seeds > MAX_RUNS:
        raise ConfigError([f"{len(combos)} combinations x {seeds} seeds is more than {MAX_RUNS} runs"])
    runs, problems = [], []
    for combo in combos:
        for i in range(seeds):
            seed = base.train.seed + i
            overrides = fixed + [f"{k}={v}" for k, v in combo] + ([f"train.seed={seed}"] if seeds > 1 else [])
            name = ",".join(f"{k}={v}" for k, v in combo) or "base"
            name = _dir_name(name + (f",seed={seed}" if seeds > 1 else ""))
            try:
                cfg = load_config(config, overrides)
            except ConfigError as e:
                problems += [f"{name}: {p}" for p in e.problems]
                continue
            runs.append({"name": name, "values": dict(combo), "seed": seed, "overrides": overrides,
                         "config": dump_config(cfg)})
    if problems:
        raise ConfigError(problems)
    return {"config": str(config), "axes": [[k, v] for k, v in axes], "fixed": fixed, "seeds": seeds,
            "root": base.output.root, "name": base.output.name or "run", "runs": runs}


def _dir_name(name: str) -> str:
    # one directory name: a path separator in a value ("a/b") must not make a subdirectory
    return name.replace("/", "_").replace("\0", "_")[:200]


def create(sweep: dict) -> Path:
    """runs/<name>/sweep-<k>/ with sweep.json; k is the next free number (make_numbered)."""
    path = make_numbered(Path(sweep["root"]) / sweep["name"], "sweep-")
    write_json_atomic(path / PLAN, sweep)
    return path


MAX_PLAN_BYTES = 64 << 20  # MAX_RUNS resolved configs of a few KB each


def open_sweep(path) -> dict:
    """The plan in a sweep directory; refused (one line) when it is too big, damaged, or names a run anywhere
    but directly inside the sweep directory."""
    path = Path(path)
    try:
        with open(path / PLAN, "rb") as f:
            text = f.read(MAX_PLAN_BYTES + 1)
        assert len(text) <= MAX_PLAN_BYTES
        sweep = json.loads(text)
        assert isinstance(sweep, dict) and isinstance(sweep["runs"], list)
        for r in sweep["runs"]:
            assert isinstance(r["name"], str) and r["name"] not in ("", ".", "..") and "/" not in r["name"]
            assert isinstance(r["config"], str) and isinstance(r["overrides"], list)
    except FileNotFoundError:
        raise RunDirError(f"{path}: not a sweep directory ({PLAN} is missing)") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise RunDirError(f"{path / PLAN}: unreadable; not a sweep convbn wrote") from None
    return sweep


def run_sweep(path, *, log=print, progress=True) -> dict:
    """Train the sweep in `path` (made by `create`), skipping what is done; returns the summary."""
    from ..config.loader import safe_parse
    from ..data import fetch
    from .loop import Interrupted, train

    path = Path(path)
    sweep = open_sweep(path)
    data, current, pending = {}, None, []

    # Ctrl-C or SIGTERM between runs, or while one starts, is only noted here (a KeyboardInterrupt raised at an
    # arbitrary point can land in a garbage-collection callback, where Python swallows it); inside a run the
    # signal is sent again at the next step, where the trainer turns it into a checkpoint (events.StopOnSignal).
    def note(signum, frame):
        pending.append(signum)

    def relay(step, model):
        if pending:
            os.kill(os.getpid(), pending.pop())

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, note)
        except ValueError:  # not the main thread
            pass
    try:
        for i, r in enumerate(sweep["runs"], 1):
            run_dir, current = path / r["name"], r["name"]
            if (run_dir / "results.json").is_file():
                log(f"[{i}/{len(sweep['runs'])}] {r['name']}: done already")
                continue
            cfg = load_config(raw=safe_parse(r["config"]))
            if cfg.data.dataset not in data:  # read once, shared by every run of the sweep
                data[cfg.data.dataset] = fetch(cfg.data.dataset, log=log, progress=progress)
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # made by us and stopped before its config was written: start it afresh
            resume = run_dir if (run_dir / "config.yaml").is_file() else None
            if pending:
                raise SweepInterrupted(pending[0], path, current)
            log(f"[{i}/{len(sweep['runs'])}] {r['name']}" + (" (resuming)" if resume else ""))
            try:
                train(cfg, data=data[cfg.data.dataset], resume=resume, log=log, progress=progress,
                      overrides=r["overrides"], run_dir=None if resume else run_dir, on_step=relay)
            finally:
                import keras

                keras.backend.clear_session()  # free the finished model's graph before the next one
            write_summary(path, sweep)
            if pending:
                raise SweepInterrupted(pending[0], path, current)
    except Interrupted as e:  # inside a run: its checkpoint is saved
        raise SweepInterrupted(e.signum, path, current) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return write_summary(path, sweep)


def summarize(path, sweep: dict) -> list:
    """One row per combination: mean and spread (sample standard deviation) over its seeds of the test accuracy,
    the best validation accuracy, the moving-vs-batch statistics accuracy gap and the training time."""
    groups = {}
    for r in sweep["runs"]:
        key = json.dumps(r["values"], sort_keys=True)
        groups.setdefault(key, {"values": r["values"], "results": [], "runs": 0})
        groups[key]["runs"] += 1
        results = read_json(Path(path) / r["name"] / "results.json")
        if results:
            groups[key]["results"].append(results)
    rows = []
    for g in groups.values():
        res = g["results"]
        row = {**g["values"], "seeds_done": len(res), "seeds": g["runs"]}
        for name, get in (("test_acc", lambda x: x.get("test_acc")), ("best_val_acc", lambda x: x.get("best_val_acc")),
                          ("bn_gap", lambda x: (x.get("inference_gap") or {}).get("gap")),
                          ("time_s", lambda x: x.get("wall_time_s"))):
            values = [v for v in map(get, res) if v is not None]
            row[f"{name}_mean"] = statistics.fmean(values) if values else None
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        rows.append(row)
    return rows


def write_summary(path, sweep: dict) -> dict:
    """summary.json, summary.csv and summary.png in the sweep directory (atomically); returns the summary."""
    from ..present.plots import sweep_summary

    path = Path(path)
    rows = summarize(path, sweep)
    keys = [k for k, _ in sweep["axes"]]
    summary = {"sweep": str(path), "axes": sweep["axes"], "seeds": sweep["seeds"], "rows": rows}
    write_json_atomic(path / "summary.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path / "summary.csv", buf.getvalue())
    if any(r["seeds_done"] for r in rows) and keys:
        sweep_summary(rows, sweep["axes"], path / "summary.png", title=str(path))
    return summary
