"""The picture of a weighting run: weight distributions of clean vs noisy images (when the truth is
known) and, for a few classes, the highest- and lowest-weighted images with their titles."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megaclass.data.paths import resolve_inside
from megaclass.io import atomic_output
from megaclass.weighting.metrics import roc_auc


def pick_classes(labels: np.ndarray, weights: np.ndarray, count: int) -> list[int]:
    """The `count` classes whose weights spread most (largest max − min), largest first."""
    spread = []
    for c in np.unique(labels):
        w = weights[labels == c]
        if len(w) >= 2:
            spread.append((float(w.max() - w.min()), int(c)))
    return [c for _, c in sorted(spread, reverse=True)[:count]]


def plot_weights(out_png: str | Path, root: str | Path, records: Sequence, weights: np.ndarray,
                 class_names: Sequence[str], stage: int, clean: np.ndarray | None = None,
                 known: np.ndarray | None = None, classes: int = 4, per_side: int = 3) -> None:
    """Write the PNG atomically. records: the training records (`.path`, `.label`, `.title`) in the
    order of `weights` [N], e.g. `TrainColumns` (its `labels` array is then used, no record built per image); clean: bool [N] or None when the truth is unknown; known: bool [N], the
    images whose `clean` flag is known (default all), the others are left out of histograms and AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    labels = np.asarray(records.labels) if hasattr(records, "labels") else np.array([r.label for r in records])
    shown = pick_classes(labels, weights, classes)
    fig = plt.figure(figsize=(4 + 2.1 * 2 * per_side, max(4.5, 2.4 * len(shown))))
    grid = fig.add_gridspec(max(1, len(shown)), 1 + 2 * per_side, width_ratios=[3.5] + [1] * (2 * per_side))

    ax = fig.add_subplot(grid[:, 0])
    bins = np.linspace(0, max(1.0, float(weights.max())), 41)
    if clean is not None and known is None:
        known = np.ones(len(weights), dtype=bool)
    if clean is not None and (clean & known).any() and (~clean & known).any():
        for flag, colour, name in ((clean & known, "tab:green", "clean"), (~clean & known, "tab:red", "noisy")):
            ax.hist(weights[flag], bins=bins, alpha=0.6, color=colour, label=f"{name} ({flag.sum()})")
        ax.set_title(f"stage {stage} weights: AUC clean vs noisy {roc_auc(weights[known], clean[known]):.3f}")
        ax.legend()
    else:
        ax.hist(weights, bins=bins, color="tab:blue", label=f"all ({len(weights)})")
        ax.set_title(f"stage {stage} weights (clean/noisy unknown)")
    ax.set(xlabel="weight", ylabel="images")

    for row, c in enumerate(shown):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-weights[members], kind="stable")]
        picks = list(order[:per_side]) + list(order[::-1][:per_side][::-1])
        for col, i in enumerate(picks):
            axi = fig.add_subplot(grid[row, 1 + col])
            path = resolve_inside(root, records[i].path)  # never a file outside the data root
            try:
                if path is None:
                    raise OSError("outside the data root")
                with Image.open(path) as img:
                    axi.imshow(np.asarray(img.convert("RGB")))
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
                axi.text(0.5, 0.5, "unreadable", ha="center", va="center")
            colour = "black" if clean is None or not known[i] else ("tab:green" if clean[i] else "tab:red")
            for spine in axi.spines.values():
                spine.set(edgecolor=colour, linewidth=3)
            axi.set_xticks([]), axi.set_yticks([])
            title = textwrap.shorten(records[i].title or "(no title)", 40, placeholder="…")
            axi.set_title(f"w={weights[i]:.2f}\n" + "\n".join(textwrap.wrap(title, 20)[:2]), fontsize=7)
            if col == 0:
                axi.set_ylabel(textwrap.shorten(class_names[c], 22, placeholder="…"), fontsize=8)
    if shown:
        fig.text(0.64, 0.995, "highest weights  |  lowest weights" +
                 ("   (frame: green clean, red noisy)" if clean is not None else ""), ha="center", va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        with atomic_output(out_png) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
