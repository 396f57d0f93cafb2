"""What each BN layer receives and gives on one batch of evaluation images (`convbn inspect-bn --activations`, the
report), and the seed's question on the user's own network: one scale and shift per feature map or per activation.

For every chosen BN layer, at inference (the model as it predicts): its input x (the call taps of model/graph.py:
input_model, output_model), its normalized values (x - moving mean) / sqrt(moving variance + epsilon), and its
output gamma * normalized + beta (taken from the layer itself). Per channel: mean, standard deviation and the
percentiles a box plot draws (5, 25, 50, 75, 95).

Per feature map vs per activation, for one conv BN: BN as convbn (and every framework) does it has one gamma and beta
per channel, statistics over N, H and W; the alternative the seed asked about has one per activation (per position
and channel), statistics over N only. Both are computed on the same batch, with what each does to one feature map.
"""

from __future__ import annotations

import io

import numpy as np

from ..errors import ConvbnError, TargetError
from ..model.bn import bn_layers, channel_axis
from ..model.graph import input_model, output_model
from ..model.stats import bn_layer_parameters
from ..present.bn_activations import draw_activations, draw_per_activation, explain_lines
from ..present.bn_trace import draw_heatmap, draw_lag
from ..runs.bn_trace import TRACE_FILE, read_trace
from ..runs.target import opened

PERCENTILES = (5, 25, 50, 75, 95)
KINDS = ("input", "normalized", "output")


def per_channel_summary(values: np.ndarray) -> dict:
    """(values, channels) -> per channel mean, std and the box plot's percentiles (float64 arrays)."""
    p = np.percentile(values, PERCENTILES, axis=0)
    return {"mean": values.mean(0), "std": values.std(0), **{f"p{q}": p[i] for i, q in enumerate(PERCENTILES)}}


def channels_last(tensor, bn) -> np.ndarray:
    """`tensor` as float64 with the BN's channel axis last (NHWC or (N, C))."""
    out = np.asarray(tensor, np.float64)
    return np.moveaxis(out, channel_axis(bn, out.ndim), -1)


def chosen_layers(model, layers=None) -> list:
    bns = bn_layers(model)
    if not bns:
        raise TargetError("the model has no BN layers")
    if not layers:
        return bns
    by_name = {bn.name: bn for bn in bns}
    unknown = [n for n in layers if n not in by_name]
    if unknown:
        raise TargetError(f"no BN layer named {', '.join(unknown)} (the model has: {', '.join(by_name)})")
    return [by_name[n] for n in layers]


def one_batch(t, data=None, scale=1 / 255, log=lambda m: None) -> np.ndarray:
    """One batch of the target's evaluation images (the training batch size), as the model takes them."""
    d = t.eval_data(1, data_source=data, scale=scale, log=log)
    return np.asarray(d.images[:d.batch_size], np.float32)


def layer_activations(model, bn, x) -> dict:
    """One BN layer on the batch `x`: its input, normalized values and output, channels last (float64)."""
    p = bn_layer_parameters(bn)
    inp = channels_last(input_model(model, bn)(x, training=False), bn)
    out = channels_last(output_model(model, bn)(x, training=False), bn)
    normalized = (inp - p["moving_mean"]) / np.sqrt(p["moving_variance"] + p["epsilon"])
    return {"input": inp, "normalized": normalized, "output": out, "params": p}


def bn_activations(target, *, which="best", layers=None, data=None, scale=1 / 255, log=lambda m: None,
                   x=None) -> dict:
    """{"checkpoint", "images", "layers": {name: {"shape", "channels", "input"|"normalized"|"output": summary}},
    "per_activation": explain() of the first chosen conv BN (None if none)}. `x`: the batch (else one_batch)."""
    t = opened(target, which)
    if t.model is None:
        raise TargetError(f"{t.source}: only runs; --activations needs a Keras model")
    chosen = chosen_layers(t.model, layers)
    x = one_batch(t, data, scale, log) if x is None else x
    out, explained = {}, None
    for bn in chosen:
        acts = layer_activations(t.model, bn, x)
        channels = acts["input"].shape[-1]
        out[bn.name] = {"shape": list(acts["input"].shape), "channels": int(channels),
                        **{k: per_channel_summary(acts[k].reshape(-1, channels)) for k in KINDS}}
        if explained is None and acts["input"].ndim == 4:
            explained = explain(bn.name, acts)
    return {"checkpoint": t.source, "images": int(len(x)), "layers": out, "per_activation": explained}


def explain(name: str, acts: dict) -> dict:
    """Per feature map (BN as it is) vs per activation on the same batch, for one conv BN's input (N, H, W, C).

    Both standardize with the batch's own statistics (as in a training step): per channel over N, H, W; per activation
    over N only. `channel` is the one whose per-position means vary most, `image` the first of the batch."""
    x = acts["input"]
    n, h, w, c = x.shape
    mean_c, var_c = x.mean((0, 1, 2)), x.var((0, 1, 2))
    mean_a, var_a = x.mean(0), x.var(0)  # (H, W, C)
    eps = float(acts["params"]["epsilon"])
    by_channel = (x - mean_c) / np.sqrt(var_c + eps)
    by_activation = (x - mean_a) / np.sqrt(var_a + eps)
    spread = mean_a.reshape(-1, c).std(0) / np.sqrt(var_c + eps)  # how far apart the positions' means are
    ch = int(np.argmax(spread))
    return {"layer": name, "batch": n, "height": h, "width": w, "channels": c, "channel": ch, "image": 0,
            "parameters": {"per_feature_map": 2 * c, "per_activation": 2 * h * w * c},
            "values_per_statistic": {"per_feature_map": n * h * w, "per_activation": n},
            "statistics_shape": {"per_feature_map": [c], "per_activation": [h, w, c]},
            "position_spread": float(np.median(spread)),
            "flat_positions": float((var_a[..., ch] < 1e-6 * max(float(var_c[ch]), 1e-12)).mean()),
            "maps": {"input": x[0, :, :, ch], "per_feature_map": by_channel[0, :, :, ch],
                     "per_activation": by_activation[0, :, :, ch], "mean_per_activation": mean_a[..., ch],
                     "mean_per_feature_map": float(mean_c[ch])}}


def report_pictures(run, t, *, log=lambda m: None) -> dict:
    """What `convbn report` shows of BN while training and of BN's activations: {"pictures": {name: PNG bytes},
    "notes": {"trace": why there is no trace picture, "per_activation": the comparison's lines}}."""
    def png(draw, *args):
        buf = io.BytesIO()
        draw(*args, buf)
        return buf.getvalue()

    pictures, notes = {}, {}
    path = run.path / TRACE_FILE
    if path.is_file():
        try:
            trace = read_trace(path)
            if len(trace):
                pictures.update(bn_trace=png(draw_lag, trace), bn_trace_heatmap=png(draw_heatmap, trace))
            else:
                notes["trace"] = f"{path}: no sample yet (the run stopped before its first sampled step)"
        except ConvbnError as e:
            notes["trace"] = str(e)
    else:
        notes["trace"] = f"no {TRACE_FILE}: the run was trained with output.bn_trace: null, or before convbn traced BN"
    acts = bn_activations(t, log=log)
    pictures["bn_activations"] = png(draw_activations, acts)
    if acts["per_activation"] is not None:
        pictures["bn_per_activation"] = png(draw_per_activation, acts["per_activation"])
        notes["per_activation"] = explain_lines(acts["per_activation"])
    return {"pictures": pictures, "notes": notes}
