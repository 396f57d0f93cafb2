"""`convbn runs` and `runs compare` (listing, differences, curves), sweeps (validated up front, resumable,
seeds), and what needs no TensorFlow."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

tf = pytest.importorskip("tensorflow")

from conftest import assert_png_not_blank, quiet, run_cli, tiny_raw  # noqa: E402
from convbn_cli.cli import main  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.train import train  # noqa: E402

# --------------------------------------------------------------------------- runs and runs compare

@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, synthetic):
    tmp = tmp_path_factory.mktemp("three")
    settings = [{"model.bn.decay": 0.9}, {"model.bn.decay": 0.5}, {"model.bn.decay": 0.9, "train.epochs": 1}]
    results = [train(load_config(raw=tiny_raw(tmp, **s)), data=synthetic, log=lambda m: None, progress=False)
               for s in settings]
    return tmp / "runs", results


def test_runs_lists_every_run_with_what_sets_it_apart(three_runs, tmp_path):
    root, results = three_runs
    r = CliRunner().invoke(main, ["runs", str(root), "--json"])
    assert r.exit_code == 0, r.output
    listing = json.loads(r.output)
    assert [x["run"] for x in listing["runs"]] == ["tiny/1", "tiny/2", "tiny/3"]
    assert listing["differing_keys"] == ["model.bn.decay", "train.epochs"]
    for line, result in zip(listing["runs"], results):
        saved = json.loads((result.run_dir / "results.json").read_text())
        assert line["test_acc"] == saved["test_acc"] and line["best_val_acc"] == saved["best_val_acc"]
        assert line["epochs_done"] == len(result.metrics) and line["dataset"] == "mnist"
    assert listing["runs"][1]["differs"] == {"model.bn.decay": 0.5, "train.epochs": 2}
    text = CliRunner().invoke(main, ["runs", str(root)]).output.splitlines()
    assert text[0].split() == ["run", "date", "(UTC)", "dataset", "layers", "epochs", "final", "val", "test", "time",
                               "differs"]
    assert text[3].startswith("tiny/2") and "c4/2-c6/2-g-d10" in text[3] and "bn.decay=0.5 train.epochs=2" in text[3]
    assert f"{results[1].test_acc:.2%}" in text[3]
    # an unfinished run (no results.json yet) is listed as such; the default ROOT is ./runs
    unfinished = tmp_path / "runs" / "x" / "1"
    shutil.copytree(results[0].run_dir, unfinished)
    (unfinished / "results.json").unlink()
    import os

    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(main, ["runs"])
    finally:
        os.chdir("/")
    assert r.exit_code == 0 and "x/1" in r.output and "unfinished" in r.output
    assert CliRunner().invoke(main, ["runs", str(tmp_path / "nope")]).exit_code == 2


def _written_run(root, name, layers, lr, test_acc):
    """A finished run's files as convbn writes them (no training: the listing reads files only)."""
    from convbn_cli.config import dump_config

    run = root / name / "1"
    run.mkdir(parents=True)
    raw = tiny_raw(root, **{"model.layers": layers, "train.optimizer.lr": lr})
    (run / "config.yaml").write_text(dump_config(load_config(raw=raw)))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.1, "train_acc": test_acc, "lr": lr,
                                                   "val_acc": test_acc - 0.01, "wall_time_s": 30.0}) + "\n")
    (run / "results.json").write_text(json.dumps({"test_acc": test_acc, "best_val_acc": test_acc - 0.01,
                                                  "wall_time_s": 31.0, "best_epoch": 1}))


def test_runs_of_three_architectures_fit_in_120_columns_and_sort_numbers_as_numbers(tmp_path):
    """The issue: ~120 flattened model.layers[i].* keys per row (~3,000 characters) once two architectures
    share a folder, and lr=0.001, 0.01, 0.003 sorted as text."""
    conv = lambda f, s=1: {"type": "conv", "filters": f, "kernel": 3, "stride": s}  # noqa: E731
    nets = {"small": [conv(12), {"type": "pool"}, conv(24), {"type": "pool"}, conv(48), {"type": "global_pool"},
                      {"type": "dense", "units": 10}],
            "wide": [conv(32, 2), conv(64, 2), {"type": "flatten"}, {"type": "dropout", "rate": 0.25},
                     {"type": "dense", "units": 128}, {"type": "dense", "units": 10}],
            "deep": [conv(8), conv(8), {"type": "pool"}, conv(16), conv(16), {"type": "pool"}, conv(32), conv(32),
                     {"type": "global_pool"}, {"type": "dense", "units": 10}]}
    for (name, layers), lr, acc in zip(nets.items(), (0.01, 0.001, 0.003), (0.991, 0.987, 0.994)):
        _written_run(tmp_path, name, layers, lr, acc)
    text = CliRunner().invoke(main, ["runs", str(tmp_path)]).output.splitlines()
    assert max(len(line) for line in text) <= 120, "\n".join(text)
    assert any("c12-p-c24-p-c48-g-d10" in line for line in text)
    assert any("c32/2-c64/2-dr-d128-d10" in line for line in text)
    assert all("layers[" not in line for line in text)
    by_lr = CliRunner().invoke(main, ["runs", str(tmp_path), "--sort", "train.optimizer.lr", "--json"])
    by_lr = json.loads(by_lr.output)
    assert [r["config"]["train.optimizer.lr"] if "config" in r else r["differs"]["train.optimizer.lr"]
            for r in by_lr["runs"]] == [0.001, 0.003, 0.01]
    by_test = json.loads(CliRunner().invoke(main, ["runs", str(tmp_path), "--sort", "test", "--json"]).output)
    assert [r["run"] for r in by_test["runs"]] == ["wide/1", "small/1", "deep/1"]
    bad = CliRunner().invoke(main, ["runs", str(tmp_path), "--sort", "nope"])
    assert bad.exit_code == 2 and "--sort nope: not a column" in bad.output
    compare = CliRunner().invoke(main, ["runs", "compare", *(str(tmp_path / n / "1") for n in nets),
                                        "--plot", str(tmp_path / "c.png")]).output.splitlines()
    assert compare[2].split()[0] == "layers" and len(compare) < 20 and max(map(len, compare)) <= 120


def test_runs_compare_shows_differences_and_overlays_curves(three_runs, tmp_path, monkeypatch):
    root, results = three_runs
    monkeypatch.chdir(tmp_path)
    a, b = results[0].run_dir, results[1].run_dir
    r = CliRunner().invoke(main, ["runs", "compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[2].split() == ["model.bn.decay", "0.9", "0.5"] and "curves: compare-1.png" in r.output
    assert_png_not_blank(tmp_path / "compare-1.png")
    again = CliRunner().invoke(main, ["runs", "compare", str(a), str(b), "--json"])
    assert json.loads(again.output)["plot"] == "compare-2.png"  # never over the earlier picture
    refused = CliRunner().invoke(main, ["runs", "compare", str(a), str(b), "--plot", "compare-1.png"])
    assert refused.exit_code == 2 and "add --force" in refused.output
    assert CliRunner().invoke(main, ["runs", "compare", str(a)]).exit_code == 2
    bad = CliRunner().invoke(main, ["runs", "compare", str(a), str(tmp_path)])
    assert bad.exit_code == 2 and "config.yaml is missing" in bad.output


# --------------------------------------------------------------------------- sweep

def test_sweep_validates_every_combination_before_training(tmp_path):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    r = CliRunner().invoke(main, ["sweep", str(config), "model.bn.decay=0.9,1.5", "train.epochs=0,1"])
    assert r.exit_code == 2
    assert "model.bn.decay=1.5,train.epochs=1: model.bn.decay: must be" in r.output
    assert "model.bn.decay=0.9,train.epochs=0: train.epochs" in r.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_sweep_of_2x2_survives_an_interruption(mnist_cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path, **{"data.max_train": 800, "data.max_test": 200,
                                                            "train.epochs": 1})))
    args = [sys.executable, "-m", "convbn_cli", "sweep", str(config), "model.bn.decay=0.5,0.99",
            "train.label_smoothing=0.0,0.1", "--no-progress"]
    sweep_dir = tmp_path / "runs" / "tiny" / "sweep-1"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(sweep_dir.glob("*/results.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # during the second combination (or right after the first)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"convbn sweep --resume {sweep_dir}" in err
    first = sweep_dir / "model.bn.decay=0.5,train.label_smoothing=0.0" / "results.json"
    done_at = first.stat().st_mtime_ns
    resumed = run_cli("sweep", "--resume", sweep_dir, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "[1/4] model.bn.decay=0.5,train.label_smoothing=0.0: done already" in resumed.stdout
    assert first.stat().st_mtime_ns == done_at  # a finished combination is not trained again
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [(r["model.bn.decay"], r["train.label_smoothing"]) for r in summary["rows"]] == [
        ("0.5", "0.0"), ("0.5", "0.1"), ("0.99", "0.0"), ("0.99", "0.1")]
    for row in summary["rows"]:
        name = f"model.bn.decay={row['model.bn.decay']},train.label_smoothing={row['train.label_smoothing']}"
        saved = json.loads((sweep_dir / name / "results.json").read_text())
        assert row["seeds_done"] == 1 and row["test_acc_mean"] == saved["test_acc"]
        assert row["bn_gap_mean"] == saved["inference_gap"]["gap"]
        assert load_config(sweep_dir / name / "config.yaml").model.bn.decay == float(row["model.bn.decay"])
    csv_rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("model.bn.decay,train.label_smoothing,seeds_done,seeds,test_acc_mean") \
        and len(csv_rows) == 5
    assert_png_not_blank(sweep_dir / "summary.png")
    assert "written: " in resumed.stdout and "BN gap (batch - moving)" in resumed.stdout


def test_sweep_seeds_give_mean_and_spread(tmp_path, synthetic, monkeypatch):
    from convbn_cli.train import sweep as sw

    raw = tiny_raw(tmp_path, **{"train.epochs": 1})
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    planned = sw.plan(config, ["model.bn.decay=0.5,0.9"], seeds=2)
    assert [r["name"] for r in planned["runs"]] == ["model.bn.decay=0.5,seed=1", "model.bn.decay=0.5,seed=2",
                                                   "model.bn.decay=0.9,seed=1", "model.bn.decay=0.9,seed=2"]
    path = sw.create(planned)
    import convbn_cli.data.sources as sources

    monkeypatch.setattr(sources, "fetch", lambda *a, **k: synthetic)  # where convbn_cli.data's lazy name leads
    lines = []
    summary = sw.run_sweep(path, log=lines.append, progress=False)
    progress = [ln for ln in lines if ln.startswith("[")]
    assert progress[0] == "[1/4] model.bn.decay=0.5,seed=1"  # nothing to estimate from yet
    assert progress[1].startswith("[2/4] model.bn.decay=0.5,seed=2; 3 runs left including this one, about ")
    assert progress[3].startswith("[4/4] model.bn.decay=0.9,seed=2; 1 run left including this one, about ")
    row = summary["rows"][0]
    accs = [json.loads((path / f"model.bn.decay=0.5,seed={s}" / "results.json").read_text())["test_acc"]
            for s in (1, 2)]
    assert row["seeds_done"] == 2 and row["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))


def test_listing_comparing_and_planning_need_no_tensorflow(three_runs, tmp_path):
    import subprocess
    import sys

    root, results = three_runs
    code = ("import sys; from click.testing import CliRunner; from convbn_cli.cli import main; "
            "r = CliRunner().invoke(main, ['runs', sys.argv[1]]); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['runs', 'compare', sys.argv[2], sys.argv[3], '--plot', sys.argv[4]]); "
            "assert r.exit_code == 0, r.output; "
            "from convbn_cli.train import sweep; import convbn_cli.present.plots; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(results[0].run_dir), str(results[1].run_dir),
                          str(tmp_path / "c.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_analysis_names_are_the_functions_whatever_was_imported_first():
    import convbn_cli.analysis.evaluation  # noqa: F401  (a submodule import must not shadow the function)
    import convbn_cli.analysis.recalibration  # noqa: F401
    from convbn_cli.analysis import evaluate, recalibrate

    assert callable(evaluate) and callable(recalibrate)


def test_sweep_resumes_a_combination_killed_before_its_config_was_in_place(tmp_path, synthetic, monkeypatch):
    """SIGKILL the moment a combination's directory appears: it holds only `.config.yaml.XXXXXXXX.tmp`, which made
    every `sweep --resume` refuse it ("already exists; not overwriting it") until it was deleted by hand."""
    import yaml

    import convbn_cli.data.sources as sources
    from convbn_cli.train import sweep as sw

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path, **{"train.epochs": 1, "data.max_train": 320})))
    path = sw.create(sw.plan(config, ["model.bn.decay=0.5,0.9"], seeds=1))
    first = path / "model.bn.decay=0.5"
    first.mkdir()
    (first / ".config.yaml.k3x9q0ab.tmp").write_text("data: {")  # what the killed rename left
    monkeypatch.setattr(sources, "fetch", lambda *a, **k: synthetic)
    summary = sw.run_sweep(path, log=quiet, progress=False)
    assert (first / "results.json").is_file() and not (first / ".config.yaml.k3x9q0ab.tmp").exists()
    assert [r["seeds_done"] for r in summary["rows"]] == [1, 1]


@pytest.mark.parametrize("text, needle", [
    ("model: !!python/object/apply:os.system ['touch /tmp/convbn-pwned']\n", "not valid YAML"),
    ("model: [1, 2\n", "not valid YAML"),
    ("model:\n  layers: []\n", "model.layers"),  # valid YAML, not a valid config (a KeyError before: no data)
    ("[" * 5000 + "]" * 5000, "nesting depth"),
    ("null\n", "empty"),
])
def test_a_hand_edited_sweep_config_is_one_line(tmp_path, text, needle):
    """sweep.json's config text goes through the config loader and its one-line errors, like a config file."""
    import yaml

    from convbn_cli.train import sweep as sw

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    path = sw.create(sw.plan(config, ["model.bn.decay=0.5,0.9"], seeds=1))
    plan = json.loads((path / "sweep.json").read_text())
    plan["runs"][1]["config"] = text
    (path / "sweep.json").write_text(json.dumps(plan))
    for args in (["sweep", "--resume", str(path)], ["report", str(path)]):
        r = CliRunner().invoke(main, args)
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, (args, r.output)
        assert "sweep.json: runs[1].config" in errors[0] and needle in errors[0], errors[0]
    assert not os.path.exists("/tmp/convbn-pwned")
