"""Training: the run directory's files, determinism, resume == uninterrupted, Ctrl-C/SIGTERM, divergence."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

tf = pytest.importorskip("tensorflow")

from conftest import quiet, run_cli, tiny_raw  # noqa: E402
from convbn_cli.config import load_config  # noqa: E402
from convbn_cli.runs import RunDir  # noqa: E402
from convbn_cli.runs.target import open_target  # noqa: E402
from convbn_cli.train import Diverged, Interrupted, train  # noqa: E402


def weights(model):
    return [w.numpy() for w in model.weights]


def with_dropout(tmp_path, name):
    raw = tiny_raw(tmp_path, **{"output.name": name})
    raw["model"]["layers"].insert(3, {"type": "dropout", "rate": 0.3})
    raw["data"]["augment"] = {"shift": 0.1, "rotation": 10}
    return load_config(raw=raw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic):
    """One uninterrupted 2-epoch run (dropout and augmentation on), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = with_dropout(tmp, "a")
    return cfg, train(cfg, data=synthetic, log=quiet, progress=False)


def test_run_directory_holds_config_checkpoints_metrics_bn_stats_and_events(finished):
    cfg, result = finished
    run = RunDir(result.run_dir)
    assert run.path.name == "1" and run.path.parent.name == "a"
    assert run.load_config() == cfg  # the resolved config rebuilds the same run
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [16, 32]
    for r in rows:
        assert 0 <= r["val_acc"] <= 1 and r["images_per_s"] > 0 and np.isfinite(r["train_loss"])
    csv_lines = run.metrics_csv.read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,train_loss,train_acc,val_loss,val_acc,lr") and len(csv_lines) == 3
    ckpts = tf.train.get_checkpoint_state(str(run.checkpoints)).all_model_checkpoint_paths
    assert [os.path.basename(p) for p in ckpts] == ["ckpt-16", "ckpt-32"]
    assert tf.train.latest_checkpoint(str(run.best)) is not None
    stats = json.loads((run.bn_stats / "epoch_2.json").read_text())["layers"]
    assert sorted(stats) == ["conv1_bn", "conv2_bn"]
    live = open_target(run.path, "latest").model.get_layer("conv2_bn")  # the model as epoch 2 left it
    assert len(stats["conv2_bn"]["gamma"]) == 6
    np.testing.assert_allclose(stats["conv2_bn"]["moving_variance"], live.moving_variance.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["conv2_bn"]["gamma"], live.gamma.numpy(), rtol=1e-6)
    def tags(sub):  # {tag: [steps]} of one TensorBoard run
        found = {}
        for event_file in (run.tensorboard / sub).glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(event_file)):
                for v in event.summary.value:
                    found.setdefault(v.tag, []).append(event.step)
        return found

    train_tags, val_tags = tags("train"), tags("validation")
    # train and validation are separate TensorBoard runs with the same tags, so that their curves overlay
    assert {"epoch/loss", "epoch/accuracy"} <= set(val_tags) and val_tags["epoch/loss"] == [1, 2]
    assert {"epoch/loss", "epoch/accuracy", "epoch/learning_rate", "conv1_bn/gamma", "conv2_bn/beta"} <= set(train_tags)
    # per-step loss and learning rate every output.log_every_steps (20) steps over the 32 steps
    assert train_tags["step/loss"] == [20] and train_tags["step/learning_rate"] == [20]
    results = json.loads(run.results.read_text())
    assert results["test_acc"] == pytest.approx(result.test_acc) and 0 <= results["test_acc"] <= 1


def test_same_seed_gives_identical_weights(finished, tmp_path, synthetic):
    cfg, first = finished
    again = train(cfg.model_copy(update={"output": cfg.output.model_copy(update={"root": str(tmp_path)})}),
                  data=synthetic, log=quiet, progress=False)
    for a, b in zip(weights(first.model), weights(again.model)):
        np.testing.assert_array_equal(a, b)


def test_interrupt_then_resume_equals_uninterrupted(finished, tmp_path, synthetic):
    _, straight = finished
    cfg = with_dropout(tmp_path, "b")

    def ctrl_c_at_step_21(step, model):
        if step == 21:  # in the middle of epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        train(cfg, data=synthetic, log=quiet, progress=False, on_step=ctrl_c_at_step_21)
    assert e.value.exit_code == 130 and os.path.basename(e.value.checkpoint) == "ckpt-21"
    run_dir = os.path.dirname(os.path.dirname(e.value.checkpoint))
    assert [r["epoch"] for r in RunDir(run_dir).read_metrics()] == [1]
    resumed = train(cfg, data=synthetic, resume=run_dir, log=quiet, progress=False)
    assert str(resumed.run_dir) == run_dir
    for a, b in zip(weights(straight.model), weights(resumed.model)):
        np.testing.assert_array_equal(a, b)
    rows = RunDir(run_dir).read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["val_acc"] == straight.metrics[1]["val_acc"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, synthetic):
    cfg = load_config(raw=tiny_raw(tmp_path))
    holder = {}

    def poison(step, model):
        if step == 17:  # epoch 1 is done and checkpointed
            run = RunDir(cfg.output.root + "/tiny/1")
            holder["hashes"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                for p in run.checkpoints.iterdir() if p.is_file()}
        if step == 18:
            kernel = model.get_layer("conv1").kernel
            kernel.assign(tf.fill(kernel.shape, np.nan))

    with pytest.raises(Diverged, match=r"non-finite .* epoch 2, by step 20.*Last good checkpoint: .*ckpt-16"):
        train(cfg, data=synthetic, log=quiet, progress=False, on_step=poison)
    run = RunDir(cfg.output.root + "/tiny/1")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.checkpoints.iterdir() if p.is_file()}
    assert after == holder["hashes"]  # nothing written over the good checkpoint
    assert [r["epoch"] for r in run.read_metrics()] == [1]
    target = open_target(run.path, "latest")
    model, prefix = target.model, target.source
    assert prefix.endswith("ckpt-16") and all(np.isfinite(w).all() for w in weights(model))


def _tiny_file(tmp_path, **over):
    raw = tiny_raw(tmp_path, **{"data.max_train": 2000, "data.max_test": 500, **over})
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_signal_saves_checkpoint_and_resume_finishes(tmp_path, mnist_cache, sig, code):
    cfg_path = _tiny_file(tmp_path, **{"train.epochs": 200})
    env = {**os.environ, "CONVBN_DATA_DIR": str(mnist_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "convbn_cli", "train", str(cfg_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "tiny" / "1" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "saved" in err and "--resume" in err and "Traceback" not in err
    run_dir = metrics.parent
    r = run_cli("train", "--resume", run_dir, "train.epochs=2", env={"CONVBN_DATA_DIR": str(mnist_cache)})
    assert r.returncode == 0, r.stderr
    assert [row["epoch"] for row in RunDir(run_dir).read_metrics()] == [1, 2]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2


def test_cli_divergence_exits_3_with_one_line(tmp_path, mnist_cache):
    # three linear layers and momentum at lr 50: the weights grow geometrically until the loss overflows
    dense = [{"type": "flatten"}, {"type": "dense", "units": 64}, {"type": "dense", "units": 64},
             {"type": "dense", "units": 10}]
    cfg_path = _tiny_file(tmp_path, **{"train.optimizer": {"name": "momentum", "lr": 50.0}, "model.layers": dense})
    r = run_cli("train", cfg_path, env={"CONVBN_DATA_DIR": str(mnist_cache)})
    assert r.returncode == 3, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "Traceback" not in r.stderr


def test_cli_resume_refuses_other_overrides_and_missing_dirs(tmp_path):
    r = run_cli("train", "--resume", tmp_path / "nope")
    assert r.returncode == 2 and "no such run directory" in r.stderr
    r = run_cli("train", "--resume", tmp_path, "model.bn.decay=0.5")
    assert r.returncode == 2 and "only train.epochs and distribute.* may change when resuming" in r.stderr


@pytest.mark.parametrize("flags,gpus,want", [({"avx2", "avx512_bf16"}, 0, "mixed_bfloat16"),
                                             ({"avx2", "amx_bf16", "amx_tile"}, 0, "mixed_bfloat16"),
                                             ({"avx2", "avx512f"}, 0, "float32"), (set(), 1, "mixed_bfloat16")])
def test_precision_auto_is_bfloat16_only_where_the_hardware_has_it(flags, gpus, want):
    from convbn_cli.model.precision import cpu_flags, resolve_precision

    assert resolve_precision("auto", flags=flags, gpus=gpus)[0] == want
    assert resolve_precision("float32", flags={"amx_bf16"}, gpus=1) == ("float32", "as configured")
    # on a CPU, a net with conv widths that are not multiples of 16 stays float32 (measured 3x slower in bfloat16)
    precision, why = resolve_precision("auto", widths=[12, 24, 48], flags=flags, gpus=gpus)
    assert precision == ("mixed_bfloat16" if gpus else "float32")
    assert gpus or "conv widths 12, 24 are not multiples of 16" in why or want == "float32"
    assert resolve_precision("auto", widths=[16, 32, 48], flags=flags, gpus=gpus)[0] == want
    assert cpu_flags("processor: 0\nflags\t\t: fpu avx2 avx512_bf16\n") == {"fpu", "avx2", "avx512_bf16"}


def test_a_run_with_precision_auto_trains_in_what_this_machine_supports(tmp_path, synthetic):
    from convbn_cli.model.precision import resolve_precision
    from convbn_cli.runs import RunDir

    class ComputeDtype:  # what the training model computes in (the final model is a float32 copy either way)
        def on_start(self, trainer):
            self.dtypes = {layer.compute_dtype for layer in trainer.model.layers if layer.name.startswith("conv")}

    lines, seen = [], ComputeDtype()
    raw = tiny_raw(tmp_path, **{"train.precision": "auto", "train.epochs": 1})
    for layer, width in zip(raw["model"]["layers"], (16, 32)):
        layer["filters"] = width  # multiples of 16: bfloat16 where the hardware has it
    cfg = load_config(raw=raw)
    result = train(cfg, data=synthetic, log=lines.append, progress=False, subscribers=[seen])
    want = resolve_precision("auto", widths=[16, 32])[0]
    assert any(line.startswith(f"precision: {want} (auto: ") for line in lines), lines
    assert json.loads((RunDir(result.run_dir).results).read_text())["precision"] == want
    assert seen.dtypes == {"bfloat16" if want == "mixed_bfloat16" else "float32"}
