"""Pictures of the BN trace (runs/bn_trace.py): the moving statistics chasing each step's batch statistics.

draw_lag: one row per BN layer. Left and middle: the batch mean and variance of a few channels at every sampled
step (thin, pale) and the moving mean and variance (thick, same colour); the end of training is a dashed line, and
where precise BN (or the EMA's recalibration) set the final model's statistics, those are stars just after it.
Right: the lag of every channel in one line, the median over channels of |moving mean - batch mean| / batch std,
and of |moving variance / batch variance - 1|, per step: a run whose moving statistics have caught up ends low (a
few hundredths), one that still carries the start (decay 0.999 on a short run) stays near 1 or above.
draw_heatmap: per layer, the batch mean of every channel (rows) at every sampled step (columns).
No TensorFlow here.
"""

from __future__ import annotations

import numpy as np

from .plots import _pyplot, _save

CHANNELS_SHOWN = 4
RECENT = 0.1  # the fraction of the samples (the last ones) the channels shown are chosen by
EPS = 1e-12


def lag(trace, name: str) -> dict:
    """{"mean": (S,), "variance": (S,)}: the median over channels, per sample, of |moving - batch| mean in batch
    standard deviations and |moving / batch - 1| variance (the right column of draw_lag)."""
    a = trace.layers[name]
    std = np.sqrt(np.maximum(a["batch_variance"], 0) + EPS)
    return {"mean": np.median(np.abs(a["moving_mean"] - a["batch_mean"]) / std, axis=1),
            "variance": np.median(np.abs(a["moving_variance"] / (a["batch_variance"] + EPS) - 1), axis=1)}


def final_lag(trace, name: str) -> dict | None:
    """The same measure for the final model's statistics (precise BN's) against the last sampled batch; None when
    precise BN did not set them."""
    if name not in trace.final or not len(trace):
        return None
    a, f = trace.layers[name], trace.final[name]
    var = a["batch_variance"][-1]
    return {"mean": float(np.median(np.abs(f["mean"] - a["batch_mean"][-1]) / np.sqrt(np.maximum(var, 0) + EPS))),
            "variance": float(np.median(np.abs(f["variance"] / (var + EPS) - 1)))}


def shown_channels(trace, name: str, k: int = CHANNELS_SHOWN) -> np.ndarray:
    """The k channels whose batch mean is furthest from zero over the last RECENT of the samples (the lag of the
    mean is plainest there), in channel order."""
    m = trace.layers[name]["batch_mean"]
    recent = np.abs(m[-max(1, int(len(m) * RECENT)):]).mean(axis=0)
    return np.sort(np.argsort(-recent, kind="stable")[:k])


def draw_lag(trace, path, title: str = "") -> None:
    plt = _pyplot()
    names = list(trace.layers)
    fig, axes = plt.subplots(max(1, len(names)), 3, figsize=(15, 2.9 * max(1, len(names))), squeeze=False)
    for row, name in zip(axes, names):
        _channels(row[0], row[1], trace, name)
        _summary(row[2], trace, name)
    fig.suptitle(f"BN statistics while training: moving (thick) vs batch (thin), {title}".rstrip(", "), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    _save(fig, path)


def _channels(ax_mean, ax_var, trace, name) -> None:
    a, steps, colors = trace.layers[name], trace.steps, _pyplot().get_cmap("tab10").colors
    end = trace.end_step if trace.end_step >= 0 else None
    for i, c in enumerate(shown_channels(trace, name)):
        color = colors[i % len(colors)]
        for ax, q in ((ax_mean, "mean"), (ax_var, "variance")):
            ax.plot(steps, a[f"batch_{q}"][:, c], color=color, lw=0.8, alpha=0.45)
            ax.plot(steps, a[f"moving_{q}"][:, c], color=color, lw=2.2, label=f"channel {c}")
            if name in trace.final and end is not None:
                ax.plot([end], [trace.final[name][q][c]], marker="*", ms=12, color=color, mec="black", mew=0.6,
                        ls="none")
    ax_mean.set_title(f"{name}: mean (decay {trace.decay[name]:g})", fontsize=10)
    ax_var.set_title(f"{name}: variance", fontsize=10)
    if np.all(a["batch_variance"] > 0) and np.all(a["moving_variance"] > 0):
        ax_var.set_yscale("log")
    ax_mean.legend(fontsize=7, loc="best")
    for ax in (ax_mean, ax_var):
        _marks(ax, trace)


def _summary(ax, trace, name) -> None:
    gaps = lag(trace, name)
    ax.plot(trace.steps, gaps["mean"], color="tab:blue", lw=1.6, label="mean: |moving - batch| / batch std")
    ax.plot(trace.steps, gaps["variance"], color="tab:orange", lw=1.6, label="variance: |moving / batch - 1|")
    after = final_lag(trace, name)
    if after is not None and trace.end_step >= 0:
        for key, color in (("mean", "tab:blue"), ("variance", "tab:orange")):
            ax.plot([trace.end_step], [max(after[key], 1e-6)], marker="*", ms=13, color=color, mec="black", mew=0.6,
                    ls="none", label=f"{_mechanism(trace)}: {key}" if key == "mean" else None)
    positive = np.concatenate([gaps["mean"], gaps["variance"]])
    if len(positive) and np.all(positive > 0):
        ax.set_yscale("log")
    ax.set_title(f"{name}: lag, median over {trace.layers[name]['batch_mean'].shape[1]} channels", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    _marks(ax, trace)


def _marks(ax, trace, stars: bool = True) -> None:
    """The end of training (and where precise BN ran and its stars are drawn, its name) and the step axis."""
    if trace.end_step >= 0:
        label = "end of training" + (f" (then {_mechanism(trace)}: stars)" if trace.final and stars else "")
        ax.axvline(trace.end_step, color="black", ls="--", lw=0.9, label=None)
        ax.text(trace.end_step, 0.98, label + " ", transform=ax.get_xaxis_transform(), fontsize=7, ha="right",
                va="top")
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(labelsize=7)


def _mechanism(trace) -> str:
    return {"precise_bn": "precise BN", "ema": "EMA + precise BN"}.get(trace.final_mechanism, trace.final_mechanism)


def draw_heatmap(trace, path, title: str = "") -> None:
    plt = _pyplot()
    names = list(trace.layers)
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(12, 2.6 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        m = trace.layers[name]["batch_mean"]
        if not len(m):
            ax.set_title(f"{name}: no samples", fontsize=10)
            continue
        edges = np.concatenate([[trace.steps[0] - 0.5], (trace.steps[1:] + trace.steps[:-1]) / 2,
                                [trace.steps[-1] + 0.5]])
        top = float(np.percentile(np.abs(m), 99)) or 1.0
        mesh = ax.pcolormesh(edges, np.arange(m.shape[1] + 1) - 0.5, m.T, cmap="RdBu_r", vmin=-top, vmax=top,
                             shading="flat")
        fig.colorbar(mesh, ax=ax, pad=0.01, label="batch mean")
        ax.set_ylabel("channel", fontsize=8)
        ax.set_title(f"{name}: batch mean per channel and step", fontsize=10)
        _marks(ax, trace, stars=False)
    fig.suptitle(f"BN batch means while training {title}".rstrip(), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    _save(fig, path)
