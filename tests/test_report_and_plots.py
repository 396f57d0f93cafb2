"""Issue 25, pictures: `convbn report` writes one self-contained HTML page per run or sweep, checked in a real
headless Chromium (rendered, pictures decoded, no console message, a screenshot with colour in it); the curves
of a short run come from steps.jsonl, so they are lines, not dots."""

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import assert_png_not_blank, quiet, screenshot, tiny_raw


def colourful(png: Path) -> float:
    """The fraction of the screenshot's pixels that are clearly coloured (the plots), not text or background."""
    from PIL import Image

    hsv = np.asarray(Image.open(png).convert("RGB").convert("HSV"), np.float32)
    return float(((hsv[..., 1] > 80) & (hsv[..., 2] > 60)).mean())


def test_a_run_report_opens_in_a_browser_with_every_picture(run_copy, cli, browser, tmp_path):
    r = cli("report", run_copy)
    assert r.exit_code == 0, r.output
    page = run_copy / "report.html"
    assert f"report written to {page}" in r.output
    text = page.read_text()
    for section in ("Results", "Training curves", "Test confusion matrix", "What the model trained on",
                    "BN parameters per channel", "Diagnose", "Config", "Provenance"):
        assert f"<h2>{section}</h2>" in text
    # curves, confusion, the first training batch, BN parameters; the BN trace and its heat map, the activations,
    # per feature map vs activation
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', text)) == 8
    assert '<img alt="the first training batch"' in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch: opens offline
    assert re.search(r'<div class="verdict (healthy|problems)">diagnose: [^<]+</div>', text)
    shot = tmp_path / "shot.png"
    console = screenshot(browser, page, shot)
    assert console == []  # the page's own check found every picture decoded
    assert_png_not_blank(shot, (3000, 1300))
    assert colourful(shot) > 0.01  # the plots are there, not only text

    # the check can fail: a picture that does not decode is reported on the console
    page.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    console = screenshot(browser, page, tmp_path / "broken.png")
    assert len(console) == 1 and "picture did not decode: training curves" in console[0]


def test_the_verdict_is_what_diagnose_says(run_copy, cli):
    from convbn_cli.analysis.diagnose import diagnose
    from convbn_cli.present.reports import DiagnoseReport

    assert cli("report", run_copy, "--batches", "3").exit_code == 0
    text = (run_copy / "report.html").read_text()
    expected = DiagnoseReport(diagnose(run_copy, batches=3)).verdict().removeprefix("verdict: ")
    assert f"diagnose: {expected}</div>" in text


def test_report_output_is_never_over_a_users_file(run_copy, cli, tmp_path):
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    r = cli("report", run_copy, "--output", mine)
    assert r.exit_code == 2 and "already exists; add --force" in r.output and mine.read_text() == "my notes"
    assert cli("report", run_copy, "--output", tmp_path / "page.txt").exit_code == 2
    assert cli("report", tmp_path).exit_code == 2  # neither a run nor a sweep
    forced = cli("report", run_copy, "--output", mine, "--force")
    assert forced.exit_code == 0 and "<h2>Training curves</h2>" in mine.read_text()


def test_a_sweep_report_shows_every_run(tmp_path, synthetic, monkeypatch, browser):
    from click.testing import CliRunner

    from convbn_cli.cli import main
    from convbn_cli.train import sweep as sw

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path, **{"train.epochs": 1})))
    path = sw.create(sw.plan(config, ["model.bn.decay=0.5,0.9"]))
    monkeypatch.setattr("convbn_cli.data.fetch", lambda *a, **k: synthetic)
    sw.run_sweep(path, log=quiet, progress=False)
    r = CliRunner().invoke(main, ["report", str(path)])
    assert r.exit_code == 0, r.output
    text = (path / "report.html").read_text()
    assert text.count("<h3>model.bn.decay=") == 2 and len(re.findall(r"<img alt=", text)) == 3  # summary + 2 runs
    assert screenshot(browser, path / "report.html", tmp_path / "s.png", size=(1400, 2400)) == []
    assert colourful(tmp_path / "s.png") > 0.0003  # thin lines: a page without its pictures has none


def test_steps_jsonl_holds_the_training_loss_every_few_steps_and_survives_a_resume(tmp_path, synthetic):
    """A one-epoch run's curves need points inside the epoch; a resumed run keeps the rows up to its checkpoint."""
    from convbn_cli.config import load_config
    from convbn_cli.runs import RunDir
    from convbn_cli.train import Interrupted, train

    cfg = load_config(raw=tiny_raw(tmp_path, **{"output.log_every_steps": 4}))  # 16 steps an epoch: every step
    with pytest.raises(Interrupted) as e:
        train(cfg, data=synthetic, log=quiet, progress=False,
              on_step=lambda step, model: os.kill(os.getpid(), signal.SIGINT) if step == 22 else None)
    run = RunDir(Path(e.value.checkpoint).parent.parent)
    first = run.read_steps()
    assert [r["step"] for r in first] == list(range(1, 17))  # written at the end of epoch 1
    train(cfg, data=synthetic, resume=run.path, log=quiet, progress=False)
    rows = run.read_steps()
    # steps 17-22 were logged before the interruption but not yet written: a gap in the curve, no wrong point
    assert [r["step"] for r in rows] == [*range(1, 17), *range(23, 33)] and rows[:16] == first
    assert all(0 <= r["train_acc"] <= 1 and r["loss"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[-1]["epoch"] == 2.0


def test_a_run_report_builds_its_model_once_and_loads_its_data_once(run_copy, mnist_cache, monkeypatch):
    """The page's evaluation, BN parameters and diagnose measure one opened model: one build and restore, one
    load of the dataset (they used to open the run three times)."""
    import convbn_cli.runs.target as target
    from convbn_cli.analysis.report import report

    counts = {}

    def counted(name, real):
        def call(*args, **kw):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kw)

        return call

    import convbn_cli.data.load as load

    for name in ("build_model", "restore"):  # what opening a run calls
        monkeypatch.setattr(target, name, counted(name, getattr(target, name)))
    # what loading its data calls (data.load, for built-in datasets and the user's own alike)
    monkeypatch.setattr(target, "dataset_arrays", counted("dataset_arrays", load.dataset_arrays))
    monkeypatch.setenv("CONVBN_DATA_DIR", str(mnist_cache))
    r = report(run_copy, batches=2)
    assert r["kind"] == "run" and (run_copy / "report.html").is_file()
    assert counts == {"build_model": 1, "restore": 1, "dataset_arrays": 1}
