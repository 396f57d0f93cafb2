"""Config schema, overrides, shape checks and `convbn validate` (which must never import TensorFlow)."""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest
import yaml
from click.testing import CliRunner
from own_data import SHAPES

from conftest import CONFIGS, own_dataset_for, run_cli
from convbn_cli.cli import main
from convbn_cli.config import ConfigError, dump_config, load_config, plan_layers
from convbn_cli.config.loader import apply_overrides, parse_key

BASE = {
    "model": {
        "layers": [
            {"type": "conv", "filters": 8, "kernel": 5},
            {"type": "pool", "size": 2},
            {"type": "conv", "filters": 16, "kernel": 3, "bn": {"decay": 0.9}},
            {"type": "flatten"},
            {"type": "dense", "units": 10},
        ]
    }
}


def problems(raw):
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    return e.value.problems


def with_changes(*pairs):
    raw = copy.deepcopy(BASE)
    return apply_overrides(raw, [f"{k}={v}" for k, v in pairs])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, tmp_path):
    cfg = load_config(path, own_dataset_for(path, tmp_path))
    assert cfg.output.name == path.stem
    assert plan_layers(cfg)[-1].out_shape == (cfg.dataset.num_classes,)
    assert cfg.dataset.num_classes == (len(SHAPES) if cfg.own else 10)


BAD = [
    (with_changes(("model.layers[2].bn.decay", "1.5")), ["model.layers[2].bn.decay: must be in [0, 1), got 1.5"]),
    (with_changes(("model.bn.epsilon", "0")), ["model.bn.epsilon: must be > 0, got 0"]),
    (with_changes(("model.bn.epsilon", ".nan")), ["model.bn.epsilon: must be a finite number, got nan"]),
    (with_changes(("model.layers[0].filters", "'8'")), ["model.layers[0].filters: must be an integer, got '8'"]),
    (with_changes(("model.layers[0].filters", "0")), ["model.layers[0].filters: must be in [1, 65536], got 0"]),
    (with_changes(("model.layers[0].padding", "full")),
     ["model.layers[0].padding: must be one of 'same' or 'valid', got 'full'"]),
    (with_changes(("model.layers[0].kernel", "[5, 5, 5]")),
     ["model.layers[0].kernel: must be an integer or a list of 2 integers, got 3 items"]),
    (with_changes(("model.layers[0].kernel", "0")), ["model.layers[0].kernel: must be >= 1, got 0"]),
    (with_changes(("model.layers[0].kernel", "[3]")),
     ["model.layers[0].kernel: must be an integer or a list of 2 integers, got 1 item"]),
    (with_changes(("model.layers[0].kernel", "[]")),
     ["model.layers[0].kernel: must be an integer or a list of 2 integers, got 0 items"]),
    (with_changes(("model.layers[0].stride", "'a'")),
     ["model.layers[0].stride: must be an integer or a list of 2 integers, got 'a'"]),
    (with_changes(("model.layers[0]", "{type: crop, border: [2, 0]}")),
     ["model.layers[0].border: must be >= 1, got 0"]),
    (with_changes(("model.layers[0]", "{type: crop, border: 2.5}")),
     ["model.layers[0].border: must be an integer or a list of 2 integers, got 2.5"]),
    (with_changes(("model.layers[0].filterz", "3")),
     ["model.layers[0].filterz: unknown key; did you mean filters? (expected one of: type, filters, kernel, stride, "
      "padding, dilation, activation, bn, pool)"]),
    (with_changes(("model.layers[1].type", "convv")),
     ["model.layers[1].type: unknown layer type 'convv'; did you mean conv? (expected one of: conv, pool, dropout, "
      "flatten, global_pool, dense, crop)"]),
    (with_changes(("model.layers[0].bn", "7")),
     ["model.layers[0].bn: must be true, false or a mapping of BN settings, got 7"]),
    (with_changes(("model.layers[0].bn.center", "'yes'")),
     ["model.layers[0].bn.center: must be true or false, got 'yes'"]),
    (with_changes(("data.dataset", "cifar10")),
     ["data.dataset: 'cifar10' is neither a built-in dataset (mnist or fashion_mnist) nor a file or folder of your "
      "own"]),
    (with_changes(("data.val_split", "1")), ["data.val_split: must be in [0, 1), got 1"]),
    (with_changes(("train.epochs", "0")), ["train.epochs: must be in [1, 100000], got 0"]),
    (with_changes(("train.optimizer.lr", "-0.1")), ["train.optimizer.lr: must be in (0, 100], got -0.1"]),
    (with_changes(("train.optimizer.name", "rmsprop")),
     ["train.optimizer.name: must be one of 'sgd', 'momentum', 'adam' or 'adamw', got 'rmsprop'"]),
    # a key the optimizer or schedule does not use is refused, not ignored (a PyTorch user's SGD with momentum)
    (with_changes(("train.optimizer", "{name: sgd, momentum: 0.9}")),
     ["train.optimizer: 'sgd' does not use momentum ('momentum' does): remove it, or write name: momentum for "
      "SGD with momentum"]),
    (with_changes(("train.optimizer", "{name: sgd, nesterov: true}")),
     ["train.optimizer: 'sgd' does not use nesterov ('momentum' does): remove it, or write name: momentum for "
      "SGD with momentum"]),
    (with_changes(("train.optimizer", "{name: sgd, momentum: 0.9, beta_1: 0.5}")),  # 'momentum' refuses beta_1 too
     ["train.optimizer: 'sgd' does not use momentum ('momentum' does); beta_1 ('adam' and 'adamw' do): remove them"]),
    (with_changes(("train.optimizer", "{name: adam, nesterov: true}")),
     ["train.optimizer: 'adam' does not use nesterov ('momentum' does): remove it"]),
    (with_changes(("train.optimizer", "{name: momentum, beta_1: 0.7, beta_2: 0.9}")),
     ["train.optimizer: 'momentum' does not use beta_1, beta_2 ('adam' and 'adamw' do): remove them"]),
    (with_changes(("train.optimizer", "{momentum: 0.5}")),  # no name: adam's
     ["train.optimizer: 'adam' does not use momentum ('momentum' does): remove it"]),
    (with_changes(("train.schedule", "{name: constant, warmup: 0.1}")),
     ["train.schedule: 'constant' does not use warmup ('cosine' does): remove it"]),
    (with_changes(("train.schedule", "{name: cosine, pct_start: 0.3, div_factor: 10}")),
     ["train.schedule: 'cosine' does not use pct_start, div_factor ('one_cycle' does): remove them"]),
    (with_changes(("train.schedule", "cosine")), ["train.schedule: must be a mapping, got 'cosine'"]),
    (with_changes(("output.name", "'a/b'")),
     ["output.name: may contain only letters, digits, '.', '_' and '-', got 'a/b'"]),
    (with_changes(("tran.epochs", "1")),
     ["tran: unknown key; did you mean train? (expected one of: data, model, train, distribute, output)"]),
    ({"data": {}}, ["model: required key missing"]),
    (with_changes(("model.layers", "[]")), ["model.layers: must have at least 1 item(s)"]),
    # several problems at once: one line each
    (with_changes(("model.bn.decay", "2"), ("train.seed", "-1")),
     ["model.bn.decay: must be in [0, 1), got 2", "train.seed: must be in [0, 2147483647], got -1"]),
    # shape problems, known before training
    (with_changes(("model.layers[0].kernel", "29"), ("model.layers[0].padding", "valid")),
     ["model.layers[0] (conv1): kernel 29x29 is larger than its 28x28 input with padding 'valid'"]),
    (with_changes(("model.layers[1].size", "40")),
     ["model.layers[1] (pool1): pool 40x40 collapses its 28x28 input to nothing with padding 'valid'"]),
    (with_changes(("model.layers[3].type", "dropout"), ("model.layers[3].rate", "0.5")),
     ["model.layers[4] (dense1): gets a 4-D input (14x14x16); put a flatten or global_pool layer before it"]),
    (with_changes(("model.layers[4].units", "12")),
     ["model.layers[4]: the last layer must be a dense layer with 10 units (the class logits), "
      "got a dense layer with 12 units"]),
    (with_changes(("model.layers[4].bn", "{impl: fused}")),
     ["model.layers[4].bn.impl: fused BN needs the 4-D output of a conv layer; use keras or auto for dense layers"]),
    (with_changes(("model.layers[0].stride", "2"), ("model.layers[0].dilation", "2")),
     ["model.layers[0] (conv1): stride and dilation cannot both be above 1 (TensorFlow's convolution does not "
      "support it)"]),
    (with_changes(("model.input_shape", "[32, 32, 3]")),
     ["model.input_shape: mnist gives 28x28x1 images (height, width, channels), got 32x32x3"]),
]


@pytest.mark.parametrize("raw,expected", BAD, ids=[b[1][0].split(":")[0] for b in BAD])
def test_bad_configs_are_rejected_with_exact_messages(raw, expected):
    assert problems(raw) == expected


def test_overrides_are_yaml_scalars_and_reach_nested_list_items():
    cfg = load_config(raw=copy.deepcopy(BASE), overrides=[
        "train.epochs=1", "model.bn.decay=0.9", "model.layers[0].filters=16", "model.layers[0].kernel=[3, 5]",
        "model.layers[2].bn=false", "train.deterministic=true", "data.max_train=null"])
    assert cfg.train.epochs == 1 and cfg.model.bn.decay == 0.9
    assert cfg.model.layers[0].filters == 16 and cfg.model.layers[0].kernel == [3, 5]
    assert cfg.model.layers[2].bn is None and cfg.train.deterministic is True and cfg.data.max_train is None
    plan = plan_layers(cfg)
    assert plan[0].bn.decay == 0.9 and plan[2].bn is None and plan[2].use_bias


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(raw=copy.deepcopy(BASE), overrides=["train.epochs", "model.layers[9].filters=3", "a..b=1"])
    assert e.value.problems == [
        "override 'train.epochs': expected KEY=VALUE, e.g. train.epochs=1",
        "override 'model.layers[9].filters=3': model.layers[9]: no such list item (the list has 5)",
        "override 'a..b=1': cannot parse key 'a..b' at position 2",
    ]
    assert parse_key("model.layers[0].bn.decay") == ["model", "layers", 0, "bn", "decay"]


def test_layer_bn_overrides_model_defaults_and_bias_follows_center():
    raw = copy.deepcopy(BASE)
    raw["model"]["bn"] = {"decay": 0.999, "epsilon": 1e-5}
    raw["model"]["layers"][2]["bn"] = {"center": False}
    plan = plan_layers(load_config(raw=raw))
    assert (plan[0].bn.decay, plan[0].bn.epsilon, plan[0].use_bias) == (0.999, 1e-5, False)
    assert (plan[2].bn.decay, plan[2].bn.center, plan[2].use_bias) == (0.999, False, True)
    assert plan[2].bn_params == (16, 32)  # gamma only (no beta), plus moving mean and variance


@pytest.mark.parametrize("text,message", [
    ("", "empty file"),
    ("- 1\n- 2\n", "the top level must be a mapping, got a list"),
    ("model: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("model: [unclosed\n", "not valid YAML: line 2"),
])
def test_unusable_yaml_files_give_one_line(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(p)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(p) in lines[0]


def test_validate_prints_resolved_config_and_layer_table(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    result = CliRunner().invoke(main, ["validate", str(p), "model.layers[0].filters=12"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output.split("\n\n")[0])
    assert resolved["model"]["layers"][0]["filters"] == 12 and resolved["output"]["name"] == "c"
    table = result.output.split("\n\n")[1]
    assert "conv1_bn" in table and "12 channels x (gamma, beta, mean, var)" in table
    # conv1 5x5x1x12 with no bias (BN's beta replaces it)
    assert [ln for ln in table.splitlines() if ln.startswith("conv1 ")][0].split()[3] == "300"


def test_validate_and_help_never_import_tensorflow():
    code = ("import sys; from click.testing import CliRunner; from convbn_cli.cli import main; "
            "r = CliRunner().invoke(main, ['validate', sys.argv[1]]); r2 = CliRunner().invoke(main, ['--help']); "
            "assert r.exit_code == 0 and r2.exit_code == 0, r.output; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code, str(CONFIGS[0])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_validate_exit_code_2_from_a_real_process(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {layers: [{type: conv, filters: 8, bn: {decay: 1.5}}, {type: dense, units: 10}]}\n")
    r = run_cli("validate", p)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: model.layers[0].bn.decay: must be in [0, 1), got 1.5"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("override,hint", [
    ("train.epoch=1", "train.epoch: unknown key; did you mean epochs?"),
    ("data.datset=mnist", "data.datset: unknown key; did you mean dataset?"),
    ("train.optimizer.name=adma", "got 'adma'; did you mean adam?"),
    ("model.bn.impl=fuse", "got 'fuse'; did you mean fused?"),
    ("model.layers[0].type=conf", "unknown layer type 'conf'; did you mean conv?"),
])
def test_a_near_miss_gets_a_did_you_mean(override, hint):
    from convbn_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config("mnist_bn", [override])
    assert hint in e.value.problems[0]


@pytest.mark.parametrize("override,says", [
    # `momentum` is Keras' and PyTorch's name for decay, not a near miss of renorm_momentum (which does nothing
    # without renorm): the value tells whose it is
    ("model.bn.momentum=0.1", "model.bn.momentum: unknown key; convbn calls the moving statistics' update weight "
                              "decay (TF1's name): Keras' momentum is the same number (0.99 is decay: 0.99), "
                              "PyTorch's is 1 - decay (0.1 is decay: 0.9); 0.1 reads as PyTorch's: write decay: 0.9"),
    ("model.layers[0].bn.momentum=0.99", "0.99 reads as Keras': write decay: 0.99"),
    # $: the line ends there (no value advice for a value that is no momentum; 1 - 1e-7 not rounded to 1)
    ("model.bn.momentum=fast", "PyTorch's is 1 - decay (0.1 is decay: 0.9)$"),
    ("model.bn.momentum=true", "PyTorch's is 1 - decay (0.1 is decay: 0.9)$"),
    ("model.bn.momentum=0.0000001", "1e-07 reads as PyTorch's: write decay: 0.9999999$"),
    ("model.bn.affine=false", "model.bn.affine: unknown key; PyTorch's affine: false is center: false and scale: "
                              "false here (no beta, no gamma)"),
    ("model.bn.track_running_stats=true", "convbn always keeps the moving statistics"),
    ("model.layers[0].bn.fused=true", "model.layers[0].bn.fused: unknown key; write impl: fused"),
    ("model.bn.axis=1", "the channel axis follows model.data_format"),
    ("model.bn.synchronized=true", "distribute.sync_bn"),
])
def test_bn_settings_by_keras_or_pytorch_names_say_what_they_are_here(override, says):
    from convbn_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config("mnist_bn", [override])
    line = e.value.problems[0]
    assert (line.endswith(says[:-1]) if says.endswith("$") else says in line) and "renorm_momentum" not in line
    assert len(e.value.problems) == 1 and "\n" not in line


def test_no_did_you_mean_for_something_unlike_every_option():
    from convbn_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config("mnist_bn", ["train.optimizer.name=rmsprop"])
    assert "did you mean" not in e.value.problems[0]


OLDER = [  # optimizer and schedule as convbn wrote them before it checked their keys -> what the run trained
    # every key (since 27868aa): the values each choice uses are not the defaults, so a wrong drop shows
    ("{name: sgd, lr: 0.1, weight_decay: 0.0, momentum: 0.9, nesterov: false, beta_1: 0.9, beta_2: 0.999}",
     "{name: cosine, warmup: 0.1, pct_start: 0.25, div_factor: 25.0, final_div_factor: 10000.0}",
     {"name": "sgd", "lr": 0.1, "weight_decay": 0.0}, {"name": "cosine", "warmup": 0.1}),
    ("{name: adam, lr: 0.1, weight_decay: 0.0, momentum: 0.9, nesterov: false, beta_1: 0.8, beta_2: 0.99}",
     "{name: one_cycle, warmup: 0.0, pct_start: 0.3, div_factor: 10.0, final_div_factor: 100.0}",
     {"name": "adam", "lr": 0.1, "weight_decay": 0.0, "beta_1": 0.8, "beta_2": 0.99},
     {"name": "one_cycle", "pct_start": 0.3, "div_factor": 10.0, "final_div_factor": 100.0}),
    # before adam's betas were keys (8f801a2 to 27868aa)
    ("{name: adam, lr: 0.1, weight_decay: 0.0, momentum: 0.9, nesterov: false}",
     "{name: constant, warmup: 0.0, pct_start: 0.25, div_factor: 25.0, final_div_factor: 10000.0}",
     {"name": "adam", "lr": 0.1, "weight_decay": 0.0, "beta_1": 0.9, "beta_2": 0.999}, {"name": "constant"}),
]


@pytest.mark.parametrize("optimizer,schedule,optimizer_kept,schedule_kept", OLDER)
def test_a_runs_config_written_with_every_key_still_loads_as_it_trained(tmp_path, optimizer, schedule,
                                                                        optimizer_kept, schedule_kept):
    """Until convbn refused unused optimizer and schedule keys it wrote them all (momentum: 0.9 under adam): a run's
    own config is read as it trained wherever convbn reads it (its commands, resume, a sweep's plan, `convbn runs`,
    a new run from its config.yaml), before overrides; the same keys in a config of the user's are refused."""
    from convbn_cli.runs.listing import differing_keys, summarize
    from convbn_cli.runs.rundir import RunDir, RunDirError
    from convbn_cli.runs.sweepdir import run_config

    def trained(cfg):
        return cfg.train.optimizer.model_dump(), cfg.train.schedule.model_dump()

    older = yaml.safe_load(dump_config(load_config(raw=copy.deepcopy(BASE))))
    older.get("train").update(optimizer=yaml.safe_load(optimizer), schedule=yaml.safe_load(schedule))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    kept = (optimizer_kept, schedule_kept)
    assert trained(RunDir(run).load_config()) == kept
    assert trained(run_config(tmp_path, {"runs": [{"name": "a", "config": yaml.safe_dump(older)}]}, 0)) == kept
    (run / "run.json").write_text("{}")  # what a run that started has
    assert trained(load_config(run / "config.yaml")) == kept  # `convbn train runs/x/1/config.yaml`
    with pytest.raises(RunDirError, match="does not use nesterov"):
        RunDir(run).load_config(["train.optimizer.nesterov=true"])  # a key set now is checked like a user's
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.yaml").write_text(dump_config(RunDir(run).load_config()))
    dropped = {f"train.{section}.{k}" for section, written, used in (("optimizer", optimizer, optimizer_kept),
                                                                      ("schedule", schedule, schedule_kept))
               for k in set(yaml.safe_load(written)) - set(used)}
    assert dropped and not dropped & set(differing_keys([summarize(run), summarize(new)]))  # `convbn runs`
    mine = tmp_path / "mine" / "config.yaml"  # outside a run (no run.json beside it): the user's, checked
    mine.parent.mkdir()
    mine.write_text(yaml.safe_dump(older))
    with pytest.raises(ConfigError, match="does not use momentum, nesterov"):
        load_config(mine)


def test_a_sweep_may_fix_a_key_that_only_its_swept_choices_take(tmp_path):
    """`name=adam,adamw beta_2=0.99` on an sgd config: every run is valid, though the fixed keys alone are not."""
    from convbn_cli.train.sweep import plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(with_changes(("train.optimizer", "{name: sgd, lr: 0.1}"))))
    runs = plan(config, ["train.optimizer.name=adam,adamw", "train.optimizer.beta_2=0.99"])["runs"]
    assert [yaml.safe_load(r["config"]).get("train")["optimizer"] for r in runs] == [
        {"name": n, "lr": 0.1, "weight_decay": 0.0, "beta_1": 0.9, "beta_2": 0.99} for n in ("adam", "adamw")]
    with pytest.raises(ConfigError, match="'sgd' does not use beta_2"):  # a key no run can take: still refused
        plan(config, ["train.optimizer.name=sgd,momentum", "train.optimizer.beta_2=0.99"])


def test_a_config_holds_only_the_keys_its_choices_use():
    common = {"name", "lr", "weight_decay"}
    for section, name, keys in (("optimizer", "sgd", common),
                                ("optimizer", "momentum", common | {"momentum", "nesterov"}),
                                ("optimizer", "adam", common | {"beta_1", "beta_2"}),
                                ("optimizer", "adamw", common | {"beta_1", "beta_2"}),
                                ("schedule", "constant", {"name"}), ("schedule", "cosine", {"name", "warmup"}),
                                ("schedule", "one_cycle", {"name", "pct_start", "div_factor", "final_div_factor"})):
        cfg = load_config(raw=with_changes((f"train.{section}.name", name)))
        dumped = yaml.safe_load(dump_config(cfg))
        assert set(dumped.get("train")[section]) == keys, name  # .get: not a training (conftest's TIERS)
        assert load_config(raw=dumped).model_dump() == cfg.model_dump()  # the dump is a config a user may reuse


def test_switching_optimizer_by_override_drops_the_files_keys_for_the_old_one():
    """mnist_fast sets adam's betas: `train.optimizer.name=sgd` switches to plain SGD (the betas go with adam, the
    learning rate stays); a key set by an override is still checked, in either order. The same for the schedule."""
    for name, own in (("sgd", set()), ("momentum", {"momentum", "nesterov"}), ("adamw", {"beta_1", "beta_2"})):
        cfg = load_config("mnist_fast", [f"train.optimizer.name={name}"])
        assert set(cfg.train.optimizer.model_dump()) == {"name", "lr", "weight_decay"} | own
        assert cfg.train.optimizer.lr == 0.03 and (name != "adamw" or cfg.train.optimizer.beta_1 == 0.7)
    assert load_config("mnist_fast", ["train.schedule.name=cosine"]).train.schedule.model_dump() == \
        {"name": "cosine", "warmup": 0.0}  # its one-cycle pct_start goes with the one-cycle schedule
    for overrides, message in (
            (["train.optimizer.name=sgd", "train.optimizer.momentum=0.9"], "'sgd' does not use momentum"),
            (["train.optimizer.momentum=0.9", "train.optimizer.name=sgd"], "'sgd' does not use momentum"),
            (["train.optimizer={name: adam, nesterov: true}", "train.optimizer.name=sgd"],
             "'sgd' does not use nesterov"),
            (["train={epochs: 1, optimizer: {momentum: 0.9}}", "train.optimizer.name=sgd"],  # set two levels down
             "'sgd' does not use momentum"),
            (["train.schedule.warmup=0.1", "train.schedule.name=constant"], "'constant' does not use warmup"),
            (["train.schedule.name=constant", "train.schedule.warmup=0.1"], "'constant' does not use warmup"),
            (["train.optimizer.name=[sgd]"], "train.optimizer.name: must be one of"),
            (["train.schedule.name={a: 1}"], "train.schedule.name: must be one of")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("mnist_fast", overrides)
    back = load_config("mnist_fast", ["train.optimizer.name=sgd", "train.optimizer.name=adam"]).train.optimizer
    assert (back.beta_1, back.beta_2) == (0.7, 0.9)  # named back to the file's: its betas stay
    with pytest.raises(ConfigError, match="'adam' does not use momentum"):  # naming the default switches nothing
        load_config(raw=with_changes(("train.optimizer", "{momentum: 0.5}")), overrides=["train.optimizer.name=adam"])


# --------------------------------------------------------------------------- renorm's keys without renorm

RENORM_REFUSED = [  # BN settings that only renorm uses, given where nothing would: one line each, not ignored
    ({"model.bn": {"renorm_momentum": 0.9}},
     "model.bn.renorm_momentum: used only with renorm: true, and no BN layer has renorm: remove it, or set "
     "model.bn.renorm: true"),
    ({"model.bn": {"renorm_clipping": {"rmax": 2.0}}}, "model.bn.renorm_clipping: used only with renorm: true"),
    ({"model.layers[2].bn": {"renorm_momentum": 0.9}},
     "model.layers[2].bn.renorm_momentum: used only with renorm: true, and this layer's BN has renorm off: remove "
     "it, or set renorm: true"),
    ({"model.bn": {"renorm": True}, "model.layers[2].bn": {"renorm": False, "renorm_momentum": 0.9}},
     "model.layers[2].bn.renorm_momentum: used only with renorm: true"),
    # every layer with renorm sets its own: model.bn's is used by none, and can only go
    ({"model.bn": {"renorm_momentum": 0.9}, "model.layers[0].bn": {"renorm": True, "renorm_momentum": 0.5}},
     "model.bn.renorm_momentum: used only with renorm: true, and no BN layer with renorm takes it from model.bn "
     "(each sets its own): remove it"),
    ({"model.bn": {"renorm": True, "renorm_momentum": 0.9}, "model.layers[0].bn": {"renorm": False},
      "model.layers[2].bn": {"renorm": False}}, "model.bn.renorm_momentum: used only with renorm: true, and every BN "
                                                "layer turns renorm off: remove it"),
    ({"model.bn": {"renorm_momentum": 0.9}, "model.layers[0].bn": False, "model.layers[2].bn": False},
     "model.bn.renorm_momentum: used only with renorm: true, and the model has no BN layer: remove it"),
]


@pytest.mark.parametrize("changes,problem", RENORM_REFUSED)
def test_renorm_keys_that_nothing_uses_are_refused(changes, problem):
    with pytest.raises(ConfigError) as e:
        load_config(raw=with_changes(*((k, json.dumps(v)) for k, v in changes.items())))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(problem), e.value.problems


USED = {"model.bn.renorm_momentum": 0.9, "model.bn.renorm_clipping": None}  # as renorm uses them, defaults too


@pytest.mark.parametrize("changes,kept", [
    ({"model.bn": {"renorm": True, "renorm_momentum": 0.9}}, USED),
    ({"model.bn": {"renorm_momentum": 0.9}, "model.layers[2].bn": {"renorm": True}}, USED),  # the one with renorm
    # renorm everywhere but in one layer: the others take model.bn's
    ({"model.bn": {"renorm": True, "renorm_momentum": 0.9}, "model.layers[0].bn": {"renorm": False}}, USED),
    ({"model.bn": {"renorm_clipping": None}}, {}),  # no clipping asked: nothing to refuse, nothing written
    ({"model.bn": {"renorm_momentum": 0.99}}, {}),  # the default, as model_dump() writes it: loads, not written
    ({}, {}),
])
def test_renorm_keys_are_kept_where_renorm_uses_them_and_written_only_there(changes, kept):
    from convbn_cli.runs.listing import flatten

    cfg = load_config(raw=with_changes(*((k, json.dumps(v)) for k, v in changes.items())))
    dumped = yaml.safe_load(dump_config(cfg))
    written = {k: v for k, v in flatten(dumped).items() if k.rsplit(".", 1)[-1].startswith("renorm_")}
    assert written == kept
    assert load_config(raw=dumped).model_dump() == cfg.model_dump()  # the dump is a config a user may reuse


@pytest.mark.parametrize("precise", [{"batches": 50, "when": "auto"}, {"batches": 200, "when": "always"}])
def test_a_runs_precise_bn_from_before_its_augmented_key_calibrates_as_it_trained(tmp_path, precise):
    """Until train.precise_bn.augmented, precise BN calibrated on augmented images: a run's config.yaml without the
    key reads true wherever convbn reads it (its commands and resume, a sweep's plan, a new run from it); a copy
    elsewhere, and any new config, get the new default (false), and every config.yaml written now says which."""
    from convbn_cli.config.schema import PRECISE_BN_BATCHES
    from convbn_cli.runs.rundir import RunDir
    from convbn_cli.runs.sweepdir import run_config

    older = yaml.safe_load(dump_config(load_config(raw=copy.deepcopy(BASE))))
    assert older["train"]["precise_bn"]["augmented"] is False  # written now: said
    older["train"]["precise_bn"] = precise
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    (run / "run.json").write_text("{}")
    for cfg in (RunDir(run).load_config(), load_config(run / "config.yaml"),
                run_config(tmp_path, {"runs": [{"name": "a", "config": yaml.safe_dump(older)}]}, 0)):
        assert cfg.train.precise_bn.model_dump() == {**precise, "augmented": True}
    assert RunDir(run).load_config(["train.precise_bn.augmented=false"]).train.precise_bn.augmented is False
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(older))
    assert load_config(mine).train.precise_bn.augmented is False
    # precise BN off (under an EMA or not) is what convbn writes today too: read as it is, off, with or without the EMA
    for ema in ({"decay": 0.99}, None):
        older["train"].update(precise_bn=None, ema=ema)
        (run / "config.yaml").write_text(yaml.safe_dump(older))
        cfg = RunDir(run).load_config()
        assert cfg.train.precise_bn is None and cfg.train.ema_bn_batches == PRECISE_BN_BATCHES
        assert RunDir(run).load_config(["train.ema=null"]).train.precise_bn is None


def test_a_runs_config_with_every_renorm_key_loads_as_it_trained_and_renorm_switches_by_override(tmp_path):
    """convbn wrote model.bn's renorm keys into every run's config.yaml (renorm_momentum: 0.99 without renorm):
    read as the run trained wherever convbn knows it wrote them; a copy elsewhere is checked. Turning renorm off by
    an override drops the file's keys for it; a key the file had unused already, or one an override sets, stays
    and is refused."""
    from convbn_cli.runs.rundir import RunDir

    older = yaml.safe_load(dump_config(load_config(raw=copy.deepcopy(BASE))))
    older["model"]["bn"].update(renorm=False, renorm_momentum=0.5, renorm_clipping=None)
    older["model"]["layers"][2]["bn"] = {"decay": 0.9, "renorm_momentum": 0.7}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    (run / "run.json").write_text("{}")
    for cfg in (RunDir(run).load_config(), load_config(run / "config.yaml")):
        assert cfg.model.bn.renorm_momentum == 0.99 and cfg.model.layers[2].bn.renorm_momentum is None
        assert cfg.model.layers[2].bn.decay == 0.9
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(older))
    with pytest.raises(ConfigError, match=r"model.layers\[2\].bn.renorm_momentum: used only with renorm"):
        load_config(mine)

    on = with_changes(("model.bn", "{renorm: true, renorm_momentum: 0.9, renorm_clipping: {rmax: 2.0}}"),
                      ("model.layers[2].bn", "{renorm_momentum: 0.8}"))
    off = apply_overrides(copy.deepcopy(on), ["model.bn.renorm=false"])
    assert "renorm_momentum" not in off["model"]["bn"] and "renorm_clipping" not in off["model"]["bn"]
    assert off["model"]["layers"][2]["bn"] is True  # left empty: model.bn's settings
    assert load_config(raw=off).model.bn.renorm is False
    back = apply_overrides(copy.deepcopy(on), ["model.bn.renorm=true"])  # naming it again drops nothing
    assert back == on
    with pytest.raises(ConfigError, match=r"model.bn.renorm_momentum: used only with renorm"):
        load_config(raw=apply_overrides(copy.deepcopy(on), ["model.bn.renorm=false", "model.bn.renorm_momentum=0.8"]))
    unused = with_changes(("model.bn", "{renorm_momentum: 0.9}"))  # unused in the file already: still an error
    with pytest.raises(ConfigError, match=r"model.bn.renorm_momentum: used only with renorm"):
        load_config(raw=apply_overrides(unused, ["model.bn.renorm=false"]))
    # the same by any override of the model: its layers' BN removed; a layer counted from the end
    assert "renorm_momentum" not in apply_overrides(copy.deepcopy(on), ["model.layers[0].bn=false",
                                                                        "model.layers[2].bn=false"])["model"]["bn"]
    with pytest.raises(ConfigError, match=r"model.layers\[2\].bn.renorm_momentum: used only with renorm"):
        load_config(raw=apply_overrides(copy.deepcopy(on), ["model.layers[-3].bn.renorm=false",
                                                            "model.bn.renorm=false",
                                                            "model.layers[-3].bn.renorm_momentum=0.4"]))
    # a file that does not validate as it is (fixed by an override): nothing of it is dropped, its unused key stays
    broken = with_changes(("model.bn", "{renorm_momentum: 0.9}"), ("model.layers[0].filters", "0"))
    with pytest.raises(ConfigError, match=r"model.bn.renorm_momentum: used only with renorm"):
        load_config(raw=apply_overrides(broken, ["model.layers[0].filters=8", "model.bn.renorm=false"]))
