"""ROC plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .roc import FARS


def plot_roc(curves, path, title: str = "ROC on IJB") -> Path:
    """One PNG with a curve per method; ``curves``: (label, fpr, tpr, auc) tuples. Log FAR axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .roc import thin_roc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    lowest = 1.0
    for label, fpr, tpr, area in curves:
        f, t = (np.asarray(v) for v in thin_roc(fpr, tpr, points=2000))
        keep = f > 0
        if keep.any():
            lowest = min(lowest, float(f[keep].min()))
        ax.plot(f[keep], t[keep], lw=1, label=f"{label} (AUC = {100 * area:.4f} %)")
    ax.set_xscale("log")
    ax.set_xlim(min(FARS[0], lowest), 1.0)
    ax.set_xticks(list(FARS) + [1.0])
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
