"""A sweep directory, runs/<name>/sweep-<k>/, as written by `convbn sweep` (train/sweep.py): its plan, sweep.json,
validated like a config, the names of its combinations' run directories, and the summary of their results
(no TensorFlow: `convbn report` and `convbn runs` read sweeps too)."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from pydantic import (
    BaseModel,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from ..config import load_config
from ..config.loader import parse_config_text
from ..errors import ConfigError
from ..readers import read_json
from .rundir import RunDir, RunDirError, final_val

PLAN = "sweep.json"
MAX_RUNS = 1000


MAX_NAME_BYTES = 120  # well under the 255 bytes of a file name


def dir_name(name: str) -> str:
    """The directory of one combination: its name when that is a safe, short file name, else a cut of it made
    safe plus a hash of the whole name, so that two combinations never share a directory (a cut alone made
    2-axis names with long values collide)."""
    safe = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in name)
    if safe == name and len(name.encode()) <= MAX_NAME_BYTES and not name.startswith("."):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return safe.lstrip(".").encode()[:MAX_NAME_BYTES - 13].decode(errors="ignore") + "~" + digest


MAX_PLAN_BYTES = 64 << 20  # MAX_RUNS resolved configs of a few KB each


class PlannedRun(BaseModel):
    name: StrictStr = Field(min_length=1, max_length=MAX_NAME_BYTES)
    values: dict[StrictStr, StrictStr]
    seed: StrictInt
    overrides: list[StrictStr]
    config: StrictStr

    @field_validator("name")
    @classmethod
    def _a_plain_directory_name(cls, name):
        if dir_name(name) != name:
            raise ValueError("not a directory name convbn makes")
        return name


class SweepPlan(BaseModel):
    """sweep.json, validated like a config (strict types: nothing is coerced): a hand-edited or damaged plan is
    one line, never a traceback."""

    config: StrictStr
    axes: list[tuple[StrictStr, list[StrictStr]]]  # JSON has no tuples: [key, [values]]
    fixed: list[StrictStr]
    seeds: StrictInt = Field(ge=1, le=100)
    root: StrictStr
    name: StrictStr
    runs: list[PlannedRun] = Field(min_length=1, max_length=MAX_RUNS)

    @field_validator("runs")
    @classmethod
    def _distinct(cls, runs):
        names = [r.name for r in runs]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise ValueError(f"two runs share the directory {twice!r}")
        return runs


def open_sweep(path) -> dict:
    """The plan in a sweep directory; refused (one line) when it is not a file, too big, damaged, or does not
    fit SweepPlan (which also keeps every run directly inside the sweep directory)."""
    path = Path(path)
    where = path / PLAN
    if not (where.exists() or where.is_symlink()):
        raise RunDirError(f"{path}: not a sweep directory ({PLAN} is missing)")
    raw = read_json(where, MAX_PLAN_BYTES, "a sweep plan", RunDirError)
    try:
        plan = SweepPlan.model_validate(raw).model_dump()
    except ValidationError as e:
        first = e.errors()[0]
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"]).lstrip(".")
        raise RunDirError(f"{where}: {loc or 'the top level'}: {first['msg']}; not a sweep convbn wrote") from None
    for i in range(len(plan["runs"])):
        run_config(path, plan, i)  # every run's config, checked before anything trains
    return plan


def run_config(path, plan: dict, i: int):
    """The i-th run's config, from the text sweep.json keeps, through the same loader and checks as a config file;
    a problem (broken YAML, a Python tag, deep nesting, null, an invalid config) is one line naming the run."""
    where = f"{Path(path) / PLAN}: runs[{i}].config"
    try:
        return load_config(raw=parse_config_text(plan["runs"][i]["config"], where, empty="empty"),
                           written_by_convbn=True)
    except ConfigError as e:
        lines = e.lines if e.lines[0].startswith(where) else [f"{where}: {line}" for line in e.lines]
        raise RunDirError("; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")) from None


def summarize(path, sweep: dict) -> list:
    """One row per combination: mean and spread (sample standard deviation) over its seeds of the test accuracy,
    the final model's validation accuracy (and the best epoch's with the moving statistics), the moving-vs-batch
    statistics accuracy gap and the training time. A value that convbn cannot have written (in a hand-edited or
    damaged results.json: text, a list, an inference_gap that is no object, an accuracy outside 0..1) counts as
    missing."""
    groups = {}
    for r in sweep["runs"]:
        key = json.dumps(r["values"], sort_keys=True)
        groups.setdefault(key, {"values": r["values"], "results": [], "runs": 0})
        groups[key]["runs"] += 1
        results = RunDir(Path(path) / r["name"]).read_results()
        if results:
            groups[key]["results"].append(results)
    rows = []
    for g in groups.values():
        res = g["results"]
        row = {**g["values"], "seeds_done": len(res), "seeds": g["runs"]}
        for name, (get, low, high) in SUMMARIZED.items():
            values = [v for v in (finite(get(x)) for x in res) if v is not None and low <= v <= high]
            row[f"{name}_mean"], row[f"{name}_std"] = _spread(values)
        rows.append(row)
    return rows


def finite(value) -> float | None:
    """A JSON number as a finite float; None for anything else (text, a list, a bool, NaN, infinity, an integer
    too big for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _gap(results: dict):
    gap = results.get("inference_gap")
    return gap.get("gap") if isinstance(gap, dict) else None


def _val(results: dict):  # the final model's validation accuracy, as `runs` and the report show it
    return final_val(results)[0]


def _moving_val(results: dict):  # the best epoch's with the moving statistics where `runs` would show one
    return final_val(results, same=True)[1]


# a row's columns: (where in results.json, the least and the most a value convbn writes there can be); val_acc is
# the validation accuracy of the model the next command opens (`convbn eval RUN --split val`), val_acc_moving the
# best epoch's with the moving BN statistics training left
SUMMARIZED = {"test_acc": (lambda x: x.get("test_acc"), 0.0, 1.0), "val_acc": (_val, 0.0, 1.0),
              "val_acc_moving": (_moving_val, 0.0, 1.0),
              "bn_gap": (_gap, -1.0, 1.0), "time_s": (lambda x: x.get("wall_time_s"), 0.0, math.inf)}

# settings of BN that only shape the moving statistics, which precise BN (or the EMA's recalibration) replaces
OVERRIDDEN_BY_PRECISE_BN = ("decay",)


def notes(path, sweep: dict) -> list:
    """What the summary's reader must know: a swept BN setting that precise BN overrode in every finished run (its
    values cannot have changed the final models)."""
    swept = [k for k, _ in sweep["axes"] if k.rsplit(".", 1)[-1] in OVERRIDDEN_BY_PRECISE_BN and ".bn." in f".{k}"]
    if not swept:
        return []
    settled = []
    for r in sweep["runs"]:
        bn = RunDir(Path(path) / r["name"]).read_results().get("bn_statistics")
        if bn is not None:
            settled.append(isinstance(bn, dict) and (bn.get("mechanism") == "ema" or (
                bn.get("mechanism") == "precise_bn" and bn.get("kept") is True)))
    if not settled or not all(settled):
        return []
    return [f"{key}: precise BN recomputed the BN statistics of every run's final model, which replaces what this "
            "setting controls (how the moving statistics average during training), so its values did not change "
            "the final models; compare them with train.precise_bn: off" for key in swept]


def _spread(values: list) -> tuple:
    """(mean, sample standard deviation) of finite floats; (None, None) for none, or for values so near float's
    limit that their sum overflows (no accuracy, gap or time is)."""
    if not values:
        return None, None
    try:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    except (OverflowError, ValueError):
        return None, None
