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
import time
from pathlib import Path

from .. import signals
from ..config import dump_config, load_config
from ..config.loader import safe_parse
from ..data.load import dataset_arrays, dataset_key
from ..errors import ConfigError, Stopped
from ..files import is_our_temporary, remove_entry, write_json_atomic, write_text_atomic
from ..present.plots import sweep_summary
from ..present.reports import duration, plural
from ..runs.rundir import RunDirError, make_numbered
from ..runs.sweepdir import MAX_RUNS, PLAN, dir_name, notes, open_sweep, run_config, summarize  # noqa: F401


class SweepInterrupted(Stopped):
    def __init__(self, signum, sweep_dir, run):
        super().__init__(signum, f"sweep interrupted by {signal.Signals(signum).name} at {run}; continue with "
                         f"`convbn sweep --resume {sweep_dir}` (finished runs are kept, an interrupted one resumes "
                         "from its checkpoint)")


def parse_axes(specs) -> tuple[list, list]:
    """(fixed overrides, axes [(key, [values])]) from KEY=V1,V2,... arguments; a single value is a fixed
    override. A value written as a YAML list or mapping ([28, 28, 1]) is one value, commas and all. A value
    given twice (also as another spelling of the same number: 0.9,0.90) is refused: it would train the same run
    twice and report it as two."""
    fixed, axes = [], []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key:
            raise ConfigError([f"{spec!r}: expected KEY=VALUE or KEY=V1,V2,..."])
        split = [values] if values.lstrip().startswith(("[", "{")) else values.split(",")
        if any(not v.strip() for v in split):
            raise ConfigError([f"{spec[:200]}: an empty value in the list"])
        if key in [k for k, _ in axes] or key in [f.partition("=")[0] for f in fixed]:
            raise ConfigError([f"{key}: swept twice"])
        values = [v.strip() for v in split]
        seen = {}
        for v in values:
            same = seen.setdefault(_meaning(v), v)
            if same is not v:
                raise ConfigError([f"{key}: {v} is given twice" + (f" (as {same})" if same != v else "")
                                   + "; each value is trained once (more runs of one value: --seeds K)"])
        if len(values) == 1:
            fixed.append(spec)
        else:
            axes.append((key, values))
    return fixed, axes


def _meaning(value: str) -> str:
    """What a value means once parsed as the config reads it (0.9 and 0.90 are one value)."""
    try:
        return json.dumps(safe_parse(value), sort_keys=True)
    except Exception:  # noqa: BLE001  (not YAML: load_config reports it, naming the combination)
        return value


def plan(config, specs, seeds: int = 1) -> dict:
    """Every combination (x seeds) as {name, values, seed, overrides, config}, each validated now: one line per
    problem, naming the combination, before anything trains."""
    fixed, axes = parse_axes(specs)
    if not axes and seeds == 1:
        raise ConfigError(["nothing to sweep: give at least one KEY=V1,V2,... (e.g. model.bn.decay=0.9,0.99) or "
                           "--seeds K; one run is `convbn train`"])
    count = seeds
    for _, values in axes:  # counted before anything is built: 4 keys x 100 values is 10^8 combinations
        count *= len(values)
    if count > MAX_RUNS:
        sizes = " x ".join(str(len(v)) for _, v in axes)
        raise ConfigError([f"{sizes} combinations x {seeds} seeds is {count} runs, more than {MAX_RUNS}"])
    combos = list(itertools.product(*[[(k, v) for v in values] for k, values in axes])) or [()]
    try:
        base = load_config(config, fixed)
    except ConfigError as e:  # a fixed key may need a swept one (beta_2=0.99 with name=adam,adamw on an sgd config)
        try:
            base = load_config(config, fixed + [f"{k}={v}" for k, v in combos[0]])
        except ConfigError:
            raise e from None
    runs, problems = [], []
    for combo in combos:
        for i in range(seeds):
            seed = base.train.seed + i
            overrides = fixed + [f"{k}={v}" for k, v in combo] + ([f"train.seed={seed}"] if seeds > 1 else [])
            name = ",".join(f"{k}={v}" for k, v in combo) or "base"
            name = dir_name(name + (f",seed={seed}" if seeds > 1 else ""))
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


def create(sweep: dict) -> Path:
    """runs/<name>/sweep-<k>/ with sweep.json; k is the next free number (make_numbered)."""
    path = make_numbered(Path(sweep["root"]) / sweep["name"], "sweep-")
    write_json_atomic(path / PLAN, sweep)
    return path


def run_sweep(path, *, log=print, progress=True) -> dict:
    """Train the sweep in `path` (made by `create`), skipping what is done; returns the summary."""
    from .loop import Interrupted

    path = Path(path)
    sweep = open_sweep(path)
    data, current, pending, took = {}, None, [], []

    def relay(step, model):  # inside a run: a noted signal goes to the trainer, which saves a checkpoint
        if pending:
            os.kill(os.getpid(), pending.pop())

    try:
        with _noting_signals(pending):
            for i, r in enumerate(sweep["runs"], 1):
                current = r["name"]
                trained = _run_one(path, sweep, i, r, data, pending, took, relay, log, progress)
                if trained:
                    write_summary(path, sweep)
                if pending:
                    raise SweepInterrupted(pending[0], path, current)
    except Interrupted as e:  # inside a run: its checkpoint is saved
        raise SweepInterrupted(e.signum, path, current) from None
    return write_summary(path, sweep)


def _noting_signals(pending: list):
    """Ctrl-C or SIGTERM between runs, or while one starts, is only noted in `pending` (a KeyboardInterrupt raised
    at an arbitrary point can land in a garbage-collection callback, where Python swallows it); the sweep stops
    at the next safe point, and inside a run the signal is sent again at the next step (events.StopOnSignal)."""
    return signals.handled(signals.stop_signals(lambda signum, frame: pending.append(signum)))


def _run_one(path, sweep, i, r, data, pending, took, relay, log, progress) -> bool:
    """Train (or resume) the sweep's i-th run unless it is done; whether it trained."""
    from .loop import train

    run_dir = path / r["name"]
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise RunDirError(f"{run_dir}: a link or a file where this sweep keeps a run directory; refused "
                          "(nothing is written anywhere but inside the sweep directory)")
    if (run_dir / "results.json").is_file():
        log(f"[{i}/{len(sweep['runs'])}] {r['name']}: done already")
        return False
    cfg = run_config(path, sweep, i - 1)
    key = dataset_key(cfg)
    if key not in data:  # read once, shared by every run of the sweep
        data[key] = dataset_arrays(cfg, log=log, progress=progress)
    if _unstarted(run_dir):  # made by us and killed before its config was in place: start it afresh
        for p in run_dir.iterdir():
            remove_entry(p)
        run_dir.rmdir()
    resume = run_dir if (run_dir / "config.yaml").is_file() else None
    if pending:
        raise SweepInterrupted(pending[0], path, r["name"])
    left = sum(1 for q in sweep["runs"][i - 1:] if not (path / q["name"] / "results.json").is_file())
    log(f"[{i}/{len(sweep['runs'])}] {r['name']}" + (" (resuming)" if resume else "") + eta(took, left))
    started = time.monotonic()
    try:
        train(cfg, data=data[key], resume=resume, log=log, progress=progress,
              overrides=r["overrides"], run_dir=None if resume else run_dir, on_step=relay)
    finally:
        import keras

        keras.backend.clear_session()  # free the finished model's graph before the next one
    took.append(time.monotonic() - started)
    return True


def _unstarted(run_dir: Path) -> bool:
    """A combination directory that holds nothing but what a killed write of convbn's left (an empty one, or a
    `.config.yaml.XXXXXXXX.tmp`: files.is_our_temporary decides what is ours): that run never started."""
    return run_dir.is_dir() and all(is_our_temporary(p) for p in run_dir.iterdir())


def eta(took: list, left: int) -> str:
    """", 3 runs left, about 12 min" once a run of this session has finished (their mean time: the runs of a
    sweep differ in a few settings, not in size, as a rule)."""
    if not took or left <= 0:
        return ""
    return f"; {plural(left, 'run')} left including this one, about {duration(sum(took) / len(took) * left)}"


def write_summary(path, sweep: dict) -> dict:
    """summary.json, summary.csv and summary.png in the sweep directory (atomically); returns the summary."""
    path = Path(path)
    rows = summarize(path, sweep)
    keys = [k for k, _ in sweep["axes"]]
    summary = {"sweep": str(path), "axes": sweep["axes"], "seeds": sweep["seeds"], "rows": rows,
               "notes": notes(path, sweep)}
    write_json_atomic(path / "summary.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path / "summary.csv", buf.getvalue())
    if any(r["seeds_done"] for r in rows) and keys:
        sweep_summary(rows, sweep["axes"], path / "summary.png", title=str(path), notes=summary["notes"])
    return summary
