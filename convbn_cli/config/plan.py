"""The layer plan: names, output shapes, parameter counts and effective BN settings of every layer.

Worked out from the config alone (no TensorFlow), so that `convbn validate` can show the network and
reject shape problems before anything is built. Each layer type plans its own shape (schema.LayerSpec.plan);
this module walks the list, names the layers and picks each BN's implementation. The model builder uses the
same plan, so the names shown here (`conv1`, `conv1_bn`, ...) are the names in checkpoints and in `inspect-bn`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import schema


@dataclass
class PlannedLayer:
    name: str  # conv1, pool1, dense2, ...
    spec: schema.LayerSpec  # the validated layer config
    out_shape: tuple  # channels-last shape without batch: (H, W, C) or (N,)
    in_shape: tuple  # the same, of its input
    params: int  # weights of the layer itself (kernel and bias)
    use_bias: bool = True
    bn: Optional[schema.BNSettings] = None
    bn_impl: Optional[str] = None  # "fused", "keras" or "sync" (Keras' synchronized BN) once resolved

    @property
    def bn_name(self):
        return f"{self.name}_bn"

    @property
    def channels(self):
        return self.out_shape[-1]

    @property
    def activation(self):
        act = getattr(self.spec, "activation", None)
        return None if act in (None, "linear") else act

    @property
    def bn_params(self):
        """(trainable, non-trainable) BN parameter counts: gamma/beta per channel, moving mean/variance per channel."""
        if self.bn is None:
            return 0, 0
        return self.channels * (int(self.bn.scale) + int(self.bn.center)), 2 * self.channels


MAX_LAYERS = 100  # config layers; deeper nets fail inside Keras (recursion) long before they would train here
BYTES = 4  # float32


def memory_limit() -> int:
    """Bytes a training run may plan to use: $CONVBN_MEMORY_LIMIT_GB, else 80% of this machine's memory."""
    if os.environ.get("CONVBN_MEMORY_LIMIT_GB"):
        return int(float(os.environ["CONVBN_MEMORY_LIMIT_GB"]) * 2**30)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.8)
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no limit known
        return 2**62


@dataclass
class Estimate:
    """What one training step needs, roughly: parameters (weights, gradients and two optimizer slots each) and
    the activations of one batch (kept for the backward pass, plus their gradients)."""

    params: int
    activations_per_image: int  # values
    batch_size: int
    layers: int

    @property
    def train_bytes(self) -> int:
        return BYTES * (4 * self.params + 2 * self.batch_size * self.activations_per_image)


def _values(layer: PlannedLayer) -> int:
    n = math.prod(layer.out_shape)
    # the layer, its BN, its activation; a conv block that pools also keeps its conv's unpooled output, as a
    # separate pool layer would
    own = n + math.prod(layer.spec.conv_shape(layer.in_shape)) if getattr(layer.spec, "pool", 1) > 1 else n
    return own + n * ((layer.bn is not None) + (layer.activation is not None))


def estimate(plan: list, batch_size: int) -> Estimate:
    params = sum(layer.params + sum(layer.bn_params) for layer in plan)
    return Estimate(params, sum(_values(layer) for layer in plan), batch_size, len(plan))


def _size_problems(cfg, plan) -> list[str]:
    """A network that validates but could not train on this machine: too deep, or too big for its memory."""
    if len(cfg.model.layers) > MAX_LAYERS:
        return [f"model.layers: {len(cfg.model.layers)} layers, more than the {MAX_LAYERS} convbn builds"]
    est, limit = estimate(plan, cfg.data.batch_size), memory_limit()
    if est.train_bytes <= limit:
        return []
    cost = [BYTES * (4 * (layer.params + sum(layer.bn_params)) + 2 * cfg.data.batch_size * _values(layer))
            for layer in plan]
    i = max(range(len(plan)), key=cost.__getitem__)
    return [f"model.layers[{i}] ({plan[i].name}): the network needs about {est.train_bytes / 2**30:.1f} GiB to "
            f"train with data.batch_size {cfg.data.batch_size} ({cost[i] / 2**30:.1f} GiB for this layer), more "
            f"than the {limit / 2**30:.1f} GiB allowed (80% of this machine's memory, or $CONVBN_MEMORY_LIMIT_GB)"]


def _rank_problem(spec: schema.LayerSpec, shape: tuple) -> Optional[str]:
    if spec.input_rank == 3 and len(shape) != 3:
        return f"needs a 4-D input (height, width, channels) but gets a flat vector of {shape[0]}"
    if spec.input_rank == 1 and len(shape) != 1:
        return f"gets a 4-D input ({'x'.join(map(str, shape))}); put a flatten or global_pool layer before it"
    return None


def plan_layers(cfg: schema.Config) -> list[PlannedLayer]:
    """Walk the layers, tracking the shape; raise ConfigError naming each layer that cannot work."""
    problems = []
    ds = cfg.dataset
    if tuple(cfg.model.input_shape) != ds.image_shape and cfg.own is None:  # the user's images are resized to it
        h, w, c = ds.image_shape
        problems.append(f"model.input_shape: {cfg.data.dataset} gives {h}x{w}x{c} images (height, width, channels), "
                        f"got {'x'.join(map(str, cfg.model.input_shape))}")
    shape = tuple(cfg.model.input_shape)
    sync_bn = cfg.distribute.strategy != "none" and cfg.distribute.sync_bn
    step = training_batch(cfg)
    if step.train_images == 0:
        problems.append(f"data.max_train: {step.why}, so there is nothing to train on")
    counters: dict[str, int] = {}
    plan = []
    for i, spec in enumerate(cfg.model.layers):
        counters[spec.type] = counters.get(spec.type, 0) + 1
        name = f"{spec.type}{counters[spec.type]}"
        bn = schema.resolve_bn(cfg.model.bn, spec.bn) if spec.has_bn else None
        bad = _rank_problem(spec, shape)
        if bad is None:
            try:
                out, params, use_bias = spec.plan(shape, bn)
            except schema.LayerProblem as e:
                bad = str(e)
        if bad:
            problems.append(f"model.layers[{i}] ({name}): {bad}")
            break  # later shapes would only repeat the problem
        layer = PlannedLayer(name, spec, out, shape, params, use_bias, bn)
        if bn is not None:
            why = _resolve_bn_impl(layer, sync_bn)
            if why:
                problems.append(f"model.layers[{i}].bn.impl: {why}")
            problems += _bn_problems(layer, f"model.layers[{i}]", step)
        plan.append(layer)
        shape = out
    if not problems:
        problems += _last_layer_problems(cfg) or _size_problems(cfg, plan)
    problems += _renorm_problems(cfg.model)
    if cfg.train.early_stopping is not None and cfg.data.val_split == 0:
        problems.append("train.early_stopping: needs a validation split to watch (data.val_split > 0)")
    if problems:
        raise ConfigError(problems)
    return plan


def _last_layer_problems(cfg) -> list[str]:
    last, n = cfg.model.layers[-1], len(cfg.model.layers) - 1
    classes = cfg.dataset.num_classes
    if last.type != "dense" or last.units != classes:
        what = f"a dense layer with {last.units} units" if last.type == "dense" else f"a {last.type} layer"
        whose = f"data.dataset {cfg.own.path} has {classes} classes, so " if cfg.own else ""
        return [f"model.layers[{n}]: {whose}the last layer must be a dense layer with {classes} units (the class "
                f"logits), got {what}"]
    if last.activation not in (None, "linear"):
        return [f"model.layers[{n}].activation: the last layer gives the logits and must have no activation, "
                f"got {last.activation!r}"]
    return []


def _resolve_bn_impl(layer: PlannedLayer, sync_bn: bool) -> Optional[str]:
    """Set layer.bn_impl; return a problem, or None. The fused kernel serves 4-D conv outputs without renorm;
    under a strategy with sync BN every BN is Keras' synchronized one.

    `model.bn.impl: fused` means fused for the conv layers; only a dense layer's own `bn.impl: fused` is an error.
    """
    bn, is_conv = layer.bn, layer.spec.type == "conv"
    explicit = layer.spec.bn.impl is not None
    why = None
    if bn.impl == "fused" and not is_conv and explicit:
        why = "fused BN needs the 4-D output of a conv layer; use keras or auto for dense layers"
    elif bn.impl == "keras" or bn.renorm or not is_conv:
        layer.bn_impl = "keras"
    else:
        layer.bn_impl = "fused"
    if sync_bn:
        if bn.impl == "fused" and (explicit or is_conv):
            why = ("the fused kernel cannot all-reduce statistics across replicas; use keras or auto, "
                   "or distribute.sync_bn: false")
        layer.bn_impl = "sync"
    return why


@dataclass
class TrainingBatch:
    """The images one BN layer normalizes over in a training step (None: unknown before training starts), and
    where that number comes from."""

    images: Optional[int]
    train_images: int
    why: str


def training_batch(cfg: schema.Config) -> TrainingBatch:
    """Training drops no image of a split smaller than one batch: its one batch is the whole split. Replicas
    each normalize their own slice, or with sync BN the whole global batch (known here only for `cpu_replicas`;
    a multi_worker cluster's size is known once it runs)."""
    d, dist = cfg.data, cfg.distribute
    available = min(d.max_train or cfg.dataset.train_size, cfg.dataset.train_size)
    train_images = available - (0 if cfg.dataset.val_size else int(round(available * d.val_split)))
    replicas = (dist.cpu_replicas or 1) if dist.strategy == "mirrored" else 1
    sync = dist.strategy != "none" and dist.sync_bn
    global_batch = min(d.batch_size * replicas, train_images)
    images = global_batch if sync else global_batch // replicas
    synchronized = f" x {replicas} replicas (synchronized)" if sync and replicas > 1 else ""
    why = f"data.batch_size {d.batch_size}{synchronized}"
    if train_images < d.batch_size * replicas:
        why = (f"data.max_train {d.max_train} with data.val_split {d.val_split:g} leaves {train_images} training "
               f"image{'s' if train_images != 1 else ''}")
    if sync and dist.strategy == "multi_worker":
        images = None
    return TrainingBatch(images, train_images, why)


def _bn_problems(layer: PlannedLayer, where: str, step: TrainingBatch) -> list[str]:
    """Settings under which a BN layer cannot normalize (or cannot be built)."""
    problems = []
    spatial = layer.out_shape[:-1]  # (H, W) for a conv output, () for a dense one
    values = None if step.images is None else step.images * (spatial[0] * spatial[1] if spatial else 1)
    if values is not None and values < 2 and step.train_images > 0:
        # one value per channel: the batch mean is that value and the variance 0, so BN outputs exactly beta
        size = f" x {spatial[0]}x{spatial[1]}" if spatial else ""
        problems.append(f"{where} ({layer.bn_name}): normalizes over {values} value per channel ({step.why}{size}), "
                        "so it outputs beta whatever the input; use data.batch_size >= 2 (and at least 2 training "
                        "images) or bn: false")
    if layer.bn.renorm and layer.bn.moving_variance == "unbiased":
        problems.append(f"{where}.bn.moving_variance: unbiased is not available with renorm (Keras' renorm keeps "
                        "its own moving statistics)")
    return problems


RENORM_KEYS = ("renorm_momentum", "renorm_clipping")  # BN settings that only `renorm: true` uses


def _bn_layers_renorm(model: schema.ModelConfig):
    """(index, the layer's own `bn:` settings, whether its BN has renorm) of every layer with BN."""
    for i, spec in enumerate(model.layers):
        own = spec.bn if spec.has_bn else None
        if own is not None:
            yield i, own, model.bn.renorm if own.renorm is None else own.renorm


def unused_renorm_keys(model: schema.ModelConfig) -> list[tuple]:
    """The key paths of the renorm settings no BN layer uses: a layer's own where its BN has renorm off, and
    model.bn's where no BN layer with renorm takes them from there (none has renorm, or each sets its own). Like
    an optimizer key its choice does not use, such a key would be ignored without a word: `renorm_momentum: 0.9`
    trains plain BN. A run's config.yaml holds only the used ones (loader.dump_config)."""
    unused, taken = [], set()
    for i, own, renorm in _bn_layers_renorm(model):
        for key in RENORM_KEYS:
            if getattr(own, key) is not None:
                if not renorm:
                    unused.append(("model", "layers", i, "bn", key))
            elif renorm:
                taken.add(key)
    return unused + [("model", "bn", key) for key in RENORM_KEYS if key not in taken]


def _renorm_problems(model: schema.ModelConfig) -> list[str]:
    """The renorm settings given that nothing would use. model.bn's at their defaults are no problem: what a
    config's model_dump() holds (every key, renorm_momentum: 0.99 too) stays a config that loads."""
    problems = []
    renorms = [renorm for _, _, renorm in _bn_layers_renorm(model)]
    # what to do about a model.bn key: turn renorm on where it is off everywhere; else each BN with renorm sets its
    # own (or there is no BN layer at all), and the key can only go
    why = ("the model has no BN layer: remove it" if not renorms else
           "no BN layer with renorm takes it from model.bn (each sets its own): remove it" if any(renorms) else
           "every BN layer turns renorm off: remove it" if model.bn.renorm else
           "no BN layer has renorm: remove it, or set model.bn.renorm: true")
    for path in unused_renorm_keys(model):
        key = path[-1]
        if path[1] == "layers":
            problems.append(f"model.layers[{path[2]}].bn.{key}: used only with renorm: true, and this layer's BN "
                            "has renorm off: remove it, or set renorm: true")
        elif getattr(model.bn, key) != schema.BNSettings.model_fields[key].default:
            problems.append(f"model.bn.{key}: used only with renorm: true, and {why}")
    return problems


def layer_table(plan: list[PlannedLayer]) -> list[tuple]:
    """Rows (name, kind, output shape, params, note) for a printed summary, BN as rows of their own."""
    rows = []
    for layer in plan:
        rows.append((layer.name, layer.spec.type, layer.out_shape, layer.params, layer.spec.note(layer)))
        if layer.bn is not None:
            trainable, moving = layer.bn_params
            b = layer.bn
            per = [p for p, on in (("gamma", b.scale), ("beta", b.center)) if on] + ["mean", "var"]
            rows.append((layer.bn_name, f"bn ({layer.bn_impl})", layer.out_shape, trainable + moving,
                         f"{layer.channels} channels x ({', '.join(per)}); decay {b.decay:g}, eps {b.epsilon:g}"))
        if layer.activation:
            rows.append((f"{layer.name}_{layer.activation}", layer.activation, layer.out_shape, 0, ""))
    return rows
