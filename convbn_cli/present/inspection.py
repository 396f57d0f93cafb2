"""How an inspect-bn result (analysis/inspection.py) is shown: summaries, JSON, CSV, the terminal table and the
per-channel bar charts (no TensorFlow)."""

from __future__ import annotations

import numpy as np

QUANTITIES = ("gamma", "beta", "moving_mean", "moving_variance", "scale", "shift")


def fixed(layer: dict, quantity: str) -> bool:
    """Whether `quantity` is not learned in this layer: gamma with `scale: false` (fixed at 1), beta with
    `center: false` (fixed at 0). Tables, CSV, ranking and plots show such a value as fixed, not as a number."""
    return (quantity == "gamma" and not layer["scale_learned"]) or (quantity == "beta" and not layer["center"])


def summary(layer: dict, dead_threshold: float) -> dict:
    """|gamma| statistics and the dead-channel count; None where gamma is fixed (nothing learned to judge)."""
    if fixed(layer, "gamma"):
        return {"channels": layer["channels"], "gamma_fixed": True, "mean_abs_gamma": None, "min_abs_gamma": None,
                "max_abs_gamma": None, "dead": None}
    g = np.abs(layer["gamma"])
    return {"channels": layer["channels"], "gamma_fixed": False, "mean_abs_gamma": float(g.mean()),
            "min_abs_gamma": float(g.min()), "max_abs_gamma": float(g.max()), "dead": int((g < dead_threshold).sum())}


def to_json(result: dict, dead_threshold: float = 1e-2) -> dict:
    """JSON-ready copy: arrays become lists, and each layer gets its summary."""
    layers = {}
    for name, layer in result["layers"].items():
        layers[name] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in layer.items()}
        layers[name]["summary"] = summary(layer, dead_threshold)
    return {"checkpoint": result["checkpoint"], "layers": layers}


def csv_rows(result: dict):
    """Rows of per-channel values; a fixed gamma or beta is an empty cell (not a learned 1 or 0)."""
    yield ["layer", "channel", *QUANTITIES]
    for name, layer in result["layers"].items():
        for c in range(layer["channels"]):
            yield [name, c, *("" if fixed(layer, q) else repr(float(layer[q][c])) for q in QUANTITIES)]


def diff_csv_rows(diff: dict, result: dict | None = None):
    yield ["layer", "channel", *("d_" + q for q in QUANTITIES)]
    for name, d in diff.items():
        layer = result["layers"][name] if result else None
        for c in range(len(d["gamma"])):
            yield [name, c, *("" if layer and fixed(layer, q) else repr(float(d[q][c])) for q in QUANTITIES)]


def table(result: dict, dead_threshold: float = 1e-2, order=None, diff=None) -> str:
    """An aligned terminal table, one section per layer with a summary line."""
    lines = [f"checkpoint: {result['checkpoint']}"]
    for name, layer in result["layers"].items():
        s = summary(layer, dead_threshold)
        gamma_line = ("  gamma fixed at 1 (scale: false): no dead-channel check, no ranking" if s["gamma_fixed"] else
                      f"  |gamma| mean {s['mean_abs_gamma']:.4g}, min {s['min_abs_gamma']:.4g}, max "
                      f"{s['max_abs_gamma']:.4g}; {s['dead']} channel(s) with |gamma| < {dead_threshold:g}")
        lines += ["", f"{name}  ({layer['impl']}, {s['channels']} channels, epsilon {layer['epsilon']:g}, "
                      f"decay {layer['decay']:g})", gamma_line]
        if fixed(layer, "beta"):
            lines.append("  beta fixed at 0 (center: false)")
        if diff is not None and name not in diff:
            lines.append("  no counterpart in the other checkpoint (no BN layer of that name and size): not compared")
            continue
        source = diff[name] if diff is not None else layer
        header = ["channel", *(("d_" + q) if diff is not None else q for q in QUANTITIES)]
        rows = [header]
        channels = order[name] if order and name in order else range(layer["channels"])
        for c in channels:
            rows.append([str(c), *("fixed" if fixed(layer, q) else f"{source[q][c]:+.5f}" if diff is not None
                                   else f"{source[q][c]:.5f}" for q in QUANTITIES)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot(result: dict, path, dead_threshold: float = 1e-2) -> None:
    """Bar charts per layer (one row each): gamma, beta and moving variance for every channel."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = result["layers"]
    fig, axes = plt.subplots(len(layers), 3, figsize=(15, 2.8 * len(layers) + 0.6), squeeze=False)
    for row, (name, layer) in zip(axes, layers.items()):
        x = np.arange(layer["channels"])
        for ax, q, color in zip(row, ("gamma", "beta", "moving_variance"), ("tab:blue", "tab:orange", "tab:green")):
            ax.set_title(f"{name}: {q.replace('_', ' ')}", fontsize=10)
            ax.set_xlabel("channel")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # channels are whole numbers
            if fixed(layer, q):  # not learned: say so instead of drawing a row of identical bars
                value, key = (1, "scale") if q == "gamma" else (0, "center")
                ax.text(0.5, 0.5, f"{q} fixed at {value}\n({key}: false)", ha="center", va="center",
                        transform=ax.transAxes, fontsize=11, color="dimgray")
                continue
            ax.bar(x, layer[q], color=color, width=0.85)
            ax.axhline(0, color="black", linewidth=0.5)
            if q == "gamma":
                for t in (dead_threshold, -dead_threshold):
                    ax.axhline(t, color="red", linewidth=0.6, linestyle="--")
    fig.suptitle(f"per-channel BN parameters - {result['checkpoint']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
