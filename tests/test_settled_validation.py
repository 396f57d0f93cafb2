"""Issue 36, part 1: each epoch validated as the final model will be (settled BN statistics where the moving ones lag),
the best epoch chosen by that (the later of equals), and every summary showing the validation accuracy of the model
the next command opens, labelled, with the moving-statistics figure beside it; and the small defects around it."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_raw
from convbn_cli.config import dump_config, load_config
from convbn_cli.present import html, plots
from convbn_cli.present.reports import CompareReport, RunsReport, SweepReport, duration, plural
from convbn_cli.runs.listing import list_runs
from convbn_cli.runs.rundir import best_row, final_val, moving_val_acc
from convbn_cli.runs.sweepdir import notes, summarize

RESULTS = {"best_epoch": 2, "best_val_acc": 0.9767, "best_val_acc_moving": 0.1117, "val_acc": 0.9767,
           "test_acc": 0.98, "final_checkpoint": "checkpoints/recalibrated/ckpt-1", "wall_time_s": 46.0,
           "bn_statistics": {"mechanism": "precise_bn", "kept": True, "batches": 42},
           "inference_gap": {"gap": 0.0133}}


def row(epoch, val, moving=None, bn="precise_bn"):
    return {"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "lr": 0.1, "wall_time_s": 1.0 * epoch,
            "val_loss": 0.5, "val_acc": val, "val_acc_moving": val if moving is None else moving,
            "val_loss_moving": 2.0, "val_bn": bn if moving is not None else "moving"}


# --------------------------------------------------------------------------- which epoch, which figure

def test_the_best_epoch_is_the_best_settled_validation_and_the_later_of_equals():
    rows = [row(1, 0.965, 0.1117), row(2, 0.9767, 0.1117), row(3, 0.9767, 0.1117)]
    assert best_row(rows)[0]["epoch"] == 3  # a tie goes to the later epoch (it was the first)
    rows[2]["val_acc"] = 0.97
    assert best_row(rows)[0]["epoch"] == 2  # the settled figure chooses, whatever the moving one says
    old = [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.4}]  # a run from before: val_acc was moving
    assert best_row(old)[0]["epoch"] == 2 and moving_val_acc(old[0]) == 0.4
    assert best_row([{"epoch": 1, "train_acc": 0.3, "val_acc": None}])[1] == "train_acc"
    assert plots.best_row is best_row  # the curves mark the same epoch, chosen by the one function


def test_the_shown_validation_is_the_final_models_with_the_moving_one_beside_it_where_they_differ():
    assert final_val(RESULTS) == (0.9767, 0.1117)
    assert final_val({**RESULTS, "best_val_acc_moving": 0.9767}) == (0.9767, None)
    assert final_val({"best_val_acc": 0.91}) == (0.91, None)  # a run from before val_acc was recorded
    assert final_val({"val_acc": "x", "best_val_acc_moving": [1]}) == (None, None)  # damaged: missing


def test_a_final_model_on_its_trained_statistics_shows_one_validation_figure():
    """Without precise BN (or with it not kept) the final model is the best epoch's weights with their moving
    statistics: the epoch's figure and the final evaluation are two measurements of one model (in bfloat16 they
    differed by one image of 6,000), so no "(moving X)" beside it, and "which precise BN replaced" is not said."""
    for bn in ({"mechanism": "none"}, {"mechanism": "precise_bn", "kept": False}):
        results = {**RESULTS, "val_acc": 0.85383, "best_val_acc_moving": 0.854, "bn_statistics": bn}
        assert final_val(results) == (0.85383, None)
        assert final_val(results, same=True) == (0.85383, 0.85383)  # a sweep averages the one model's figure
    assert final_val({**RESULTS, "val_acc": 0.85383, "best_val_acc_moving": 0.854}) == (0.85383, 0.854)  # replaced


# --------------------------------------------------------------------------- the summaries

def test_runs_and_compare_show_the_final_models_validation_labelled():
    s = {"run": "a/1", "date": "2026-01-01 10:00", "dataset": "mnist", "architecture": "c8-p", "epochs_done": 2,
         "epochs": 2, "val_acc": 0.9767, "val_acc_moving": 0.1117, "best_val_acc": 0.9767, "test_acc": 0.98,
         "time_s": 46.0, "status": "finished", "differs": {}, "config": {}}
    text = RunsReport({"root": "runs", "runs": [s], "unreadable": []}).render()
    assert "final val" in text and "97.67% (moving 11.17%)" in text and "final val: validation accuracy of" in text
    text = CompareReport({"runs": [s, {**s, "run": "b/1", "val_acc_moving": None}], "differing_keys": []}).render()
    assert "final val" in text and "97.67% (moving 11.17%)" in text
    assert text.count("11.17%") == 1


def test_the_sweep_table_shows_the_final_validation_and_says_when_precise_bn_overrode_the_swept_setting(tmp_path):
    sweep = {"axes": [["model.bn.decay", ["0.9", "0.99"]]], "seeds": 1,
             "runs": [{"name": f"model.bn.decay={d}", "values": {"model.bn.decay": d}} for d in ("0.9", "0.99")]}
    for r in sweep["runs"]:
        (tmp_path / r["name"]).mkdir()
        (tmp_path / r["name"] / "results.json").write_text(json.dumps(RESULTS))
    rows = summarize(tmp_path, sweep)
    assert rows[0]["val_acc_mean"] == 0.9767 and rows[0]["val_acc_moving_mean"] == 0.1117
    said = notes(tmp_path, sweep)
    assert len(said) == 1 and said[0].startswith("model.bn.decay: precise BN recomputed")
    text = SweepReport({"sweep": str(tmp_path), "axes": sweep["axes"], "seeds": 1, "rows": rows,
                        "notes": said}).render()
    assert "final val" in text and "97.67% (moving 11.17%)" in text and "note: model.bn.decay" in text
    page = html.sweep_body({"axes": sweep["axes"], "rows": rows, "runs": [], "pictures": {}, "title": "t",
                            "seeds": 1, "notes": said})
    assert "+1.33 points" in page and "1.33%" not in page  # a gap in points is written in points
    assert "97.67%" in page and "11.17%" in page and "note:</b> model.bn.decay" in page
    same = html.sweep_body({"axes": sweep["axes"], "rows": [{**rows[0], "val_acc_moving_mean": 0.9767}], "runs": [],
                            "pictures": {}, "title": "t", "seeds": 1})
    assert same.count("97.67%") == 1  # the moving figure only where it differs
    # one run whose statistics were left as training kept them: the setting did matter there, nothing to say
    (tmp_path / sweep["runs"][1]["name"] / "results.json").write_text(json.dumps(
        {**RESULTS, "bn_statistics": {"mechanism": "none"}}))
    assert notes(tmp_path, sweep) == []
    assert notes(tmp_path, {**sweep, "axes": [["train.optimizer.lr", ["0.1", "0.2"]]]}) == []


def test_the_sweep_table_and_runs_agree_on_an_ema_run(tmp_path):
    """The EMA's final model is no epoch's weights: `runs` hides the best epoch's moving figure, and so does the
    sweep table (one computation, rundir.final_val); a figure equal to the final one is not shown either."""
    ema = {**RESULTS, "val_acc": 0.9812, "ema_val_acc": 0.9812, "bn_statistics": {"mechanism": "ema", "kept": True}}
    same = {**RESULTS, "best_val_acc_moving": RESULTS["val_acc"]}
    sweep = {"axes": [["train.optimizer.lr", ["0.1", "0.2"]]], "seeds": 1,
             "runs": [{"name": f"lr={lr}", "values": {"train.optimizer.lr": lr}} for lr in ("0.1", "0.2")]}
    config = dump_config(load_config(raw=tiny_raw(tmp_path)))
    for r, results in zip(sweep["runs"], (ema, same)):
        (tmp_path / r["name"]).mkdir()
        (tmp_path / r["name"] / "config.yaml").write_text(config)
        (tmp_path / r["name"] / "results.json").write_text(json.dumps(results))
    listed = {s["run"]: s for s in list_runs(tmp_path)["runs"]}
    rows = summarize(tmp_path, sweep)
    for r, row in zip(sweep["runs"], rows):
        run = listed[r["name"]]
        assert run["val_acc"] == row["val_acc_mean"] and run["val_acc_moving"] is None
    assert rows[0]["val_acc_mean"] == 0.9812 and rows[0]["val_acc_moving_mean"] is None  # was 0.1117
    text = SweepReport({"sweep": str(tmp_path), "axes": sweep["axes"], "seeds": 1, "rows": rows}).render()
    assert "98.12%" in text and "(moving" not in text
    assert "(moving" not in RunsReport(list_runs(tmp_path)).render()


def test_bn_statistics_settled_by_says_what_it_means():
    assert html.settled_by({"mechanism": "none"}).startswith("nothing needed: the moving statistics")
    assert html.settled_by({"mechanism": "precise_bn", "batches": 42, "kept": False}).endswith(
        "not kept, as it did not help: the moving statistics stayed")
    assert html.settled_by({}) == "-"
    # which images (results.json's bn_statistics.augmented): said where training augmented anything
    for augmented, words in ((False, "(3 unaugmented batches)"), (True, "(3 augmented batches)"),
                             (None, "(3 batches)"), ([1], "(3 batches)"), ({}, "(3 batches)"),  # hand-edited
                             (1, "(3 batches)"), (0, "(3 batches)")):
        assert html.settled_by({"mechanism": "ema", "batches": 3, "augmented": augmented}).endswith(words)


# --------------------------------------------------------------------------- the pictures

@pytest.fixture
def figures(monkeypatch):
    """The figures plots.py draws, kept instead of written (their data are what the test reads)."""
    from matplotlib.figure import Figure

    kept = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.append(fig))
    monkeypatch.setattr(Figure, "tight_layout", lambda self, *a, **k: None)  # the layout is not what is tested
    yield kept
    plots._pyplot().close("all")


def test_curves_plot_the_settled_validation_and_the_moving_one_dashed(figures):
    plots.curves([row(1, 0.965, 0.1117), row(2, 0.9767, 0.1117)], "x.png")
    acc = figures[0].axes[1]
    by_label = {line.get_label(): line for line in acc.get_lines()}
    assert list(by_label["validation (settled BN statistics)"].get_ydata()) == pytest.approx([96.5, 97.67])
    moving = by_label["validation, moving BN statistics"]
    assert moving.get_linestyle() == "--" and list(moving.get_ydata()) == pytest.approx([11.17, 11.17])
    assert "best epoch 2 (validation)" in by_label  # on the settled figure, not on a flat moving curve


def test_compare_plot_uses_percent(figures):
    plots.compare_curves({"a": [row(1, 0.965, 0.1117)], "b": [row(1, 0.9, None)]}, "x.png")
    ys = [y for line in figures[0].axes[0].get_lines() for y in line.get_ydata()]
    assert ys == pytest.approx([96.5, 90.0])


def test_identical_series_in_the_sweep_summary_do_not_hide_each_other(figures):
    axes = [["a", ["1", "2"]], ["b", ["x", "y"]]]
    rows = [{"a": a, "b": b, "seeds_done": 1, "seeds": 1, "test_acc_mean": 0.9, "test_acc_std": 0.0,
             "val_acc_mean": 0.9, "val_acc_std": 0.0, "val_acc_moving_mean": 0.9, "val_acc_moving_std": 0.0,
             "bn_gap_mean": 0.0, "bn_gap_std": 0.0} for a in ("1", "2") for b in ("x", "y")]
    plots.sweep_summary(rows, axes, "x.png", notes=["a note"])
    fig = figures[0]
    first = [c.lines[0] for c in fig.axes[0].containers if c.get_label() in ("b=x", "b=y")]
    assert len(first) == 2 and list(first[0].get_xdata()) != list(first[1].get_xdata())  # shifted apart
    assert first[0].get_marker() != first[1].get_marker()
    assert "validation accuracy of the final model" in fig.axes[1 * 2].get_title()  # its own panel, row 2
    assert "note: a note" in fig._suptitle.get_text()


# --------------------------------------------------------------------------- small defects

def test_one_epoch_is_singular():
    assert plural(1, "epoch") == "1 epoch" and plural(2, "epoch") == "2 epochs" and plural(0, "run") == "0 runs"


def test_durations_read_as_people_say_them():
    assert duration(40) == "40 s" and duration(600) == "10 min" and duration(3 * 3600) == "3.0 h"
