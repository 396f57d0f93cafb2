"""The config schema: what a convbn YAML file may say, with types, ranges and defaults.

pydantic does the validation. Every model forbids unknown keys, so that a typo (`epsilion:`) is an
error rather than a silently ignored setting, and is strict, so that `"3"` is not an int and `yes`
in quotes is not a bool. Ranges are checked by `In(...)` so that the message reads like the docs:
`must be in [0, 1), got 1.5`.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    create_model,
    model_serializer,
    model_validator,
)

from ..data import registry


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def In(lo=None, hi=None, *, lo_open=False, hi_open=False, kind=float):
    """A number type checked against [lo, hi] (either end open or absent), with a readable message."""

    def fmt(x):
        return f"{x:g}" if isinstance(x, float) else str(x)

    def check(v):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            if lo is not None and hi is not None:
                rng = f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
                raise ValueError(f"must be in {rng}, got {fmt(v)}")
            op, bound = (">" if lo_open else ">=", lo) if lo is not None else ("<" if hi_open else "<=", hi)
            raise ValueError(f"must be {op} {fmt(bound)}, got {fmt(v)}")
        return v

    return Annotated[kind, AfterValidator(check)]


Fraction = In(0, 1, hi_open=True)  # [0, 1)
Positive = In(0, lo_open=True)
PosInt = In(1, kind=int)


def _pair(v):
    # `kernel: 5` means 5x5; a two-element list gives height and width.
    return [v, v] if isinstance(v, int) and not isinstance(v, bool) else v


IntPair = Annotated[list[PosInt], BeforeValidator(_pair), Field(min_length=2, max_length=2)]
Activation = Optional[Literal["relu", "relu6", "elu", "gelu", "swish", "tanh", "sigmoid", "linear"]]


class RenormClipping(Strict):
    rmax: In(1) = 3.0
    rmin: In(0, 1, lo_open=True) = 1 / 3
    dmax: In(0) = 5.0


class BNSettings(Strict):
    """Batch-norm settings, with the names of TF1's `batch_norm(normalizer_params=...)`.

    `decay` is the moving-average decay: moving = decay * moving + (1 - decay) * batch statistic.
    Keras calls the same number `momentum`.
    """

    epsilon: Positive = 1e-3
    center: bool = True
    scale: bool = True
    decay: Fraction = 0.99
    # fused: TensorFlow's FusedBatchNormV3 kernel (4-D conv outputs only); keras: keras.layers.BatchNormalization;
    # auto: fused where it can serve, keras elsewhere.
    impl: Literal["auto", "fused", "keras"] = "auto"
    renorm: bool = False  # batch renormalization (Ioffe 2017); Keras-only, so it implies impl keras
    renorm_momentum: Fraction = 0.99
    renorm_clipping: Optional[RenormClipping] = None
    # what the moving variance averages: the biased batch variance (Keras 3; divided by n) or the unbiased one
    # (TF1's fused batch_norm, PyTorch's running_var; divided by n - 1). Normalization always uses the biased one.
    moving_variance: Literal["biased", "unbiased"] = "biased"


def _all_optional(settings: type[Strict], name: str, doc: str) -> type[Strict]:
    """A model with every field of `settings` (same types and checks), each optional and unset by default."""
    fields = {n: (Optional[Annotated[(f.annotation, *f.metadata)]] if f.metadata else Optional[f.annotation], None)
              for n, f in settings.model_fields.items()}
    return create_model(name, __base__=Strict, __doc__=doc, __module__=__name__, **fields)


# A layer's `bn:` mapping: derived from BNSettings, so that a new BN setting is one line there.
BNOverride = _all_optional(BNSettings, "BNOverride", "A layer's `bn:` mapping: any subset of BNSettings, laid over "
                           "`model.bn`.")


def _bn_switch(v):
    # `bn: true` = model.bn as it is, `bn: false` (or null) = no BN, a mapping = model.bn with keys replaced.
    if v is True:
        return {}
    if v is False or v is None:
        return None
    if isinstance(v, (dict, BNOverride)):
        return v
    raise ValueError(f"must be true, false or a mapping of BN settings, got {v!r}")


def _bn_dump(v):
    return False if v is None else (v.model_dump(exclude_none=True) or True)


LayerBN = Annotated[Optional[BNOverride], BeforeValidator(_bn_switch), PlainSerializer(_bn_dump)]


class LayerProblem(ValueError):
    """A layer that cannot work with the input shape it gets (the plan names the layer)."""


def _out_len(n, k, s, d, padding):
    k_eff = (k - 1) * d + 1
    if padding == "same":
        return -(-n // s)
    return (n - k_eff) // s + 1 if n >= k_eff else 0


class LayerSpec(Strict):
    """A layer type: its settings, and what every type works out for itself.

    plan(shape, bn) -> (output shape, parameter count, use_bias), shapes channels-last without the batch.
    The Keras layer each type makes is built in model/layers.py (the config knows nothing of Keras).
    `input_rank` is the rank of input the layer needs: 3 (an image), 1 (a flat vector) or None (any).
    """

    input_rank: ClassVar[Optional[int]] = 3
    has_bn: ClassVar[bool] = False

    def plan(self, shape, bn):
        return shape, 0, True

    def note(self, planned) -> str:
        return ""


class ConvLayer(LayerSpec):
    type: Literal["conv"]
    filters: In(1, 65536, kind=int)
    kernel: IntPair = 3
    stride: IntPair = 1
    padding: Literal["same", "valid"] = "same"
    dilation: IntPair = 1
    activation: Activation = "relu"
    bn: LayerBN = True
    # Max-pool the conv's output by this factor *before* BN and the activation (conv -> pool -> BN -> activation,
    # the block order of the fastest published small-net trainers): BN and the activation then run on a quarter
    # of the values, with the same per-channel statistics' shape. 1: no pooling inside the block.
    pool: In(1, 64, kind=int) = 1

    has_bn: ClassVar[bool] = True

    def conv_shape(self, shape) -> tuple:
        """The conv's own output for an input `shape`, before the block's pooling (the plan's output after it)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        if max(sh, sw) > 1 and max(dh, dw) > 1:
            raise LayerProblem("stride and dilation cannot both be above 1 (TensorFlow's convolution does not "
                               "support it)")
        oh = _out_len(shape[0], kh, sh, dh, self.padding)
        ow = _out_len(shape[1], kw, sw, dw, self.padding)
        if oh == 0 or ow == 0:
            keff = f"{(kh - 1) * dh + 1}x{(kw - 1) * dw + 1}"
            raise LayerProblem(f"kernel {kh}x{kw}" + (f" (dilated to {keff})" if max(dh, dw) > 1 else "")
                               + f" is larger than its {shape[0]}x{shape[1]} input with padding 'valid'")
        return oh, ow, self.filters

    def plan(self, shape, bn):
        (kh, kw) = self.kernel
        oh, ow, _ = self.conv_shape(shape)
        if self.pool > 1:
            if min(oh, ow) < self.pool:
                raise LayerProblem(f"pool {self.pool} collapses the conv's {oh}x{ow} output to nothing")
            oh, ow = oh // self.pool, ow // self.pool
        # BN's beta already shifts each channel; a conv bias in front of it would be redundant.
        use_bias = bn is None or not bn.center
        params = kh * kw * shape[2] * self.filters + (self.filters if use_bias else 0)
        return (oh, ow, self.filters), params, use_bias

    def note(self, planned):
        return (f"{self.kernel[0]}x{self.kernel[1]}/{self.stride[0]}, {self.padding}"
                + (f", max-pool {self.pool} before BN" if self.pool > 1 else "")
                + ("" if planned.use_bias else ", no bias (BN beta)"))



class PoolLayer(LayerSpec):
    type: Literal["pool"]
    kind: Literal["max", "avg"] = "max"
    size: IntPair = 2
    stride: Optional[IntPair] = None  # null: same as size
    padding: Literal["same", "valid"] = "valid"

    def plan(self, shape, bn):
        (ph, pw) = self.size
        (sh, sw) = self.stride or self.size
        oh = _out_len(shape[0], ph, sh, 1, self.padding)
        ow = _out_len(shape[1], pw, sw, 1, self.padding)
        if oh == 0 or ow == 0:
            raise LayerProblem(f"pool {ph}x{pw} collapses its {shape[0]}x{shape[1]} input to nothing with padding "
                               "'valid'")
        return (oh, ow, shape[2]), 0, True

    def note(self, planned):
        return f"{self.kind} {self.size[0]}x{self.size[1]}"



class DropoutLayer(LayerSpec):
    type: Literal["dropout"]
    rate: Fraction

    input_rank: ClassVar[Optional[int]] = None

    def note(self, planned):
        return f"rate {self.rate:g}"



class FlattenLayer(LayerSpec):
    type: Literal["flatten"]

    def plan(self, shape, bn):
        return (shape[0] * shape[1] * shape[2],), 0, True



class GlobalPoolLayer(LayerSpec):
    type: Literal["global_pool"]
    kind: Literal["max", "avg"] = "avg"

    def plan(self, shape, bn):
        return (shape[2],), 0, True



class CropLayer(LayerSpec):
    """Drop `border` pixels from each side of the image (Keras' Cropping2D), in the graph: the model still takes
    the dataset's full images. MNIST's digits are fitted in 20x20 and centred in 28x28, so its outer rings hold
    little ink (1, 2, 3, 4 pixels: 0.02, 0.24, 1.0, 3.3% of it) and every conv after a crop works on fewer
    positions."""

    type: Literal["crop"]
    border: IntPair = 1  # pixels dropped from top and bottom, left and right

    def plan(self, shape, bn):
        (bh, bw) = self.border
        oh, ow = shape[0] - 2 * bh, shape[1] - 2 * bw
        if oh < 1 or ow < 1:
            raise LayerProblem(f"border {bh}x{bw} leaves nothing of its {shape[0]}x{shape[1]} input")
        return (oh, ow, shape[2]), 0, True

    def note(self, planned):
        return f"border {self.border[0]}x{self.border[1]}"



class DenseLayer(LayerSpec):
    type: Literal["dense"]
    # `classes`: as many as the dataset has (for the last layer, the logits, when the dataset is your own)
    units: In(1, 1_000_000, kind=int) | Literal["classes"]
    activation: Activation = None
    bn: LayerBN = False

    input_rank: ClassVar[Optional[int]] = 1
    has_bn: ClassVar[bool] = True

    def plan(self, shape, bn):
        use_bias = bn is None or not bn.center
        return (self.units,), shape[0] * self.units + (self.units if use_bias else 0), use_bias

    def note(self, planned):
        return "" if planned.use_bias else "no bias (BN beta)"



LAYER_CLASSES = {c.model_fields["type"].annotation.__args__[0]: c
                 for c in (ConvLayer, PoolLayer, DropoutLayer, FlattenLayer, GlobalPoolLayer, DenseLayer,
                           CropLayer)}
Layer = Annotated[
    ConvLayer | PoolLayer | DropoutLayer | FlattenLayer | GlobalPoolLayer | DenseLayer | CropLayer,
    Field(discriminator="type"),
]


class Elastic(Strict):
    """Elastic distortion (Simard, Steinkraus and Platt 2003): each pixel moved by a random field, smoothed."""

    alpha: In(0, 100, lo_open=True) = 34.0  # the field's scale, pixels (Simard's MNIST values: alpha 34, sigma 4)
    sigma: In(0.5, 20) = 4.0  # the Gaussian smoothing's standard deviation, pixels: larger is smoother


class Augment(Strict):
    shift: In(0, 0.5) = 0.0  # largest random shift, as a fraction of height and width
    rotation: In(0, 180) = 0.0  # largest random rotation, degrees
    zoom: In(0, 0.5) = 0.0  # largest random change of scale: each image scaled by a factor in [1 - zoom, 1 + zoom]
    flip: bool = False  # mirror half the images left-right (clothes: yes; digits: no, a mirrored 2 is not a 2)
    elastic: Optional[Elastic] = None  # {alpha, sigma}: an elastic distortion before the shift and rotation


def _plain_path(v: str) -> str:
    if "\x00" in v or "\n" in v or "\r" in v:
        raise ValueError(f"must not contain a NUL byte or a line break, got {v!r}")
    return v


def _dataset_switch(v):
    # `dataset: mnist` names a built-in dataset; any other string is the path of the user's own (`{path: ...}`)
    if isinstance(v, str) and v not in registry.DATASETS:
        return {"path": v}
    return v


class DatasetSource(Strict):
    """A dataset the user brings (data/own): image folders, a CSV, an NPZ or IDX files at `path`."""

    path: Annotated[str, Field(min_length=1), AfterValidator(_plain_path)]
    format: Literal["auto", "folder", "csv", "npz", "idx"] = "auto"  # auto: told by what `path` is and holds

    @property
    def name(self) -> str:
        return self.path


class DatasetFacts(Strict):
    """What convbn read from the user's own dataset when the run was trained, kept in the run's config.yaml so that
    eval, predict, export and report know the classes, the image shape and the normalization without reading the
    dataset again (and can tell when it has changed since). Written by convbn; nothing to set by hand."""

    class_names: Annotated[list[Annotated[str, Field(max_length=255)]], Field(min_length=2, max_length=10_000)]
    image_shape: Annotated[list[PosInt], Field(min_length=3, max_length=3)]
    mean: list[float]  # per channel, pixels in [0, 1], of the training images (`normalize: standardize`)
    std: list[Positive]
    train_size: In(0, kind=int)
    test_size: In(0, kind=int)
    val_size: In(0, kind=int) = 0  # a validation split of its own (then data.val_split is not used)
    content_hash: str  # sha256 over every file's bytes (data/own/cache.py)
    digits: bool = False  # classes 0-9 as light strokes on a dark ground: predict prepares pictures as for MNIST


class DataConfig(Strict):
    dataset: Annotated[Literal[registry.DATASETS] | DatasetSource, BeforeValidator(_dataset_switch)] = "mnist"
    # Your own dataset: how its images are brought to model.input_shape. pad: keep the aspect, fit inside, pad
    # with the border's colour; fit: keep the aspect, cover, crop the centre; stretch: scale each side
    resize: Literal["pad", "fit", "stretch"] = "pad"
    # Your own dataset without a test split of its own: this fraction of its images (chosen by a hash of each
    # file's name, so the choice holds on every machine and when files are added) is the test set
    test_split: In(0, 1, lo_open=True, hi_open=True) = 0.2
    max_files: In(1, 10_000_000, kind=int) = 200_000  # images read from your own dataset at most
    about: Optional[DatasetFacts] = None  # filled in by convbn from your own dataset (DatasetFacts)
    batch_size: In(1, 65536, kind=int) = 128  # per replica: the global batch is batch_size x replicas
    val_split: Fraction = 0.1  # fraction of the training set held out for validation (the last images)
    normalize: Literal["scale", "standardize"] = "scale"  # scale: x/255; standardize: (x/255 - mean) / std
    augment: Optional[Augment] = None
    # Use only the first N training / test images (quick trials and tests); null: all of them.
    max_train: Optional[PosInt] = None
    max_test: Optional[PosInt] = None


class ModelConfig(Strict):
    # height, width, channels; null: the dataset's image shape
    input_shape: Optional[Annotated[list[PosInt], Field(min_length=3, max_length=3)]] = None
    data_format: Literal["channels_last", "channels_first"] = "channels_last"
    bn: BNSettings = BNSettings()
    layers: Annotated[list[Layer], Field(min_length=1)]


class NamedChoice(Strict):
    """A section whose `name` picks what takes which keys. A key the choice does not use is an error, not ignored:
    `{name: sgd, momentum: 0.9}` (a PyTorch user's SGD with momentum) would train plain SGD, `{name: constant,
    warmup: 0.1}` warm up nothing, without a word. A run's config.yaml holds only the keys its choice used."""

    OWN_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {}  # each `name` -> its keys that not every choice takes
    HINT: ClassVar[tuple] = ()  # (name, other, text): said when every key given to `name` is one `other` takes

    @classmethod
    def unused_keys(cls, name) -> tuple[str, ...]:
        own = cls.OWN_KEYS.get(name, ()) if isinstance(name, str) else ()
        return tuple(dict.fromkeys(k for keys in cls.OWN_KEYS.values() for k in keys if k not in own))

    @model_validator(mode="after")
    def _no_unused_keys(self):
        given = [k for k in self.unused_keys(self.name) if k in self.model_fields_set]
        if given:  # grouped by the choices that take them: "beta_1, beta_2 ('adam' and 'adamw' do)"
            users = {k: tuple(repr(n) for n, keys in self.OWN_KEYS.items() if k in keys) for k in given}
            which = "; ".join(f"{', '.join(k for k in given if users[k] == u)} ({' and '.join(u)} "
                              f"{'does' if len(u) == 1 else 'do'})" for u in dict.fromkeys(users.values()))
            name, other, text = self.HINT or (None, None, "")
            hint = text if name == self.name and set(given) <= set(self.OWN_KEYS[other]) else ""
            raise ValueError(f"{self.name!r} does not use {which}: remove {'it' if len(given) == 1 else 'them'}{hint}")
        return self

    @model_serializer(mode="wrap")
    def _used_keys_only(self, handler):
        return {k: v for k, v in handler(self).items() if k not in self.unused_keys(self.name)}


class OptimizerConfig(NamedChoice):
    name: Literal["sgd", "momentum", "adam", "adamw"] = "adam"
    lr: In(0, 100, lo_open=True) = 1e-3
    weight_decay: Fraction = 0.0  # decoupled weight decay (Keras optimizers' `weight_decay`)
    momentum: Fraction = 0.9  # for `momentum`
    nesterov: bool = False  # for `momentum`
    beta_1: Fraction = 0.9  # adam, adamw: decay of the gradient's moving average (Keras' default)
    beta_2: Fraction = 0.999  # adam, adamw: decay of the squared gradient's moving average

    OWN_KEYS = {"sgd": (), "momentum": ("momentum", "nesterov"), "adam": ("beta_1", "beta_2"),
                "adamw": ("beta_1", "beta_2")}
    HINT = ("sgd", "momentum", ", or write name: momentum for SGD with momentum")


class ScheduleConfig(NamedChoice):
    name: Literal["constant", "cosine", "one_cycle"] = "constant"
    warmup: Fraction = 0.0  # cosine: fraction of all steps spent in linear warm-up
    pct_start: In(0, 1, lo_open=True, hi_open=True) = 0.25  # one_cycle: fraction of steps rising to the peak lr
    div_factor: In(1) = 25.0  # one_cycle: start lr = lr / div_factor
    final_div_factor: In(1) = 1e4  # one_cycle: final lr = start lr / final_div_factor

    OWN_KEYS = {"constant": (), "cosine": ("warmup",), "one_cycle": ("pct_start", "div_factor", "final_div_factor")}


NAMED_CHOICES = {"optimizer": OptimizerConfig, "schedule": ScheduleConfig}  # train.<key>: NamedChoice sections


# Batches precise BN averages the statistics over unless told otherwise (train.precise_bn, `convbn recalibrate`,
# the EMA model, a model from elsewhere): 200 batches of 64-128 are 13-26k images, enough that the statistics'
# sampling noise is far below what a training run's last steps leave (fvcore's precise BN uses 200 too).
PRECISE_BN_BATCHES = 200


class PreciseBN(Strict):
    """Recompute the BN statistics with the final weights after training (see `convbn recalibrate`).

    when: "always", or "auto": only when the moving statistics measurably lag (validation accuracy with them
    below the accuracy with each batch's own statistics by more than the noise of the comparison), and kept only
    if it does not lower that accuracy (train/final.py). augmented: the training images with data.augment; false
    (the default, also for the EMA's): as they are, as inference sees them (BENCHMARKS.md: about equal after
    light augmentation, far better after strong). An older run's config.yaml reads true (loader.as_trained).
    """

    batches: In(1, 1_000_000, kind=int) = PRECISE_BN_BATCHES  # training batches to average the BN statistics over
    when: Literal["auto", "always"] = "always"
    augmented: bool = False


def _precise_switch(v):
    # `precise_bn: auto` (the default) / `always` / `off` (or null, false) / a mapping ({batches: N} = always)
    if v == "auto":
        return {"when": "auto"}
    if v == "always" or v is True:
        return {}
    if v is None or v is False or v == "off":
        return None
    if isinstance(v, (dict, PreciseBN)):
        return v
    raise ValueError(f"must be auto, always, off or a mapping like {{batches: {PRECISE_BN_BATCHES}}}, got {v!r}")


class EarlyStopping(Strict):
    metric: Literal["val_acc", "val_loss"] = "val_acc"
    patience: In(1, 100000, kind=int) = 3  # epochs without an improvement of more than min_delta
    min_delta: In(0) = 0.0


class EMA(Strict):
    """An exponential moving average of the trainable weights (Keras optimizers' `use_ema`), used as the final
    model after precise BN recomputes the BN statistics for the averaged weights."""

    decay: Fraction = 0.998  # average = decay * average + (1 - decay) * weights, after every step


class TrainConfig(Strict):
    epochs: In(1, 100000, kind=int) = 10
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: Fraction = 0.0
    seed: In(0, 2**31 - 1, kind=int) = 0
    deterministic: bool = False  # TensorFlow op determinism: same seed, same weights
    jit_compile: bool = False  # XLA; measured slower on CPU, so off by default
    # mixed_bfloat16: convolutions and matrix products in bfloat16 (variables, BN statistics and the logits stay
    # float32). Much faster on CPUs with AMX/AVX512-BF16 and on recent GPUs; slower on CPUs without them.
    # auto: mixed_bfloat16 exactly there, float32 elsewhere (model/precision.py).
    precision: Literal["float32", "mixed_bfloat16", "auto"] = "float32"
    # Recompute the BN statistics of the final model after training (see PreciseBN): by default only when the
    # moving statistics lag, which a short run's do whatever the decay (README, "Why short runs used to fail").
    precise_bn: Annotated[Optional[PreciseBN], BeforeValidator(_precise_switch)] = PreciseBN(when="auto")
    # Stop when the validation metric has not improved for `patience` epochs (the best checkpoint is kept anyway).
    early_stopping: Optional[EarlyStopping] = None
    # Training steps per compiled call: one Python round trip (and one chance to stop on Ctrl-C) per K steps.
    steps_per_execution: In(1, 100000, kind=int) = 1
    # The final model is the moving average of the weights, with BN statistics recomputed for it (precise BN over
    # train.precise_bn.batches, else PRECISE_BN_BATCHES); the raw weights stay in checkpoints/.
    ema: Optional[EMA] = None

    @property
    def ema_bn_batches(self) -> int:
        """The training batches precise BN averages over for the EMA model."""
        return self.precise_bn.batches if self.precise_bn is not None else PRECISE_BN_BATCHES


class DistributeConfig(Strict):
    strategy: Literal["none", "mirrored", "multi_worker"] = "none"
    sync_bn: bool = True  # all-reduce BN statistics across replicas (Keras' synchronized BatchNormalization)
    cpu_replicas: Optional[In(1, 64, kind=int)] = None  # split the CPU into K logical devices (for trying mirrored)


def _one_name(v: str) -> str:
    # one directory name under output.root: "." and ".." would write beside or above the root
    if v in (".", ".."):
        raise ValueError(f"must be a directory name, not {v!r}")
    return v


class OutputConfig(Strict):
    root: Annotated[str, Field(min_length=1), AfterValidator(_plain_path)] = "runs"
    # null: the config file's stem; letters, digits, '.', '_' and '-' only, so no path separator can get in
    name: Optional[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=128), AfterValidator(_one_name)]] \
        = None
    keep_checkpoints: In(1, 1000, kind=int) = 3
    log_every_steps: In(1, 1_000_000, kind=int) = 20  # TensorBoard: training loss and learning rate every N steps
    plots: bool = True  # train_batch.png at the start, curves.png after every epoch, confusion_matrix.png at the end
    # bn_trace.npz: each BN layer's batch and moving statistics every N steps (more often in an epoch of fewer than
    # 20 x N steps); null: off. Costs one read of the statistics per sample (bench/bn_trace_cost.py)
    bn_trace: Optional[In(1, 1_000_000, kind=int)] = 20


class Config(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    distribute: DistributeConfig = DistributeConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _dataset_defaults(self):
        if self.resolved:
            if self.model.input_shape is None:
                self.model.input_shape = list(self.dataset.image_shape)
            for layer in self.model.layers:
                if getattr(layer, "units", None) == "classes":
                    layer.units = self.dataset.num_classes
        return self

    @property
    def own(self) -> Optional[DatasetSource]:
        """The user's own dataset, or None for a built-in one."""
        return self.data.dataset if isinstance(self.data.dataset, DatasetSource) else None

    @property
    def dataset_name(self) -> str:
        """What messages and listings call the dataset: a built-in one's name, or the path of the user's own."""
        return self.data.dataset if self.own is None else self.own.path

    @property
    def resolved(self) -> bool:
        """Whether the dataset's classes and image shape are known: always for a built-in dataset; for the user's
        own once convbn has read it (data.about, config/loader.py)."""
        return self.own is None or self.data.about is not None

    @property
    def dataset(self) -> registry.Dataset:
        """The registry entry of `data.dataset`: image shape, classes and their names, normalization; for the
        user's own dataset, made from what convbn read of it (data.about)."""
        if self.own is None:
            return registry.REGISTRY[self.data.dataset]
        about = self.data.about
        if about is None:
            raise ValueError("the dataset has not been read yet (config/loader.py resolves data.about)")
        return registry.own_entry(self.own.path, about.model_dump())


def resolve_bn(model_bn: BNSettings, layer_bn: Optional[BNOverride]) -> Optional[BNSettings]:
    """A layer's effective BN settings: None for no BN, else model.bn with the layer's keys laid over it."""
    if layer_bn is None:
        return None
    merged = model_bn.model_dump()
    merged.update(layer_bn.model_dump(exclude_none=True))
    return BNSettings.model_validate(merged)
