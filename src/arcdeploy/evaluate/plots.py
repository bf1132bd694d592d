"""ROC, TPIR-vs-FPIR and CMC plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_file
from .roc import FARS, thin_roc


def plot_roc(curves: Sequence[tuple], path: str | os.PathLike, title: str = "ROC", force: bool = True) -> Path:
    """One PNG with a curve per method, log FAR axis; written atomically.

    ``curves``: ``(label, fpr, tpr)`` or ``(label, fpr, tpr, auc)`` tuples (fpr
    ascending, as :func:`arcdeploy.evaluate.roc.roc` gives them); with an AUC the
    legend shows it. Points at FPR 0 have no place on a log axis and are left out.
    ``force``: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    try:
        lowest = 1.0
        for curve in curves:
            label, fpr, tpr = curve[:3]
            area = curve[3] if len(curve) > 3 else None
            f, t = (np.asarray(v) for v in thin_roc(fpr, tpr, points=2000))
            keep = f > 0
            if keep.any():
                lowest = min(lowest, float(f[keep].min()))
            ax.plot(f[keep], t[keep], lw=1, label=label if area is None else f"{label} (AUC = {100 * area:.4f} %)")
        ax.set_xscale("log")
        ax.set_xlim(min(FARS[0], lowest), 1.0)
        ax.set_xticks(list(FARS) + [1.0])
        ax.grid(linestyle="--", linewidth=1)
        ax.set_xlabel("False Positive Rate")
        ax.set_ylabel("True Positive Rate")
        ax.set_title(title)
        if curves:
            ax.legend(loc="lower right", fontsize=8)
        with atomic_file(path, "wb", force=force) as out:
            fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, force: bool) -> None:
    with atomic_file(path, "wb", force=force) as out:
        fig.savefig(out, format="png", dpi=110, bbox_inches="tight")


def plot_tpir_fpir(
    curves: Sequence[tuple], path: str | os.PathLike, title: str = "1:N identification", force: bool = True
) -> Path:
    """One PNG of TPIR against FPIR (log axis 1e-4 ... 1), a curve per ``(label, fpir, tpir)``; undefined
    points (NaN: a gallery without mated probes) are left out. Written atomically."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    try:
        for label, fpir, tpir in curves:
            f, t = np.asarray(fpir, np.float64), np.asarray(tpir, np.float64)
            keep = np.isfinite(t)
            if keep.any():
                ax.plot(f[keep], t[keep], lw=1, label=label)
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1.0)
        ax.set_xticks([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
        ax.set_ylim(0.0, 1.02)
        ax.grid(linestyle="--", linewidth=1)
        ax.set_xlabel("False Positive Identification Rate (FPIR)")
        ax.set_ylabel("True Positive Identification Rate (TPIR)")
        ax.set_title(title)
        if curves:
            ax.legend(loc="lower right", fontsize=7)
        _save(fig, path, force)
    finally:
        plt.close(fig)
    return path


def plot_cmc(curves: Sequence[tuple], path: str | os.PathLike, title: str = "CMC", force: bool = True) -> Path:
    """One PNG of the cumulative match characteristic, a curve per ``(label, ranks, rates)``. Written
    atomically."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    try:
        for label, ranks, rates in curves:
            ax.plot(np.asarray(ranks), np.asarray(rates), lw=1, marker="." if len(ranks) <= 20 else None, label=label)
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.grid(linestyle="--", linewidth=1)
        ax.set_xlabel("Rank")
        ax.set_ylabel("Identification rate (mates within the rank / all probes)")
        ax.set_title(title)
        if curves:
            ax.legend(loc="lower right", fontsize=8)
        _save(fig, path, force)
    finally:
        plt.close(fig)
    return path
