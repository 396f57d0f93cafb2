"""Pictures of a run: training curves and the confusion matrix (matplotlib, files only; no display needed).
Each PNG is written atomically, so a viewer never sees half a picture."""

from __future__ import annotations

import numpy as np

from ..files import atomic_open


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    plt = _pyplot()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def curves(rows: list, path, title: str = "") -> None:
    """Train/validation loss and accuracy per epoch, and the learning rate."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    smoothed = any(r.get("train_ce") is not None and r["train_ce"] != r["train_loss"] for r in rows)
    for ax, key in zip(axes[:2], ("loss", "acc")):
        # the training cross-entropy (train_ce; older runs: train_loss) is what compares with validation's loss
        ax.plot(epochs, [r.get(f"train_ce", r["train_loss"]) if key == "loss" else r["train_acc"] for r in rows],
                "o-", label="train")
        val = [(r["epoch"], r[f"val_{key}"]) for r in rows if r.get(f"val_{key}") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        if key == "loss" and smoothed:
            ax.plot(epochs, [r["train_loss"] for r in rows], "o--", color="tab:gray",
                    label="train, with label smoothing")
        ax.set_title({"loss": "cross-entropy loss", "acc": "accuracy"}[key], fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(epochs, [r["lr"] for r in rows], "o-", color="tab:green")
    axes[2].set_title("learning rate (end of epoch)", fontsize=10)
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def confusion_matrix(confusion, class_names, path, title: str = "") -> None:
    """Counts, rows the true class and columns the predicted one, labelled with the class names."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = confusion.max() or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if confusion[i, j] > top / 2 else "black")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def compare_curves(metrics: dict, path, title: str = "") -> None:
    """Several runs' curves overlaid: validation accuracy, validation loss and training cross-entropy per epoch
    (`metrics`: {run label: metrics rows})."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = (("val_acc", "validation accuracy"), ("val_loss", "validation loss"),
              ("train_ce", "training cross-entropy"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, name) in zip(axes, panels):
        for label, rows in metrics.items():
            points = [(r["epoch"], r.get(key, r["train_loss"] if key == "train_ce" else None)) for r in rows]
            points = [p for p in points if p[1] is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def sweep_summary(rows: list, axes: list, path, title: str = "") -> None:
    """A sweep's results against each swept setting: test accuracy (top) and the accuracy gap between batch and
    moving BN statistics (bottom), mean and spread over seeds; one line per combination of the other settings."""
    plt = _pyplot()
    fig, grid = plt.subplots(2, len(axes), figsize=(5.5 * len(axes), 7), squeeze=False)
    for col, (key, values) in enumerate(axes):
        others = [k for k, _ in axes if k != key]
        lines = {}
        for r in rows:
            label = ", ".join(f"{k}={r[k]}" for k in others)
            lines.setdefault(label, []).append(r)
        for ax, metric, name in ((grid[0][col], "test_acc", "test accuracy"),
                                 (grid[1][col], "bn_gap", "accuracy gap: batch - moving BN statistics")):
            for label, members in lines.items():
                pts = sorted((values.index(r[key]), r[f"{metric}_mean"], r[f"{metric}_std"] or 0.0)
                             for r in members if r[f"{metric}_mean"] is not None)
                if pts:
                    x, y, err = zip(*pts)
                    ax.errorbar(x, y, yerr=err, fmt="o-", capsize=4, label=label or None)
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(key)
            ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
            if others:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
