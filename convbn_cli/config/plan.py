"""The layer plan: names, output shapes, parameter counts and effective BN settings of every layer.

Worked out from the config alone (no TensorFlow), so that `convbn validate` can show the network and
reject shape problems before anything is built. The model builder uses the same plan, so the names
shown here (`conv1`, `conv1_bn`, ...) are the names in checkpoints and in `inspect-bn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import schema
from .loader import ConfigError


@dataclass
class PlannedLayer:
    index: int  # position in model.layers
    name: str  # conv1, pool1, dense2, ...
    spec: object  # the validated layer config
    in_shape: tuple  # channels-last shape without batch: (H, W, C) or (N,)
    out_shape: tuple
    params: int  # weights of the layer itself (kernel and bias)
    use_bias: bool = True
    bn: Optional[schema.BNSettings] = None
    bn_impl: Optional[str] = None  # "fused" or "keras" once resolved
    notes: list = field(default_factory=list)

    @property
    def bn_name(self):
        return f"{self.name}_bn"

    @property
    def channels(self):
        return self.out_shape[-1]

    @property
    def bn_params(self):
        """(trainable, non-trainable) BN parameter counts: gamma/beta per channel, moving mean/variance per channel."""
        if self.bn is None:
            return 0, 0
        return self.channels * (int(self.bn.scale) + int(self.bn.center)), 2 * self.channels


def _out_len(n, k, s, d, padding):
    k_eff = (k - 1) * d + 1
    if padding == "same":
        return -(-n // s)
    return (n - k_eff) // s + 1 if n >= k_eff else 0


def plan_layers(cfg: schema.Config) -> list[PlannedLayer]:
    """Walk the layers, tracking the shape; raise ConfigError naming each layer that cannot work."""
    problems = []
    if tuple(cfg.model.input_shape) != schema.IMAGE_SHAPE:
        h, w, c = schema.IMAGE_SHAPE
        problems.append(f"model.input_shape: {cfg.data.dataset} gives {h}x{w}x{c} images (height, width, channels), "
                        f"got {'x'.join(map(str, cfg.model.input_shape))}")
    shape = tuple(cfg.model.input_shape)
    sync_bn = cfg.distribute.strategy != "none" and cfg.distribute.sync_bn
    counters: dict[str, int] = {}
    plan = []
    for i, spec in enumerate(cfg.model.layers):
        kind = spec.type
        counters[kind] = counters.get(kind, 0) + 1
        name = f"{kind}{counters[kind]}"
        where = f"model.layers[{i}] ({name})"
        bad = None
        params, use_bias, bn, out = 0, True, None, shape
        if kind in ("conv", "pool", "flatten", "global_pool") and len(shape) != 3:
            bad = f"needs a 4-D input (height, width, channels) but gets a flat vector of {shape[0]}"
        elif kind == "conv":
            (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
            if max(sh, sw) > 1 and max(dh, dw) > 1:
                bad = "stride and dilation cannot both be above 1 (TensorFlow's convolution does not support it)"
            else:
                oh = _out_len(shape[0], kh, sh, dh, spec.padding)
                ow = _out_len(shape[1], kw, sw, dw, spec.padding)
                if oh == 0 or ow == 0:
                    keff = f"{(kh - 1) * dh + 1}x{(kw - 1) * dw + 1}"
                    bad = (f"kernel {kh}x{kw}" + (f" (dilated to {keff})" if max(dh, dw) > 1 else "")
                           + f" is larger than its {shape[0]}x{shape[1]} input with padding 'valid'")
                bn = schema.resolve_bn(cfg.model.bn, spec.bn)
                # BN's beta already shifts each channel; a conv bias in front of it would be redundant.
                use_bias = bn is None or not bn.center
                params = kh * kw * shape[2] * spec.filters + (spec.filters if use_bias else 0)
                out = (oh, ow, spec.filters)
        elif kind == "pool":
            (ph, pw) = spec.size
            (sh, sw) = spec.stride or spec.size
            oh = _out_len(shape[0], ph, sh, 1, spec.padding)
            ow = _out_len(shape[1], pw, sw, 1, spec.padding)
            if oh == 0 or ow == 0:
                bad = f"pool {ph}x{pw} collapses its {shape[0]}x{shape[1]} input to nothing with padding 'valid'"
            out = (oh, ow, shape[2])
        elif kind == "flatten":
            out = (shape[0] * shape[1] * shape[2],)
        elif kind == "global_pool":
            out = (shape[2],)
        elif kind == "dense":
            if len(shape) != 1:
                bad = (f"gets a 4-D input ({'x'.join(map(str, shape))}); put a flatten or global_pool "
                       "layer before it")
            else:
                bn = schema.resolve_bn(cfg.model.bn, spec.bn)
                use_bias = bn is None or not bn.center
                params = shape[0] * spec.units + (spec.units if use_bias else 0)
                out = (spec.units,)
        layer = PlannedLayer(i, name, spec, shape, out, params, use_bias, bn)
        if bn is not None and not bad:
            layer.bn_impl, why = _bn_impl(bn, kind, explicit=spec.bn.impl is not None)
            if sync_bn:
                if bn.impl == "fused" and (spec.bn.impl == "fused" or kind == "conv"):
                    why = ("the fused kernel cannot all-reduce statistics across replicas; use keras or auto, "
                           "or distribute.sync_bn: false")
                layer.bn_impl = "sync"
            if why:
                problems.append(f"model.layers[{i}].bn.impl: {why}")
        if bad:
            problems.append(f"{where}: {bad}")
            break  # later shapes would only repeat the problem
        plan.append(layer)
        shape = out
    if not problems:
        last = cfg.model.layers[-1]
        n = len(cfg.model.layers) - 1
        if last.type != "dense" or last.units != schema.NUM_CLASSES:
            problems.append(f"model.layers[{n}]: the last layer must be a dense layer with {schema.NUM_CLASSES} "
                            f"units (the class logits), got {_describe(last)}")
        elif last.activation not in (None, "linear"):
            problems.append(f"model.layers[{n}].activation: the last layer gives the logits and must have no "
                            f"activation, got {last.activation!r}")
    if problems:
        raise ConfigError(problems)
    return plan


def _describe(spec):
    return f"a dense layer with {spec.units} units" if spec.type == "dense" else f"a {spec.type} layer"


def _bn_impl(bn: schema.BNSettings, kind: str, explicit: bool):
    """Pick the BN implementation: the fused kernel serves 4-D conv outputs without renorm.

    `model.bn.impl: fused` means fused for the conv layers; only a dense layer's own `bn.impl: fused` is an error.
    """
    if bn.impl == "fused" and kind != "conv" and explicit:
        return None, "fused BN needs the 4-D output of a conv layer; use keras or auto for dense layers"
    if bn.impl == "keras" or bn.renorm or kind != "conv":
        return "keras", None
    return "fused", None


def layer_table(plan: list[PlannedLayer]) -> list[tuple]:
    """Rows (name, kind, output shape, params, note) for a printed summary, BN as rows of their own."""
    rows = []
    for layer in plan:
        s = layer.spec
        if s.type == "conv":
            note = (f"{s.kernel[0]}x{s.kernel[1]}/{s.stride[0]}, {s.padding}"
                    + ("" if layer.use_bias else ", no bias (BN beta)"))
        elif s.type == "pool":
            note = f"{s.kind} {s.size[0]}x{s.size[1]}"
        elif s.type == "dropout":
            note = f"rate {s.rate:g}"
        elif s.type == "dense":
            note = "" if layer.use_bias else "no bias (BN beta)"
        else:
            note = ""
        rows.append((layer.name, s.type, layer.out_shape, layer.params, note))
        if layer.bn is not None:
            trainable, moving = layer.bn_params
            b = layer.bn
            per = [p for p, on in (("gamma", b.scale), ("beta", b.center)) if on] + ["mean", "var"]
            rows.append((layer.bn_name, f"bn ({layer.bn_impl})", layer.out_shape, trainable + moving,
                         f"{layer.channels} channels x ({', '.join(per)}); decay {b.decay:g}, eps {b.epsilon:g}"))
        act = getattr(s, "activation", None)
        if act not in (None, "linear"):
            rows.append((f"{layer.name}_{act}", act, layer.out_shape, 0, ""))
    return rows
