"""Issue 36's done-when, on a real short run: 2 epochs on 3,000 real MNIST images whose moving BN statistics lag
(TF1's decay 0.999). The best epoch is chosen by validation with settled statistics; results.json, `convbn runs`,
the sweep summary, the report and the end-of-run line show the final model's validation accuracy, which is what
`convbn eval RUN --split val` gives; training itself is not changed by the settled validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from conftest import tiny_raw  # noqa: E402
from convbn_cli.analysis.report import report  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.present.reports import RunsReport, SweepReport  # noqa: E402
from convbn_cli.runs.listing import list_runs  # noqa: E402
from convbn_cli.runs.rundir import RunDir  # noqa: E402
from convbn_cli.runs.sweepdir import notes, summarize  # noqa: E402
from convbn_cli.train import train  # noqa: E402

SMALL_NET = [{"type": "conv", "filters": 8, "kernel": 3}, {"type": "pool"},
             {"type": "conv", "filters": 16, "kernel": 3}, {"type": "pool"}, {"type": "flatten"},
             {"type": "dense", "units": 32, "activation": "relu", "bn": True},
             {"type": "dense", "units": 10}]  # as test_final_model's: it learns in an epoch
LAGGING = {"data.max_train": 3000, "data.max_test": 1000, "model.bn": {"decay": 0.999}, "model.layers": SMALL_NET}


@pytest.fixture(scope="module")
def short(tmp_path_factory, mnist):
    tmp = tmp_path_factory.mktemp("settled")
    lines = []
    cfg = load_config(raw=tiny_raw(tmp, **LAGGING))
    return cfg, train(cfg, data=mnist, log=lines.append, progress=False, warn=lines.append), lines


def test_the_best_epoch_is_chosen_by_settled_validation_and_every_summary_shows_the_final_models(short, cli):
    cfg, result, lines = short
    rows = RunDir(result.run_dir).read_metrics()
    res = json.loads((result.run_dir / "results.json").read_text())
    assert [r["val_bn"] for r in rows] == ["precise_bn", "precise_bn"]  # the statistics lagged at each epoch
    for r in rows:
        assert r["val_acc"] > r["val_acc_moving"] + 0.2 and r["settle_s"] > 0 and r["val_acc_batch"] > 0.5
    settled = [r["val_acc"] for r in rows]
    best = max(i for i, v in enumerate(settled) if v == max(settled)) + 1  # the best settled, the later of equals
    assert res["best_epoch"] == best and res["best_val_acc"] == settled[best - 1]
    assert res["best_val_acc_moving"] == rows[best - 1]["val_acc_moving"]
    assert res["bn_statistics"]["mechanism"] == "precise_bn" and res["final_checkpoint"].startswith(
        "checkpoints/recalibrated/")
    # the final model's validation accuracy is what `convbn eval RUN --split val` measures
    out = cli("eval", result.run_dir, "--split", "val", "--json")
    assert out.exit_code == 0, out.output
    shown = res["val_acc"]
    assert json.loads(out.stdout)["accuracy"] == shown and abs(shown - settled[best - 1]) < 0.02
    figure = f"{shown:.2%}"
    moving = f"{res['best_val_acc_moving']:.2%}"
    # the end-of-run line, the runs table, the sweep summary and the report all show it, moving beside it
    assert any(line.startswith(f"best epoch {best}; final model {res['final_checkpoint']}: validation accuracy "
                               f"{figure} (with the moving BN statistics: {moving})") for line in lines), lines
    listed = list_runs(result.run_dir.parent)
    [run] = listed["runs"]
    assert run["val_acc"] == shown and run["val_acc_moving"] == res["best_val_acc_moving"]
    assert f"{figure} (moving {moving})" in RunsReport(listed).render()
    sweep = {"axes": [["model.bn.decay", ["0.999"]]], "seeds": 1,
             "runs": [{"name": result.run_dir.name, "values": {"model.bn.decay": "0.999"}}]}
    [row] = summarize(result.run_dir.parent, sweep)
    assert row["val_acc_mean"] == shown
    text = SweepReport({"sweep": "s", "axes": sweep["axes"], "seeds": 1, "rows": [row],
                        "notes": notes(result.run_dir.parent, sweep)}).render()
    assert f"{figure} (moving {moving})" in text and "note: model.bn.decay: precise BN recomputed" in text
    page = (result.run_dir / report(result.run_dir)["path"]).read_text()
    assert f"<td>validation accuracy (final model)</td><td>{figure} (best epoch with the moving BN statistics: " \
           f"{moving})</td>" in page


def test_the_epoch_lines_show_settled_validation_and_the_whole_runs_eta(short):
    _, result, lines = short
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and "with settled BN statistics (" in epochs[0]
    assert "; run: about " in epochs[0] and "; run: about" not in epochs[1]  # nothing left after the last
    assert any(line.startswith(f"next: convbn eval {result.run_dir} | convbn report {result.run_dir}")
               for line in lines)


def test_settled_validation_leaves_training_as_it_was(tmp_path, short, mnist):
    """The same run with precise BN off (no settled validation): the same training, step for step."""
    cfg, result, _ = short
    plain = train(load_config(raw=tiny_raw(tmp_path, **LAGGING, **{"train.precise_bn": "off"})), data=mnist,
                  log=lambda m: None, progress=False)
    for a, b in zip(result.metrics, plain.metrics):
        assert a["train_loss"] == b["train_loss"] and a["val_acc_moving"] == b["val_acc"]
    ours, theirs = RunDir(result.run_dir), RunDir(plain.run_dir)
    for name in ("epoch_1.json", "epoch_2.json"):  # the moving statistics training left, put back exactly
        a = json.loads((ours.bn_stats / name).read_text())["layers"]
        b = json.loads((theirs.bn_stats / name).read_text())["layers"]
        for layer in a:
            assert np.array_equal(a[layer]["moving_mean"], b[layer]["moving_mean"])
            assert np.array_equal(a[layer]["moving_variance"], b[layer]["moving_variance"])


RENORM = {"data.max_train": 800, "data.max_test": 200, "train.epochs": 2,
          "model.bn": {"decay": 0.9, "renorm": True}}


def _every_step(kept):
    """on_step keeping every variable of the model (trainable and not: renorm's too) after each step."""
    return lambda step, model: kept.append([v.numpy() for v in model.variables])


@pytest.fixture(scope="module")
def renorm(tmp_path_factory, mnist):
    """A renorm model trained three times, the same seed: validation with batch statistics each epoch and settled
    where they beat the moving ones (precise_bn: auto), settled every epoch (always), and neither (off)."""
    runs = {}
    for when in ("auto", "always", "off"):
        steps = []
        cfg = load_config(raw=tiny_raw(tmp_path_factory.mktemp(when), **RENORM, **{"train.precise_bn": when}))
        runs[when] = train(cfg, data=mnist, log=lambda m: None, progress=False, on_step=_every_step(steps)), steps
    return runs


def test_settled_validation_leaves_a_renorm_models_training_as_it_was(renorm):
    """The batch-statistics and settled evaluations call renorm layers in training mode, which moves renorm_mean,
    renorm_stddev and moving_stddev as well as the moving mean and variance: all of them are put back, so every
    variable after every step is what the run without settled validation had."""
    plain, theirs = renorm["off"]
    names = [v.path for v in plain.model.variables]
    assert any("renorm_mean" in n for n in names) and any("moving_stddev" in n for n in names)
    for when in ("auto", "always"):  # auto: the batch-statistics pass each epoch; always: the settled one
        settled, ours = renorm[when]
        assert "val_acc_batch" in settled.metrics[0] or when == "always"
        assert len(ours) == len(theirs) > 0
        for step, (a, b) in enumerate(zip(ours, theirs), 1):
            for name, x, y in zip(names, a, b):
                assert np.array_equal(x, y), f"{when}, step {step}: {name} differs"
        for a, b in zip(settled.metrics, plain.metrics):
            assert a["train_loss"] == b["train_loss"] and a["val_acc_moving"] == b["val_acc"]


def test_precise_bn_always_settles_every_epoch_without_the_gap_pass(renorm):
    """Under `always` the final model is recalibrated whatever the gap, so every epoch is judged settled (not only
    those whose moving statistics lag), and the batch-statistics pass that would decide it is not made."""
    settled, _ = renorm["always"]
    rows = RunDir(settled.run_dir).read_metrics()
    assert [r["val_bn"] for r in rows] == ["precise_bn", "precise_bn"]
    assert all("val_acc_batch" not in r and r["settle_s"] > 0 for r in rows)
    res = json.loads((settled.run_dir / "results.json").read_text())
    best = max(i for i, r in enumerate(rows) if r["val_acc"] == max(r["val_acc"] for r in rows))
    assert res["best_epoch"] == best + 1 and res["best_val_acc"] == rows[best]["val_acc"]
