"""`convbn report`: what a run (or a sweep) did, as one self-contained HTML page to look at rather than read.

A run's page: the results and how the BN statistics were settled, the curves, the test confusion matrix, the
first training batch as the model got it, the per-channel BN parameters of every layer, the diagnose verdict with
its findings, the config and the provenance.
A sweep's page: the summary picture and table, and every run's curves side by side. The pictures are the same
matplotlib figures the run writes, embedded as PNG bytes, so the page needs no network and no other file
(present/html.py draws the page).
"""

from __future__ import annotations

import io
from pathlib import Path

from ..errors import ConvbnError
from ..files import write_text_atomic
from ..present import html
from ..present.inspection import plot as plot_bn
from ..present.plots import confusion_matrix, curves, sweep_summary, training_batch
from ..present.reports import DiagnoseReport, plural
from ..readers import read_text
from ..runs.rundir import RunDir, RunDirError
from ..runs.sweepdir import PLAN, notes, open_sweep, summarize

REPORT_NAME = "report.html"
MAX_CONFIG_TEXT = 1 << 20


def run_report(path, *, batches: int = 5, log=lambda m: None) -> dict:
    """Everything a run's page shows (see the module docstring): what the run's files say, and what measure()
    finds in its final model now. Its files are shown as they are; present/html.py shows a field of the wrong
    type (a hand-edited or damaged results.json) as missing."""
    run = RunDir.open(path)
    results, info, metrics, steps = run.read_results(), run.read_run_info(), run.read_metrics(), run.read_steps()
    measured = measure(run, batches=batches, log=log)
    if metrics:
        buf = io.BytesIO()
        curves(metrics, buf, title=str(run.path), steps=steps)
        measured["pictures"]["curves"] = buf.getvalue()
    return {"kind": "run", "title": str(run.path), "results": results, "metrics": metrics, "provenance": info,
            **measured, "config": read_text(run.config, MAX_CONFIG_TEXT, "a convbn config", RunDirError)}


def measure(run: RunDir, *, batches: int, log) -> dict:
    """The run's final model, opened once (one build and restore, one load of the data) for the evaluation, the
    BN parameters and diagnose: checkpoint, test, pictures (confusion, bn), verdict, findings, passed, bn_layers."""
    # TensorFlow: imported here, as a sweep's page needs none
    from ..runs.checkpoints import find
    from ..runs.target import open_target
    from .activations import report_pictures
    from .diagnose import diagnose
    from .evaluation import evaluate
    from .inspection import inspect_bn

    try:
        find(run, "best")
    except ConvbnError as e:
        raise RunDirError(f"{run.path}: nothing to report yet ({e})") from None
    t = open_target(run.path, "best")
    log(f"report of {run.path}: curves, test confusion matrix, the first training batch, BN parameters, diagnose")
    test = evaluate(t, split="test")
    buf = io.BytesIO()
    confusion_matrix(test["confusion"], t.config.dataset.class_names, buf,
                     title=f"test accuracy {test['accuracy']:.2%} ({test['images']} images)")
    pictures = {"confusion": buf.getvalue(), "train_batch": _first_batch(t)}
    bn = inspect_bn(t)
    buf = io.BytesIO()
    plot_bn(bn, buf)
    pictures["bn"] = buf.getvalue()
    traced = report_pictures(run, t, log=log)  # BN while training (bn_trace.npz) and BN's activations
    pictures.update(traced["pictures"])
    found = diagnose(t, batches=batches)
    return {"checkpoint": t.source, "test": test, "pictures": pictures, "bn_notes": traced["notes"],
            "verdict": DiagnoseReport(found).verdict().removeprefix("verdict: "),
            "findings": [f.to_json() for f in found["findings"]], "passed": found.get("passed", []),
            "bn_layers": {name: {"channels": layer["channels"], "impl": layer["impl"]}
                          for name, layer in bn["layers"].items()}}


def _first_batch(t) -> bytes:
    """The run's first training batch as its training drew it (train_batch.png), drawn again from its config and
    data, whether or not output.plots wrote one: the same images as the run's file, but for a run trained under a
    strategy with several replicas, whose first batch was the global one (the replicas are not recorded)."""
    from ..data.pipeline import first_batch

    pixels, labels = first_batch(t.splits(), t.config)
    buf = io.BytesIO()
    training_batch(pixels, labels, t.config.dataset.class_names, buf, t.config.data.augment)
    return buf.getvalue()


def sweep_report(path, *, log=lambda m: None) -> dict:
    """A sweep's page: its summary (as summary.json has it, measured again from the runs' results.json) and each
    run's curves; no TensorFlow."""
    path = Path(path)
    sweep = open_sweep(path)
    rows, said = summarize(path, sweep), notes(path, sweep)
    pictures = {}
    if any(r["seeds_done"] for r in rows) and sweep["axes"]:
        buf = io.BytesIO()
        sweep_summary(rows, sweep["axes"], buf, title=f"{path.parent.name}/{path.name}", notes=said)
        pictures["summary"] = buf.getvalue()
    runs = []
    for r in sweep["runs"]:
        run = RunDir(path / r["name"])
        entry = {"name": r["name"], "results": {}, "curves": None}
        if run.config.is_file():
            entry["results"] = run.read_results()
            metrics = run.read_metrics()
            if metrics:
                buf = io.BytesIO()
                curves(metrics, buf, title=r["name"], steps=run.read_steps())
                entry["curves"] = buf.getvalue()
        runs.append(entry)
    log(f"report of {path}: {sum(1 for e in runs if e['results'])} of {plural(len(runs), 'run')} finished")
    return {"kind": "sweep", "title": str(path), "axes": sweep["axes"], "seeds": sweep["seeds"], "rows": rows,
            "runs": runs, "pictures": pictures, "notes": said}


def report_kind(target) -> str:
    """"sweep" or "run": what a directory given to `convbn report` is (no TensorFlow: the CLI asks before it
    loads it, as only a run's page measures a model)."""
    target = Path(target)
    if not target.is_dir():
        raise ConvbnError(f"{target}: no such run or sweep directory")
    if (target / PLAN).exists():
        return "sweep"
    if (target / "config.yaml").exists():
        return "run"
    raise ConvbnError(f"{target}: not a run directory (config.yaml) or a sweep directory ({PLAN})")


def report(target, *, output=None, force: bool = False, batches: int = 5, log=lambda m: None) -> dict:
    """Write the HTML page of a run or sweep directory to `output` (default: TARGET/report.html, rewritten each
    time: convbn's own file); an existing `output` elsewhere is refused unless `force`. Returns {path, kind}."""
    target = Path(target)
    out = Path(output) if output else target / REPORT_NAME
    if output:
        if out.suffix.lower() not in (".html", ".htm"):
            raise ConvbnError(f"--output {out}: the page's name must end in .html")
        if (out.exists() or out.is_symlink()) and not force:
            raise ConvbnError(f"--output {out}: already exists; add --force to replace it")
        if out.is_dir():
            raise ConvbnError(f"--output {out}: is a directory; give a file name ending in .html")
    page = (sweep_report(target, log=log) if report_kind(target) == "sweep"
            else run_report(target, batches=batches, log=log))
    write_text_atomic(out, html.page(page))
    return {"path": str(out), "kind": page["kind"], "verdict": page.get("verdict")}
