"""Pictures of a run: training curves, the confusion matrix and a training batch (matplotlib, files only; no
display needed). Each PNG is written atomically, so a viewer never sees half a picture."""

from __future__ import annotations

import textwrap

import numpy as np

from ..files import atomic_open
from ..runs.rundir import best_row  # the epoch the final model comes from, as every summary marks it


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """To a file (atomically) or to an open binary stream (the HTML report embeds the bytes)."""
    plt = _pyplot()
    if hasattr(path, "write"):
        fig.savefig(path, format="png", dpi=90)
    else:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


HIGH_ACCURACY = 0.99  # from here on, accuracy curves are drawn as error rates on a log scale


def curves(rows: list, path, title: str = "", steps: list | None = None) -> None:
    """Loss, accuracy and learning rate against epochs: the training ones every few steps where `steps`
    (steps.jsonl) has them, so a short run or a warm-up shows as a line, not a dot; validation per epoch; the best
    epoch marked. Accuracy is in percent; once it passes 99% it is drawn as the error rate on a log scale, where
    99.2% and 99.5% are told apart."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    steps = [s for s in (steps or []) if s.get("loss") is not None]
    epochs = [r["epoch"] for r in rows]
    accs = [r.get(k) for r in rows for k in ("train_acc", "val_acc") if r.get(k) is not None]
    as_error = bool(accs) and max(accs) >= HIGH_ACCURACY
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key in zip(axes[:2], ("loss", "acc")):
        _train_and_validation(ax, key, rows, steps, as_error)
    if steps:
        axes[2].plot([s["epoch"] for s in steps], [s["lr"] for s in steps], "-", color="tab:green")
        axes[2].set_title("learning rate", fontsize=10)
    else:
        axes[2].plot(epochs, [r["lr"] for r in rows], "o-", color="tab:green")
        axes[2].set_title("learning rate (end of each epoch)", fontsize=10)
    last = max(epochs, default=1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_xlim(0 if steps else 0.5, last + (0.05 if steps else 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _train_and_validation(ax, key, rows, steps, as_error) -> None:
    """One panel of `curves`: the training curve (per step or per epoch), validation per epoch, the best epoch."""
    from matplotlib.ticker import FuncFormatter

    def y(a):  # an accuracy as drawn
        return max(100.0 * (1.0 - a), 1e-3) if as_error else 100.0 * a

    if steps:
        every = _every(steps)
        ax.plot([s["epoch"] for s in steps], [s.get("train_ce", s["loss"]) if key == "loss" else y(s["train_acc"])
                                              for s in steps], "-", color="tab:blue", alpha=0.8, linewidth=1,
                label="train (every step)" if every == 1 else f"train (every {every} steps)")
    else:
        ax.plot([r["epoch"] for r in rows], [r.get("train_ce", r["train_loss"]) if key == "loss" else y(r["train_acc"])
                                             for r in rows], "o-", color="tab:blue", label="train")
    val = [(r["epoch"], r["val_loss"] if key == "loss" else y(r["val_acc"])) for r in rows
           if r.get(f"val_{key}") is not None]
    settled = any(r.get("val_bn") == "precise_bn" for r in rows)
    if val:  # as the final model would measure it (settled BN statistics where the moving ones lag)
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation (settled BN statistics)" if settled
                else "validation")
    if settled:  # what the moving statistics gave: dashed, beside it
        moving = [(r["epoch"], r.get(f"val_{key}_moving", r[f"val_{key}"]) if key == "loss"
                   else y(r.get("val_acc_moving", r["val_acc"]))) for r in rows if r.get(f"val_{key}") is not None]
        ax.plot(*zip(*moving), "s--", color="tab:orange", alpha=0.55, markersize=4, linewidth=1,
                label="validation, moving BN statistics")
    if key == "loss" and any(r.get("train_ce") is not None and r["train_ce"] != r["train_loss"] for r in rows):
        ax.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], "o--", color="tab:gray",
                label="train, with label smoothing")
    best, best_key = best_row(rows)
    if best is not None:
        ax.axvline(best["epoch"], color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"best epoch {best['epoch']}" + (" (validation)" if best_key == "val_acc" else ""))
    if key == "acc":
        if as_error:
            ax.set_yscale("log")  # (before the formatter: setting the scale resets it)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_title("error rate (100% - accuracy), log scale" if as_error else "accuracy", fontsize=10)
    else:
        ax.set_title("cross-entropy loss", fontsize=10)
    ax.legend(fontsize=8)


def _every(steps):
    gaps = [b["step"] - a["step"] for a, b in zip(steps, steps[1:]) if b["step"] > a["step"]]
    return min(gaps) if gaps else steps[0]["step"]


def confusion_matrix(confusion, class_names, path, title: str = "") -> None:
    """Where the model is wrong: each row (true class) as percentages of that class, so that classes of every
    size compare; the mistakes coloured on their own scale (with a colour bar), the diagonal (the correct ones)
    in a separate neutral colour so it does not wash the errors out; every non-zero count written in its cell."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    n = len(class_names)
    totals = confusion.sum(axis=1, keepdims=True)
    pct = 100.0 * confusion / np.maximum(totals, 1)
    off = np.ma.masked_where(np.eye(n, dtype=bool), pct)
    fig, ax = plt.subplots(figsize=(2.2 + 0.75 * n, 1.2 + 0.62 * n))
    top = max(float(off.max()) if off.count() else 0.0, 1e-9)
    image = ax.imshow(off, cmap="Reds", vmin=0, vmax=top)
    diag = np.ma.masked_where(~np.eye(n, dtype=bool), pct)
    ax.imshow(diag, cmap="Greens", vmin=-100, vmax=200)  # the correct ones: a light, even green
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("% of the true class predicted as this (mistakes)")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                strong = i != j and pct[i, j] > top / 2
                text = f"{pct[i, j]:.1f}%" if i == j else f"{confusion[i, j]}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if i == j else 8,
                        color="white" if strong else "black")
    errors = int(confusion.sum() - np.trace(confusion))
    ax.set_title(f"{title}\n{errors} mistakes of {int(confusion.sum())}; numbers: counts (diagonal: % right)"
                 if title else f"{errors} mistakes of {int(confusion.sum())}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _augmentation(aug) -> str:
    """data.augment in words: "shift 0.08, rotation 8, elastic (alpha 34, sigma 4)"; "" for none."""
    def value(v):
        if isinstance(v, dict):  # elastic: "(alpha 34, sigma 4)"
            return f"({', '.join(f'{k} {value(x)}' for k, x in v.items())})"
        return f"{v:g}" if isinstance(v, float) else str(v).lower()

    if aug is None:
        return ""
    unset = type(aug)().model_dump()
    return ", ".join(f"{k} {value(v)}" for k, v in aug.model_dump().items() if v != unset[k])


def training_batch(pixels, labels, class_names, path, augment=None, where: str = "", columns: int = 8) -> None:
    """Images as training gives them to the model (pipeline.first_batch: pixels 0-255, (N, H, W, C)), each with its
    class, titled with the run (`where`) and its data.augment (`augment`): what a shift, a rotation or an elastic
    distortion does is seen at a glance, not read off numbers. One mosaic in one axes (a grid of axes takes
    several times as long to draw, at the start of every run)."""
    what = _augmentation(augment)
    title = (f"{where}: " if where else "") + "the first training batch" + (
        f", augmented ({what})" if what else " (no augmentation)")
    plt = _pyplot()
    pixels = np.clip(np.asarray(pixels, np.float32), 0, 255).astype(np.uint8)
    n, h, w, c = pixels.shape
    rows, gap, caption = -(-n // columns), max(2, w // 14), max(8, h // 3)  # caption: a strip above each image
    mosaic = np.full((rows * (h + caption + gap), columns * (w + gap), c), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(1.3 * columns, 1.45 * rows + 0.5))
    for k, (image, label) in enumerate(zip(pixels, labels)):
        top, left = (k // columns) * (h + caption + gap) + caption, (k % columns) * (w + gap)
        mosaic[top:top + h, left:left + w] = image
        name = str(class_names[int(label)])
        ax.text(left + w / 2, top - 1, name if len(name) <= 14 else name[:13] + "\u2026", ha="center", va="bottom",
                fontsize=8)
    ax.imshow(mosaic[..., 0] if c == 1 else mosaic, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def compare_curves(metrics: dict, path, title: str = "") -> None:
    """Several runs' curves overlaid: validation accuracy, validation loss and training cross-entropy per epoch
    (`metrics`: {run label: metrics rows})."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    panels = (("val_acc", "validation accuracy (%; settled BN statistics where the moving ones lagged)"),
              ("val_loss", "validation loss"), ("train_ce", "training cross-entropy"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, name) in zip(axes, panels):
        scale = 100.0 if key == "val_acc" else 1.0  # accuracies in %, as every other picture and table has them
        for label, rows in metrics.items():
            points = [(r["epoch"], r.get(key, r["train_loss"] if key == "train_ce" else None)) for r in rows]
            points = [(e, scale * v) for e, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label, markersize=3)
        if key == "val_acc":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


SWEEP_PANELS = (("test_acc", "test accuracy (%)"),
                ("val_acc", "validation accuracy of the final model (%)"),
                ("bn_gap", "accuracy gap: batch - moving BN statistics (points)"))
MARKERS = "osD^v<>p*h"


def sweep_summary(rows: list, axes: list, path, title: str = "", notes=()) -> None:
    """A sweep's results against each swept setting: test accuracy, the final model's validation accuracy (the best
    epochs' with the moving statistics dashed where it differs) and the accuracy gap between batch and moving BN
    statistics, mean and spread over seeds; one line per combination of the other settings, each shifted a little
    sideways with its own marker, so that lines with equal values do not hide each other. `notes` go under the
    title."""
    plt = _pyplot()
    fig, grid = plt.subplots(len(SWEEP_PANELS), len(axes), figsize=(5.5 * len(axes), 10.5), squeeze=False)
    for col, (key, values) in enumerate(axes):
        others = [k for k, _ in axes if k != key]
        lines = {}
        for r in rows:
            lines.setdefault(", ".join(f"{k}={r[k]}" for k in others), []).append(r)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for row, (metric, name) in enumerate(SWEEP_PANELS):
            ax = grid[row][col]
            for i, (label, members) in enumerate(lines.items()):
                shift = (i - (len(lines) - 1) / 2) * min(0.08, 0.4 / max(len(lines), 1))
                _sweep_line(ax, members, key, values, metric, shift, MARKERS[i % len(MARKERS)],
                            colours[i % len(colours)], label)
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(key)
            ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
            if others or metric == "val_acc" and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    said = [line for n in notes for line in textwrap.wrap(f"note: {n}", int(13 * 5.5 * len(axes)))]
    fig.suptitle("\n".join([title, *said]), fontsize=11 if not said else 9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.015 * len(said)))  # room for the notes under the title
    _save(fig, path)


def _sweep_line(ax, members, key, values, metric, shift, marker, color, label) -> None:
    """One combination's line in a panel of sweep_summary (the validation panel: the moving figure dashed too)."""
    def points(name):
        return sorted((values.index(r[key]) + shift, 100 * r[f"{name}_mean"], 100 * (r[f"{name}_std"] or 0.0))
                      for r in members if r.get(f"{name}_mean") is not None)

    pts = points(metric)
    if pts:
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, fmt=f"{marker}-", color=color, capsize=4, label=label or None)
    moving = points("val_acc_moving") if metric == "val_acc" else []
    if moving and any(abs(m[1] - p[1]) >= 5e-3 for m, p in zip(moving, pts)):
        x, y, _ = zip(*moving)
        ax.plot(x, y, f"{marker}--", color=color, alpha=0.5, markersize=4,
                label=(f"{label}: " if label else "") + "best epoch, moving BN statistics")
