"""PNG outputs people would rather see than read: image grids, loss curves and line plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def image_grid(images: torch.Tensor, path: str | Path, ncol: int = 8, labels: list[str] | None = None,
               title: str | None = None) -> Path:
    """Save ``images`` (B, 3, H, W) in [-1, 1] as a grid PNG, with an optional label per image."""
    images = ((images.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    n = len(images)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.9 * ncol, 1.9 * nrow + (0.3 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            if labels:
                ax.set_title(labels[i], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def loss_curves(history: dict[str, list[float]], path: str | Path, smooth: int = 10) -> Path:
    """One panel per loss term (raw and a moving average), log-scaled where all values are > 0."""
    keys = list(history)
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.8 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        vals = torch.tensor(history[key], dtype=torch.float64)
        ax.plot(vals.numpy(), alpha=0.3, lw=0.8)
        if len(vals) >= smooth:
            ma = vals.unfold(0, smooth, 1).mean(-1)
            ax.plot(range(smooth - 1, len(vals)), ma.numpy(), lw=1.5)
        if (vals > 0).all():
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, path)


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, xlabel: str = "",
              ylabel: str = "", title: str | None = None) -> Path:
    """Save one line (with markers) per named series of (x, y) points as a PNG."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", lw=1.5, label=name)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
