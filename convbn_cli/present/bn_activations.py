"""How the activations of BN layers (analysis/activations.py) are shown: box plots per channel of what a BN layer
receives, its normalized values and what it gives; the per-feature-map vs per-activation picture; their terminal
lines; and the report's sections on BN while training and BN's activations (no TensorFlow)."""

from __future__ import annotations

import numpy as np

from .plots import _pyplot, _save

MAX_BOXES = 32  # channels drawn per panel (the first ones); the table has them all
TITLES = {"input": "input (what the layer receives)", "normalized": "normalized: (x - moving mean) / moving std",
          "output": "output: gamma * normalized + beta"}


def draw_activations(result: dict, path, title: str = "") -> None:
    plt = _pyplot()
    names = list(result["layers"])
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 2.8 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        layer = result["layers"][name]
        shown = min(layer["channels"], MAX_BOXES)
        for ax, kind in zip(row, ("input", "normalized", "output")):
            s = layer[kind]
            boxes = [{"whislo": s["p5"][c], "q1": s["p25"][c], "med": s["p50"][c], "q3": s["p75"][c],
                      "whishi": s["p95"][c], "mean": s["mean"][c], "label": str(c)} for c in range(shown)]
            ax.bxp(boxes, showfliers=False, showmeans=True, meanprops={"marker": ".", "markerfacecolor": "tab:red",
                                                                       "markeredgecolor": "tab:red"})
            ax.set_title(f"{name}: {TITLES[kind]}", fontsize=9)
            ax.tick_params(labelsize=6)
            if kind == "normalized":
                ax.axhline(0, color="grey", lw=0.6)
        row[0].set_ylabel(f"{name}\n(channels 0-{shown - 1})" if shown < layer["channels"] else name, fontsize=8)
    fig.suptitle(f"BN per channel on {result['images']} evaluation images: boxes 25-75%, whiskers 5-95%, red dot "
                 f"the mean {title}".rstrip(), fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def draw_per_activation(e: dict, path) -> None:
    """One feature map of one image: as the layer receives it, the per-activation means (what per-activation BN
    subtracts, position by position), and the map normalized per feature map and per activation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    maps = e["maps"]
    panels = (("input", f"input, channel {e['channel']} of image {e['image']}"),
              ("mean_per_activation", f"batch mean per position (per activation)\nper feature map: one number, "
                                      f"{maps['mean_per_feature_map']:.3g}"),
              ("per_feature_map", "normalized per feature map\n(statistics over N, H, W: the layout kept)"),
              ("per_activation", "normalized per activation\n(statistics over N only: the batch's average removed)"))
    for ax, (key, text) in zip(axes, panels):
        image = ax.imshow(np.asarray(maps[key]), cmap="viridis")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        ax.set_title(text, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    h, w, c, p, v = e["height"], e["width"], e["channels"], e["parameters"], e["values_per_statistic"]
    fig.suptitle(f"{e['layer']}: per feature map {p['per_feature_map']:,} parameters ({c},), statistics over N, H, W "
                 f"({v['per_feature_map']:,} values); per activation {p['per_activation']:,} parameters ({h}, {w}, "
                 f"{c}), statistics over N ({v['per_activation']} values)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def explain_lines(e: dict) -> list:
    """The comparison in a few printed lines."""
    h, w, c = e["height"], e["width"], e["channels"]
    p, v = e["parameters"], e["values_per_statistic"]
    return [f"{e['layer']}: per feature map (BN as it is): gamma and beta of shape ({c},), {p['per_feature_map']:,} "
            f"parameters; statistics over N, H, W: {v['per_feature_map']:,} values each",
            f"per activation: gamma and beta of shape ({h}, {w}, {c}), {p['per_activation']:,} parameters "
            f"({p['per_activation'] // max(p['per_feature_map'], 1):,}x); statistics over N only: "
            f"{v['per_activation']} values each, so each is noisier and depends on where in the picture it is",
            f"on this batch the positions' means differ by {e['position_spread']:.2f} channel standard deviations "
            f"(median over channels): per activation removes that layout, the batch's average picture; per feature "
            f"map keeps it and only shifts and scales the whole map"
            + (f"; {e['flat_positions']:.0%} of channel {e['channel']}'s positions are nearly constant over the "
               "batch, and per activation divides them by almost nothing" if e["flat_positions"] > 0 else "")]


def activation_table(result: dict) -> str:
    """Per layer and channel: mean and std of the input, the normalized values and the output."""
    lines = [f"checkpoint: {result['checkpoint']}; one batch of {result['images']} evaluation images, inference mode"]
    for name, layer in result["layers"].items():
        lines.append(f"\n{name} ({layer['channels']} channels, input shape {tuple(layer['shape'])})")
        lines.append(f"{'channel':>7}  {'input mean':>11} {'std':>9}  {'normalized mean':>15} {'std':>9}  "
                     f"{'output mean':>11} {'std':>9}")
        for c in range(layer["channels"]):
            cells = [f"{layer[k]['mean'][c]:>{11 if k != 'normalized' else 15}.4g} {layer[k]['std'][c]:>9.4g}"
                     for k in ("input", "normalized", "output")]
            lines.append(f"{c:>7}  " + "  ".join(cells))
    if result.get("per_activation"):
        lines += ["", *explain_lines(result["per_activation"])]
    return "\n".join(lines)


def to_json(result: dict) -> dict:
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v.tolist() if isinstance(v, np.ndarray) else v

    return plain(result)


def report_sections(r: dict, picture, esc) -> str:
    """The report page's sections (present/html.py draws the rest): BN while training, BN's activations."""
    pics, notes = r["pictures"], r.get("bn_notes") or {}
    trace = (f"{picture(pics.get('bn_trace'), 'BN statistics while training')}\n"
             f"{picture(pics.get('bn_trace_heatmap'), 'batch mean per channel and step')}"
             if pics.get("bn_trace") else f"<p class=sub>{esc(notes.get('trace') or 'no BN trace in this run')}</p>")
    lines = "".join(f"<p>{esc(line)}</p>" for line in notes.get("per_activation") or [])
    return f"""<h2>BN statistics while training</h2>
<p class=sub>Thick: the moving mean and variance; thin: each sampled step's batch statistics; right: the lag of all
channels. A run whose moving statistics caught up ends low; a short run with a high decay stays high.</p>
{trace}
<h2>BN activations</h2>
{picture(pics.get('bn_activations'), 'BN input, normalized values and output per channel')}
<h2>Per feature map vs per activation</h2>
{lines}
{picture(pics.get('bn_per_activation'), 'per feature map vs per activation')}
"""
