"""The building blocks others build on: run-directory numbering, the one-cycle schedule, BN folding, and the
graph-walking inference primitives on functional models (branches, not only chains); plus the layering rules
of the package (analysis/export never import train/, no function over 60 lines)."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from conftest import REPO  # noqa: E402
from convbn_cli.errors import ConvbnError  # noqa: E402
from convbn_cli.model import FusedBatchNorm, bn_layers, forward_fn, recalibrate_model  # noqa: E402
from convbn_cli.model.fold import fold_weights, foldable_pairs, standard_model  # noqa: E402
from convbn_cli.model.stats import bn_layer_parameters  # noqa: E402
from convbn_cli.runs.rundir import RunDir, next_number  # noqa: E402
from convbn_cli.train.optim import OneCycle  # noqa: E402

PACKAGE = REPO / "convbn_cli"


# --------------------------------------------------------------------------- run directories

def test_run_directories_are_numbered_after_the_largest_taken(tmp_path):
    assert RunDir.create(tmp_path, "x").path == tmp_path / "x" / "1"
    (tmp_path / "x" / "7").mkdir()
    (tmp_path / "x" / "notes").mkdir()  # not a number: ignored
    (tmp_path / "x" / "12.bak").mkdir()
    assert RunDir.create(tmp_path, "x").path == tmp_path / "x" / "8"
    assert RunDir.create(tmp_path, "x").path == tmp_path / "x" / "9"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["1", "12.bak", "7", "8", "9", "notes"]


def test_next_number_reads_only_matching_names(tmp_path):
    assert next_number(tmp_path / "missing", r"ckpt-(\d+)\.index") == 1
    for name in ("ckpt-1.index", "ckpt-4.index", "ckpt-9.data-00000-of-00001", "other-20.index"):
        (tmp_path / name).write_text("")
    assert next_number(tmp_path, r"ckpt-(\d+)\.index") == 5


# --------------------------------------------------------------------------- one-cycle schedule

def test_one_cycle_matches_pytorchs_cosine_one_cycle_formula():
    peak, total, pct, div, final = 0.1, 200, 0.3, 25.0, 1e4
    sched = OneCycle(peak, total, pct, div, final)
    start, end, up = peak / div, peak / div / final, pct * total

    def expected(step):  # PyTorch's OneCycleLR with anneal_strategy="cos", written out
        if step < up:
            a, b, frac = start, peak, step / up
        else:
            a, b, frac = peak, end, min((step - up) / (total - up), 1.0)
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * frac))

    steps = [0, 1, 30, 59, 60, 61, 130, 199, 200, 250]
    got = [float(sched(s)) for s in steps]
    np.testing.assert_allclose(got, [expected(s) for s in steps], rtol=1e-5, atol=1e-8)  # float32 schedule
    assert got[0] == pytest.approx(start) and got[4] == pytest.approx(peak) and got[-1] == pytest.approx(end)
    assert OneCycle.from_config(sched.get_config()).get_config() == sched.get_config()


# --------------------------------------------------------------------------- BN folding

def _random_bn(layer, rng):
    for v in layer.weights:
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32) if "variance" in v.path or "gamma" in v.path
                 else rng.normal(size=v.shape).astype(np.float32))


@pytest.mark.parametrize("use_bias", [False, True])
def test_fold_weights_equal_conv_then_bn_at_inference(use_bias):
    rng = np.random.default_rng(0)
    conv = keras.layers.Conv2D(5, 3, use_bias=use_bias)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    x = rng.normal(size=(4, 9, 9, 3)).astype(np.float32)
    y = bn(conv(x), training=False)
    _random_bn(bn, rng)
    if use_bias:
        conv.bias.assign(rng.normal(size=5).astype(np.float32))
    reference = bn(conv(x), training=False).numpy()
    kernel, bias = fold_weights(conv.kernel.numpy(), conv.bias.numpy() if use_bias else None,
                                bn_layer_parameters(bn))
    folded = tf.nn.conv2d(x, kernel, 1, "VALID").numpy() + bias
    assert y.shape == folded.shape
    np.testing.assert_allclose(folded, reference, rtol=1e-4, atol=1e-4)


def branchy_model(seed=0):
    """A functional net with two branches and a merge; conv `shared` feeds two BN layers (so neither is foldable)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 1), name="image")
    a = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="a")(inp)
    a = keras.layers.BatchNormalization(name="a_bn")(a)
    a = keras.layers.ReLU(name="a_relu")(a)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(inp)
    b = FusedBatchNorm(name="b_bn")(b)
    s = keras.layers.Conv2D(4, 1, name="shared")(keras.layers.Add(name="add")([a, b]))
    s1 = keras.layers.BatchNormalization(name="s1_bn")(s)
    s2 = keras.layers.BatchNormalization(name="s2_bn")(s)
    x = keras.layers.Concatenate(name="cat")([s1, s2])
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(3, use_bias=False, name="dense")(x)
    x = keras.layers.BatchNormalization(name="dense_bn")(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(seed)
    for layer in bn_layers(model):
        _random_bn(layer, rng)
    return model


def test_folding_works_on_a_functional_graph_and_only_where_it_may():
    model = branchy_model()
    assert {bn.name: conv.name for bn, conv in foldable_pairs(model).items()} == \
        {"a_bn": "a", "b_bn": "b", "dense_bn": "dense"}
    x = np.random.default_rng(1).normal(size=(6, 12, 12, 1)).astype(np.float32)
    reference = model(x, training=False).numpy()
    folded, names, kept = standard_model(model, fold_bn=True)
    assert sorted(names) == ["a_bn", "b_bn", "dense_bn"] and sorted(kept) == ["s1_bn", "s2_bn"]
    assert not any(isinstance(layer, FusedBatchNorm) for layer in folded.layers)
    assert len(bn_layers(folded)) == 2
    np.testing.assert_allclose(folded(x, training=False).numpy(), reference, rtol=1e-4, atol=1e-4)
    plain, names, kept = standard_model(model, fold_bn=False)
    assert names == [] and len(kept) == 5
    np.testing.assert_allclose(plain(x, training=False).numpy(), reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- inference primitives on graphs

def test_batch_statistics_forward_on_a_functional_graph_leaves_the_model_alone():
    model = branchy_model()
    x = np.random.default_rng(2).normal(size=(8, 12, 12, 1)).astype(np.float32)
    before = [w.numpy() for w in model.weights]
    got = forward_fn(model, "batch")(tf.constant(x)).numpy()
    # by hand: every BN in training mode (batch statistics), dropout off
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    want = model(x, training=True).numpy()
    for w, value in zip(model.weights, before):
        w.assign(value)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, model(x, training=False).numpy(), atol=1e-3)
    for w, value in zip(model.weights, before):
        np.testing.assert_array_equal(w.numpy(), value)  # moving statistics put back


def test_precise_bn_on_a_functional_graph_uses_each_bns_own_input():
    model = branchy_model()
    rng = np.random.default_rng(3)
    batches = [tf.constant(rng.normal(size=(8, 12, 12, 1)).astype(np.float32)) for _ in range(3)]
    recalibrate_model(model, batches)
    for name in ("a_bn", "b_bn", "s1_bn", "s2_bn", "dense_bn"):
        bn = model.get_layer(name)
        upstream = keras.Model(model.input, bn.input)
        outs = [upstream(b, training=False).numpy().astype(np.float64) for b in batches]
        axes = tuple(range(outs[0].ndim - 1))
        np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([o.mean(axes) for o in outs], 0), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([o.var(axes) for o in outs], 0), rtol=1e-4,
                                   atol=1e-6)
    # s1 and s2 normalize the same tensor: after recalibration they agree
    np.testing.assert_allclose(model.get_layer("s1_bn").moving_mean.numpy(),
                               model.get_layer("s2_bn").moving_mean.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- layering rules

def _modules():
    return sorted(PACKAGE.rglob("*.py"))


# The package's layers, lowest first: a module imports from its own layer and the ones below, never above (the
# pipeline: config -> data -> model -> runs -> train -> analysis / export -> what the CLI prints).
LAYERS = [
    # helpers with no convbn dependencies
    {"errors", "files", "readers", "lazy", "tf_setup", "launcher", "version", "signals"},
    {"data"},  # the registry names the datasets the config may choose
    {"config"},
    {"model"},
    {"formats"},  # model files: what each format is called (catalog) and how it is written and run (runtime)
    {"runs"},
    {"present"},  # plots, tables and reports: drawn by training and sweeps, printed by the CLI
    {"train"},
    {"analysis"},
    {"export"},
    {"cli", "api", "__init__", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def internal_imports():
    """(importer, imported module, line) for every import of convbn_cli by itself, at module level or inside a
    function (those run too), but not under `if TYPE_CHECKING:` (never run). `from pkg import sub` counts as an
    import of the submodule pkg.sub."""
    modules = {_module_name(p) for p in _modules()}
    found = []
    for p in _modules():
        me = _module_name(p)
        package = me if p.name == "__init__.py" else me.rsplit(".", 1)[0]
        tree = ast.parse(p.read_text())
        skipped = {id(n) for top in ast.walk(tree) if _is_type_checking(top) for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("convbn_cli")]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("convbn_cli"):
                    source = node.module
                else:
                    continue
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            found += [(me, t, node.lineno) for t in dict.fromkeys(targets)]
    return found


def _layer(module: str) -> int:
    name = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if name in names)


def test_every_module_has_a_layer():
    assert [m for m in map(_module_name, _modules()) if not any(
        (m.split(".")[1] if "." in m else "__init__") in names for names in LAYERS)] == []


def test_no_import_runs_back_up_the_layers():
    upward = [f"{a} (line {line}) -> {b}" for a, b, line in internal_imports() if _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_circles():
    """No module reaches itself through imports (Tarjan's strongly connected components of the import graph)."""
    graph = {}
    for a, b, _ in internal_imports():
        if a != b:
            graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_one_lazy_mechanism_and_no_lazy_name_a_submodule_could_replace():
    """Package __init__ files hold no wrapper functions (lazy.lazy_names is the one way to defer an import), and
    no lazy name equals a submodule's name (importing the submodule would replace the name)."""
    import importlib

    for init in PACKAGE.rglob("__init__.py"):
        assert not [n.name for n in ast.parse(init.read_text()).body if isinstance(n, ast.FunctionDef)], init
        package = importlib.import_module(_module_name(init))
        lazy = getattr(package, "_LAZY", {})
        submodules = {p.stem for p in init.parent.glob("*.py")} | {p.name for p in init.parent.iterdir() if p.is_dir()}
        assert not set(lazy) & submodules, (init, set(lazy) & submodules)


def test_the_api_is_the_functions_themselves_and_cannot_be_shadowed():
    import inspect

    import convbn_cli
    import convbn_cli.export  # noqa: F401  the subpackages that share a name with API functions
    import convbn_cli.train  # noqa: F401
    from convbn_cli import api
    from convbn_cli.analysis.evaluation import evaluate
    from convbn_cli.export.exporter import export
    from convbn_cli.train.loop import train

    assert api.train is train and api.export is export and api.evaluate is evaluate  # real signatures and docs
    assert "tta" in inspect.signature(api.evaluate).parameters and "warn" in inspect.signature(api.train).parameters
    for name in convbn_cli._LAZY:  # what the package re-exports is the API's, whatever was imported before
        assert getattr(convbn_cli, name) is getattr(api, name)
    assert set(convbn_cli.__all__) <= set(api.__all__) | {"__version__"}


def test_every_private_keras_name_convbn_uses_exists_in_this_keras():
    from convbn_cli.model.keras_private import PRIVATE_NAMES

    bn = keras.layers.BatchNormalization()
    bn.build((None, 4, 4, 3))
    inputs = keras.Input((2,))
    probes = {keras.KerasTensor: inputs, keras.Model: keras.Model(inputs, keras.layers.Dense(1)(inputs)),
              keras.layers.Layer: keras.layers.Dense(1), keras.layers.BatchNormalization: bn}
    missing = [f"{owner.__name__}.{name}" for owner, name in PRIVATE_NAMES if not hasattr(probes[owner], name)]
    assert missing == []
    sources = "\n".join(p.read_text() for p in _modules() if p.name != "keras_private.py")
    used = set(re.findall(r"\b(_keras_history|_run_through_graph|_call_has_training_arg|_moments|_reduction_axes)\b",
                          sources))
    assert used <= {name for _, name in PRIVATE_NAMES}


def test_a_bn_setting_is_declared_once():
    """A layer's `bn:` override has exactly model.bn's settings, with the same checks (it is derived from them)."""
    from convbn_cli.config.schema import BNOverride, BNSettings

    assert list(BNOverride.model_fields) == list(BNSettings.model_fields)
    with pytest.raises(Exception, match="must be in \\[0, 1\\), got 1.5"):
        BNOverride(decay=1.5)


def test_analysis_and_export_never_import_train():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in _modules() if p.parent.name in ("analysis", "export")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*(from|import)\s+(\.\.train|convbn_cli\.train)", line)]
    assert offenders == []


def test_no_function_in_the_package_is_over_60_lines():
    long = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_no_module_in_the_package_is_over_600_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in _modules() if (n := len(p.read_text().splitlines())) > 600]
    assert long == []


def test_dataset_facts_live_only_in_the_registry():
    """No literal class count or image size (10, 28) in the package outside data/registry.py."""
    not_dataset_facts = re.compile(r"epochs: |fontsize=")  # the default epoch count, a font size
    hits = []
    for p in _modules():
        if p.name == "registry.py":
            continue
        lines = p.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in (10, 28) \
                    and not not_dataset_facts.search(lines[node.lineno - 1]):
                hits.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert hits == []


def test_config_has_no_import_cycle():
    import subprocess
    import sys

    for module in ("convbn_cli.config.plan", "convbn_cli.config.loader", "convbn_cli.config.schema"):
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr


def test_errors_say_their_exit_codes():
    assert ConvbnError("x").exit_code == 2 and ConvbnError("x").lines == ["x"]


def test_each_model_format_has_one_writer_and_one_reader_in_one_module():
    """formats/catalog.py names the formats; formats/runtime.py alone writes, opens and runs them: nothing else in
    the package loads a model file (Keras, TFLite, onnxruntime, SavedModel) or names a format's file ending."""
    from convbn_cli.formats import runtime
    from convbn_cli.formats.catalog import FORMAT_INFO, FORMATS, SUFFIXES

    assert set(runtime.READERS) == set(FORMATS) == set(FORMAT_INFO)
    assert len(set(runtime.READERS.values())) == len(FORMATS)  # one reader each, none shared
    writer = ast.unparse(next(n for n in ast.parse((PACKAGE / "formats" / "runtime.py").read_text()).body
                              if isinstance(n, ast.FunctionDef) and n.name == "write"))
    assert all(f"'{name}'" in writer for name in FORMATS if name != "tflite")  # tflite: the write's else branch
    loaders = re.compile(r"load_model\(|tf\.lite\.Interpreter|InferenceSession\(|saved_model\.load\(|TFLiteConverter"
                         r"|model\.save\(|model\.export\(|" + "|".join(re.escape(f'"{s}"') for s in SUFFIXES))
    elsewhere = [f"{p.relative_to(REPO)}:{n}" for p in _modules() if p.parent.name != "formats"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if loaders.search(line)]
    assert elsewhere == []
