"""bn_stats/bn_trace.npz: the BN trace of a run (train/trace.py records it, present/bn_trace.py draws it).

Every few training steps, for each BN layer and channel: the batch mean and (biased) variance the step normalized
with and the moving mean and variance after that step's update. One array (samples, channels) per layer and
quantity, the steps they were taken at, and what the pictures mark: the last training step and, where precise BN
(or the EMA's recalibration) set the final model's statistics, those statistics.

Bounded for long runs: past MAX_SAMPLES samples, the newest half keeps every sample and the older ones are thinned
to one per window of steps (the window doubled as often as needed): evenly spread over the run. No TensorFlow here.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..readers import check_zip, read_bytes
from .rundir import RunDirError

# in bn_stats/, with the per-epoch statistics: a run that could not write its first checkpoint is removed whole
# (RunDir.removed_if_unstarted removes only what training writes, bn_stats/ among it)
TRACE_FILE = "bn_stats/bn_trace.npz"
QUANTITIES = ("batch_mean", "batch_variance", "moving_mean", "moving_variance")
MAX_SAMPLES = 1000  # mnist_bn's 320 channels: 5 KiB a sample, 5 MiB at most
MAX_BYTES = 256 << 20


@dataclass
class Trace:
    """The trace in memory: `steps` (S,) and, per layer name, {quantity: (S, channels) float32}."""

    steps: np.ndarray
    layers: dict
    decay: dict  # {layer: the moving average's decay (Keras momentum)}
    rule: dict  # {layer: "biased" | "unbiased"}: what its moving variance averages (the batch variance is biased)
    steps_per_epoch: int = 0
    end_step: int = -1  # the last training step, once training has ended
    final_mechanism: str = "none"  # "precise_bn" or "ema" when the final model's statistics were recomputed
    final: dict = field(default_factory=dict)  # {layer: {"mean": (C,), "variance": (C,)}} of that final model

    def __len__(self) -> int:
        return int(len(self.steps))


def empty(layers: dict, decay: dict, rule: dict, steps_per_epoch: int) -> Trace:
    """A trace with no samples yet; `layers` is {name: channels}."""
    return Trace(np.zeros((0,), np.int64),
                 {n: {q: np.zeros((0, c), np.float32) for q in QUANTITIES} for n, c in layers.items()},
                 dict(decay), dict(rule), int(steps_per_epoch))


def one_sample(step: int, row: dict) -> Trace:
    """A trace of the one sample `row` ({layer: {quantity: (C,)}}) taken at `step`: what the trace's measures (such
    as present/bn_trace.lag) take, for a sample on its way to TensorBoard."""
    return Trace(np.asarray([step], np.int64),
                 {n: {q: np.asarray(a[q], np.float32)[None] for q in QUANTITIES} for n, a in row.items()}, {}, {})


def extend(trace: Trace, steps: list, rows: list) -> None:
    """Add samples: `rows[k]` is {layer: {quantity: (C,)}} at `steps[k]`; then thin if the trace grew past
    MAX_SAMPLES."""
    if not steps:
        return
    trace.steps = np.concatenate([trace.steps, np.asarray(steps, np.int64)])
    for name, arrays in trace.layers.items():
        for q in QUANTITIES:
            arrays[q] = np.concatenate([arrays[q], np.stack([np.asarray(r[name][q], np.float32) for r in rows])])
    if len(trace) > MAX_SAMPLES:
        keep(trace, thinned(trace.steps))


def thinned(steps: np.ndarray) -> np.ndarray:
    """The indices kept of a trace's samples: the newest MAX_SAMPLES // 2 all; of the older ones, the first in each
    window of `stride` steps, the stride doubled until they fit in the other half (evenly spread over the run)."""
    recent = MAX_SAMPLES // 2
    older, stride = steps[:len(steps) - recent], 1
    while True:
        window = older // stride
        first = np.flatnonzero(np.concatenate([[True], window[1:] != window[:-1]])) if len(older) else older
        if len(first) <= MAX_SAMPLES - recent:
            return np.concatenate([first, np.arange(len(older), len(steps))]).astype(np.int64)
        stride *= 2


def keep(trace: Trace, index) -> None:
    trace.steps = trace.steps[index]
    for arrays in trace.layers.values():
        for q in QUANTITIES:
            arrays[q] = arrays[q][index]


def up_to(trace: Trace, step: int) -> Trace:
    """The samples at steps <= `step` (a resume continues from its checkpoint's step); the end marks dropped."""
    keep(trace, trace.steps <= step)
    trace.end_step, trace.final_mechanism, trace.final = -1, "none", {}
    return trace


def to_bytes(trace: Trace) -> bytes:
    names = list(trace.layers)
    arrays = {"steps": trace.steps, "names": np.asarray(names, dtype=str),
              "decay": np.asarray([trace.decay[n] for n in names], np.float64),
              "rule": np.asarray([trace.rule[n] for n in names], dtype=str),
              "steps_per_epoch": np.int64(trace.steps_per_epoch), "end_step": np.int64(trace.end_step),
              "final_mechanism": np.asarray(trace.final_mechanism)}
    for i, n in enumerate(names):
        arrays.update({f"{i}.{q}": trace.layers[n][q] for q in QUANTITIES})
        if n in trace.final:
            arrays.update({f"{i}.final_{k}": trace.final[n][k] for k in ("mean", "variance")})
    out = io.BytesIO()
    np.savez(out, **arrays)  # uncompressed: what is read back is bounded by the file's size
    return out.getvalue()


def read_trace(path) -> Trace:
    """The trace in `path` (a run's TRACE_FILE), each array checked; a damaged file is one RunDirError line."""
    what = "a BN trace convbn wrote"
    check_zip(path, {}, MAX_BYTES, total_limit=MAX_BYTES, what=what, error=RunDirError)  # declared sizes bounded
    data = read_bytes(path, MAX_BYTES, what, RunDirError)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return _checked({k: f[k] for k in f.files})
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise RunDirError(f"{path}: not a BN trace convbn wrote ({str(e)[:120] or type(e).__name__})") from None


def _checked(a: dict) -> Trace:
    steps = np.asarray(a["steps"], np.int64)
    names = [str(n) for n in a["names"]]
    if steps.ndim != 1 or np.any(np.diff(steps) <= 0) or len(set(names)) != len(names):
        raise ValueError("its steps do not increase or its layer names repeat")
    layers, final = {}, {}
    for i, n in enumerate(names):
        layers[n] = {q: np.asarray(a[f"{i}.{q}"], np.float32) for q in QUANTITIES}
        channels = layers[n]["batch_mean"].shape[1:]
        if any(v.shape != (len(steps), *channels) or len(channels) != 1 for v in layers[n].values()):
            raise ValueError(f"layer {n}'s arrays do not match its steps")
        if f"{i}.final_mean" in a:
            final[n] = {"mean": np.asarray(a[f"{i}.final_mean"], np.float32),
                        "variance": np.asarray(a[f"{i}.final_variance"], np.float32)}
            if any(v.shape != channels for v in final[n].values()):
                raise ValueError(f"layer {n}'s final statistics do not match its channels")
    decay, rule = np.asarray(a["decay"], np.float64), [str(r) for r in a["rule"]]
    if decay.shape != (len(names),) or len(rule) != len(names):
        raise ValueError("its decays or rules do not match its layers")
    return Trace(steps, layers, dict(zip(names, decay.tolist())), dict(zip(names, rule)),
                 int(a["steps_per_epoch"]), int(a["end_step"]), str(a["final_mechanism"]), final)
