"""How an inspect-bn result (analysis/inspection.py) is shown: summaries, JSON, CSV, the terminal table and the
per-channel bar charts (no TensorFlow)."""

from __future__ import annotations

import numpy as np

from .thresholds import DEAD_GAMMA

QUANTITIES = ("gamma", "beta", "moving_mean", "moving_variance", "scale", "shift")
DEAD_LINES = "red lines"  # the plots' caption names the dead-channel bounds drawn on the gamma charts so


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


def to_json(result: dict, dead_threshold: float = DEAD_GAMMA) -> dict:
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


def table(result: dict, dead_threshold: float = DEAD_GAMMA, order=None, diff=None) -> str:
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


def layer_summaries(result: dict, dead_threshold: float = DEAD_GAMMA) -> str:
    """One line per BN layer, the screen a user reads first: size, |gamma| spread, dead channels, the ranges of
    beta and of the moving variance (per-channel tables: --all or --layer)."""
    rows = [("layer", "impl", "channels", "|gamma| mean", "min", "max", f"dead (<{dead_threshold:g})", "beta range",
             "moving var range", "decay", "epsilon")]
    for name, layer in result["layers"].items():
        s = summary(layer, dead_threshold)
        g = (["fixed at 1", "-", "-", "-"] if s["gamma_fixed"] else
             [f"{s['mean_abs_gamma']:.3g}", f"{s['min_abs_gamma']:.3g}", f"{s['max_abs_gamma']:.3g}", str(s["dead"])])
        beta = "fixed at 0" if fixed(layer, "beta") else f"{np.min(layer['beta']):+.3g} .. {np.max(layer['beta']):+.3g}"
        var = layer["moving_variance"]
        rows.append((name, layer["impl"], str(layer["channels"]), *g, beta, f"{np.min(var):.3g} .. {np.max(var):.3g}",
                     f"{layer['decay']:g}", f"{layer['epsilon']:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if 2 <= i <= 6 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:]])


def global_rank(result: dict) -> list:
    """Every channel of every BN layer whose gamma is learned, by |gamma| from the largest down: Network
    Slimming's importance across the whole network (one threshold for all layers prunes the tail of this list)."""
    ranked = [(float(abs(g)), name, c) for name, layer in result["layers"].items() if not fixed(layer, "gamma")
              for c, g in enumerate(layer["gamma"])]
    ranked.sort(key=lambda t: -t[0])
    return [{"layer": name, "channel": c, "abs_gamma": g} for g, name, c in ranked]


def global_rank_text(ranking: list, thresholds, shown: int = 12) -> str:
    """The network-wide view: what fraction of all channels lies below each threshold (and where), and the
    `shown` least important channels."""
    if not ranking:
        return "global ranking: no BN layer learns gamma (scale: false everywhere); nothing to rank"
    n = len(ranking)
    lines = [f"global ranking of {n} channels by |gamma| (Network Slimming: prune the tail with one threshold)"]
    for t in thresholds:
        below = [r for r in ranking if r["abs_gamma"] < t]
        where = {}
        for r in below:
            where[r["layer"]] = where.get(r["layer"], 0) + 1
        lines.append(f"  |gamma| < {t:g}: {len(below)} of {n} ({len(below) / n:.1%})"
                     + (": " + ", ".join(f"{k} {v}" for k, v in where.items()) if where else ""))
    lines.append(f"  the {min(shown, n)} least important: " + ", ".join(
        f"{r['layer']}[{r['channel']}] {r['abs_gamma']:.3g}" for r in reversed(ranking[-shown:])))
    return "\n".join(lines)


def diff_summaries(diff: dict, result: dict) -> str:
    """Per layer, how far the other checkpoint's parameters are from this one's: the mean and the largest
    absolute difference of gamma, beta and the moving statistics."""
    rows, unmatched = [("layer", "mean |d gamma|", "max", "mean |d beta|", "max", "mean |d moving mean|",
                        "mean |d moving var|")], []
    for name in result["layers"]:
        if name not in diff:
            unmatched.append(f"{name}  not compared: no BN layer of this name and size in the other")
            continue
        d = {q: np.abs(np.asarray(v)) for q, v in diff[name].items()}
        rows.append((name, f"{d['gamma'].mean():.3g}", f"{d['gamma'].max():.3g}", f"{d['beta'].mean():.3g}",
                     f"{d['beta'].max():.3g}", f"{d['moving_mean'].mean():.3g}", f"{d['moving_variance'].mean():.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:], *unmatched])


def plot(result: dict, path, dead_threshold: float = DEAD_GAMMA, other: dict | None = None) -> None:
    """Bar charts per layer (one row each): gamma, beta and moving variance for every channel; with `other` (a
    second inspect-bn result) its bars beside these, for the layers both have."""
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
            theirs = (other or {}).get("layers", {}).get(name)
            compared = theirs is not None and theirs["channels"] == layer["channels"] and not fixed(theirs, q)
            if compared:
                ax.bar(x - 0.21, layer[q], color=color, width=0.42, label="this")
                ax.bar(x + 0.21, theirs[q], color="tab:gray", width=0.42, label="other")
            else:
                ax.bar(x, layer[q], color=color, width=0.85)
            ax.axhline(0, color="black", linewidth=0.5)
            if q == "gamma":  # the dead-channel bounds the summaries count by: the caption says so
                for t in (dead_threshold, -dead_threshold):
                    ax.axhline(t, color="red", linewidth=0.6, linestyle="--")
            if compared:
                ax.legend(fontsize=7)
    title = f"per-channel BN parameters - {result['checkpoint']}"
    fig.suptitle(title + (f"\n(grey: {other['checkpoint']})" if other else ""), fontsize=11)
    bottom = 0.0
    if any(not fixed(layer, "gamma") for layer in layers.values()):
        height = fig.get_figheight()
        fig.text(0.01, 0.12 / height, f"{DEAD_LINES} (dashed, gamma): +-{dead_threshold:g}, the dead-channel bound: a "
                 f"channel with |gamma| below {dead_threshold:g} is counted dead (--dead-threshold)", fontsize=9,
                 color="red")
        bottom = 0.4 / height
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
