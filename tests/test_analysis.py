"""`convbn eval` and `convbn inspect-bn`: numbers true to the checkpoint, formats that round-trip, clear errors."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import yaml

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from convbn_cli.analysis import compare, evaluate, inspect_bn  # noqa: E402
from convbn_cli.data.pipeline import eval_dataset, make_splits  # noqa: E402
from convbn_cli.model import bn_layers, build_model  # noqa: E402
from convbn_cli.runs.target import open_target  # noqa: E402


def latest(result):
    return tf.train.latest_checkpoint(str(result.run_dir / "checkpoints"))


def test_inspect_numbers_equal_the_checkpoint_variables(trained):
    cfg, result = trained
    prefix = latest(result)
    got = inspect_bn(result.run_dir, which="latest")
    assert got["checkpoint"] == prefix and list(got["layers"]) == ["conv1_bn", "conv2_bn"]
    # the model the latest checkpoint restores is what the file holds
    reader = tf.train.load_checkpoint(prefix)
    model = open_target(prefix).model
    for layer in bn_layers(model):
        mine = got["layers"][layer.name]
        idx = model.layers.index(layer)
        for q in ("moving_mean", "moving_variance"):  # read straight from the checkpoint file
            raw = reader.get_tensor(f"model/_operations/{idx}/{q}/.ATTRIBUTES/VARIABLE_VALUE")
            np.testing.assert_array_equal(mine[q].astype(np.float32), raw)
        for q in ("gamma", "beta"):
            np.testing.assert_array_equal(mine[q].astype(np.float32), getattr(layer, q).numpy())
        scale = mine["gamma"] / np.sqrt(mine["moving_variance"] + layer.epsilon)
        np.testing.assert_allclose(mine["scale"], scale)
        np.testing.assert_allclose(mine["shift"], mine["beta"] - mine["moving_mean"] * scale)
        # and the affine map is what the layer does at inference
        x = np.random.default_rng(0).normal(size=(2, 3, 3, mine["channels"])).astype(np.float32)
        np.testing.assert_allclose(layer(x, training=False), x * mine["scale"] + mine["shift"], rtol=1e-4,
                                   atol=1e-4)


def test_eval_accuracy_equals_a_hand_run_keras_evaluation(trained, mnist):
    cfg, result = trained
    prefix = latest(result)
    r = evaluate(prefix, data=mnist)
    model = build_model(cfg)
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    loss, acc = model.evaluate(eval_dataset(make_splits(mnist, cfg), cfg, "test"), verbose=0)
    assert r["images"] == 1000 and r["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert r["loss"] == pytest.approx(loss, rel=1e-4)
    assert r["confusion"].sum() == 1000 and r["confusion"].shape == (10, 10)
    per_class = r["confusion"].diagonal() / r["confusion"].sum(1)
    np.testing.assert_allclose(r["per_class_accuracy"], per_class)


def test_batch_statistics_differ_from_moving_ones_and_leave_the_model_alone(trained, mnist):
    _, result = trained
    moving = evaluate(result.run_dir, data=mnist, which="latest")
    batch = evaluate(result.run_dir, data=mnist, which="latest", bn_stats="batch")
    # 2 short epochs at decay 0.99: the moving averages still remember their start (0 and 1)
    assert batch["accuracy"] != moving["accuracy"] and batch["loss"] != pytest.approx(moving["loss"])
    assert evaluate(result.run_dir, data=mnist, which="latest")["accuracy"] == moving["accuracy"]


def test_eval_cli_text_and_json(trained, cli):
    _, result = trained
    r = cli("eval", result.run_dir, "--json", "--split", "val")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # progress and data-source lines go to stderr
    assert out["split"] == "val" and out["images"] == 400 and sum(map(sum, out["confusion"])) == 400
    assert "best" in out["checkpoint"]
    text = cli("eval", result.run_dir, "--checkpoint", "latest", "--no-progress")
    assert text.exit_code == 0 and "confusion matrix" in text.output and "per-class accuracy: 0:" in text.output


def test_inspect_json_and_csv_round_trip(trained, cli):
    _, result = trained
    api = inspect_bn(result.run_dir)
    j = cli("inspect-bn", result.run_dir, "--format", "json")
    assert j.exit_code == 0, j.output
    data = json.loads(j.stdout)
    for name, layer in api["layers"].items():
        for q in ("gamma", "beta", "moving_mean", "moving_variance", "scale", "shift"):
            np.testing.assert_array_equal(np.array(data["layers"][name][q]), layer[q])
        assert data["layers"][name]["summary"]["channels"] == layer["channels"]
    c = cli("inspect-bn", result.run_dir, "--format", "csv", "--layer", "conv2_bn")
    rows = list(csv.DictReader(io.StringIO(c.stdout)))
    assert len(rows) == 6 and {r["layer"] for r in rows} == {"conv2_bn"}
    for r in rows:
        ch = int(r["channel"])
        assert float(r["moving_variance"]) == api["layers"]["conv2_bn"]["moving_variance"][ch]
        assert float(r["gamma"]) == api["layers"]["conv2_bn"]["gamma"][ch]


def test_inspect_table_rank_compare_and_plot(trained, cli, tmp_path):
    _, result = trained
    prefixes = tf.train.get_checkpoint_state(str(result.run_dir / "checkpoints")).all_model_checkpoint_paths
    first, last = prefixes[0], prefixes[-1]
    t = cli("inspect-bn", first, "--rank", "--all", "--dead-threshold", "0.5")
    assert t.exit_code == 0, t.output
    assert "conv1_bn  (fused, 4 channels, epsilon 0.001, decay 0.99)" in t.output
    assert "fraction of channels with |gamma| below 0.01:" in t.output
    gammas = np.abs(inspect_bn(first)["layers"]["conv2_bn"]["gamma"])
    section = t.output.split("conv2_bn  (")[1].splitlines()
    listed = [int(line.split()[0]) for line in section[3:9]]
    assert listed == list(np.argsort(-gammas, kind="stable"))  # ordered by |gamma|, largest first
    diff = compare(inspect_bn(first), inspect_bn(last))
    np.testing.assert_allclose(diff["conv1_bn"]["gamma"],
                               inspect_bn(last)["layers"]["conv1_bn"]["gamma"]
                               - inspect_bn(first)["layers"]["conv1_bn"]["gamma"])
    cmp = cli("inspect-bn", first, "--compare", last, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(cmp.stdout)))
    assert len(rows) == 10 and float(rows[0]["d_gamma"]) == diff["conv1_bn"]["gamma"][0]
    png = tmp_path / "bn.png"
    p = cli("inspect-bn", result.run_dir, "--plot", png)
    assert p.exit_code == 0, p.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 800 and img[..., :3].std() > 0.05  # not blank


def test_bad_targets_give_one_line_and_exit_2(trained, cli, tmp_path, mnist):
    cfg, result = trained
    prefix = latest(result)
    # a checkpoint from another architecture, under a run directory whose config differs
    other = tmp_path / "other"
    shutil.copytree(result.run_dir, other)
    conf = yaml.safe_load((other / "config.yaml").read_text())
    conf["model"]["layers"][0]["filters"] = 5
    (other / "config.yaml").write_text(yaml.safe_dump(conf))
    # a truncated checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(result.run_dir, broken)
    for data_file in (broken / "checkpoints").glob("*.data-*"):
        data_file.write_bytes(data_file.read_bytes()[:100])
    no_config = tmp_path / "noconfig"
    shutil.copytree(result.run_dir, no_config)
    (no_config / "config.yaml").unlink()
    cases = [
        (tmp_path / "missing", "no such run directory or checkpoint"),
        (no_config, "not a run directory (config.yaml is missing)"),
        (other, "cannot restore this model from it"),
        (str(broken / "checkpoints" / "ckpt-") + prefix.rsplit("-", 1)[1], "cannot restore this model from it"),
        (prefix + ".index", "give the checkpoint prefix without its extension"),
    ]
    for target, message in cases:
        for command in (["eval", target, "--checkpoint", "latest"], ["inspect-bn", target, "--checkpoint", "latest"]):
            r = cli(*command)
            assert r.exit_code == 2, (command, r.output)
            errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and message in errors[0], (command, r.output)
            assert "Traceback" not in r.output
    r = cli("inspect-bn", result.run_dir, "--layer", "conv9_bn")
    assert r.exit_code == 2 and "no BN layer named conv9_bn (the model has: conv1_bn, conv2_bn)" in r.output


def test_checkpoint_option_selects_a_step_or_recalibrated(trained, cli, tmp_path, mnist):
    _, result = trained
    steps = [int(p.rsplit("-", 1)[1]) for p in
             tf.train.get_checkpoint_state(str(result.run_dir / "checkpoints")).all_model_checkpoint_paths]
    first = evaluate(result.run_dir, which=str(steps[0]), data=mnist)
    assert first["checkpoint"].endswith(f"ckpt-{steps[0]}") and "best" not in first["checkpoint"]
    assert inspect_bn(result.run_dir, which=steps[-1])["checkpoint"].endswith(f"ckpt-{steps[-1]}")
    r = cli("eval", result.run_dir, "--checkpoint", "999999")
    assert r.exit_code == 2 and "no checkpoint of step 999999" in r.output
    r = cli("eval", result.run_dir, "--checkpoint", "newest")
    assert r.exit_code == 2 and "expected one of best, latest, recalibrated, ema or a training step" in r.output
    r = cli("inspect-bn", result.run_dir, "--checkpoint", "recalibrated")
    assert r.exit_code == 2 and "no recalibrated checkpoint" in r.output
    r = cli("eval", result.run_dir, "--checkpoint", "ema")
    assert r.exit_code == 2 and "no EMA checkpoint (train.ema was off" in r.output


def test_eval_shows_the_datasets_class_names():
    from convbn_cli.data.registry import FASHION_MNIST
    from convbn_cli.present.reports import EvalReport

    confusion = np.eye(10, dtype=np.int64) * 3
    text = EvalReport({"checkpoint": "c", "split": "test", "images": 30, "bn_stats": "moving", "loss": 0.1,
                       "accuracy": 1.0, "per_class_accuracy": np.ones(10), "confusion": confusion,
                       "class_names": list(FASHION_MNIST.class_names)}).render()
    assert "T-shirt/top: 100.00%" in text and "Ankle boot: 100.00%" in text
    assert "  T-shirt/top:     3" in text


def test_an_external_keras_model_opens_without_a_config(tmp_path):
    from convbn_cli.runs.target import open_target

    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(3, 3)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(10)(x)).save(tmp_path / "theirs.keras")
    t = open_target(tmp_path / "theirs.keras")
    assert t.kind == "external" and t.config is None and len(bn_layers(t.model)) == 1
    with pytest.raises(Exception, match="no run directory"):
        t.arrays()


def test_inspect_summary_first_global_rank_and_a_compare_plot_of_both(trained, cli, tmp_path):
    """Issue 25: 342 lines with no summary first; --rank ranked within a layer only; --compare --plot ignored
    the second run."""
    import json

    _, result = trained
    prefixes = tf.train.get_checkpoint_state(str(result.run_dir / "checkpoints")).all_model_checkpoint_paths
    first, last = prefixes[0], prefixes[-1]
    t = cli("inspect-bn", last)
    assert t.exit_code == 0, t.output
    lines = t.stdout.splitlines()
    assert len(lines) <= 8 and lines[2].split()[:3] == ["layer", "impl", "channels"]
    assert [ln.split()[0] for ln in lines[4:6]] == ["conv1_bn", "conv2_bn"] and "per-channel values: --all" in t.stdout
    j = json.loads(cli("inspect-bn", last, "--rank", "--format", "json").stdout)
    layers = inspect_bn(last)["layers"]
    expected = sorted(((abs(float(g)), n, c) for n, layer in layers.items() for c, g in enumerate(layer["gamma"])),
                      key=lambda x: -x[0])
    assert [(r["layer"], r["channel"]) for r in j["global_rank"]] == [(n, c) for _, n, c in expected]
    r = cli("inspect-bn", last, "--rank").stdout
    low = expected[-1]
    assert f"the 10 least important: {low[1]}[{low[2]}]" in r
    alone, both = tmp_path / "alone.png", tmp_path / "both.png"
    assert cli("inspect-bn", last, "--plot", alone).exit_code == 0
    c = cli("inspect-bn", last, "--compare", first, "--plot", both)
    assert c.exit_code == 0 and "differences (the other checkpoint minus this one):" in c.stdout
    import matplotlib.image

    a, b = matplotlib.image.imread(alone), matplotlib.image.imread(both)
    grey = lambda img: int(((abs(img[..., 0] - img[..., 1]) < 0.02) & (abs(img[..., 1] - img[..., 2]) < 0.02)  # noqa: E731
                            & (img[..., 0] > 0.35) & (img[..., 0] < 0.65)).sum())
    assert grey(b) > grey(a) + 500  # the other checkpoint's grey bars are drawn
