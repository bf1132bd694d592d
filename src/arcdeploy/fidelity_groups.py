"""The fidelity check by group: is the package faithful on every kind of face, not only on average?

Each check face is labelled on three axes:

- ``colour``: ``colour`` or ``grayscale`` (a crop whose three channels agree, as in grayscale
  scans and re-crops, is grayscale);
- ``face size``: how many source pixels the aligned 112x112 crop spans (about the face's width
  in the image): ``small (<112 px)`` (the crop was upscaled from a small face), ``medium
  (112-223 px)``, ``large (>=224 px)``; ``unknown`` for crops given as arrays;
- ``folder``: the user's own groups, when the check images lie in subfolders of the folder
  (or list) given: the first subfolder of each image's path.

Every group is held to the precision's floor: the ``min`` on any group, the ``mean`` on groups of
at least :data:`MIN_FACES_FOR_MEAN` faces (the mean of two faces is not a group's mean). The worst
group (the one with the smallest margin to the floor, or the largest shortfall) is the verdict;
the lowest faces are named with their groups. Why: the previous int8 recipe
passed a held-out mean of 0.995 while the colour photos fell to 0.93.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import FidelityGroupsRecord, GroupFidelityRecord

AXES = ("colour", "face size", "folder")
MIN_FACES_FOR_MEAN = 8
LOWEST = 8  # faces named
GRAY_TOLERANCE = 2.0  # mean |R-G| + |G-B| (0..255) under which a crop counts as grayscale
SIZE_BUCKETS = ((112.0, "small (<112 px)"), (224.0, "medium (112-223 px)"), (float("inf"), "large (>=224 px)"))
NO_FOLDER = "(top folder)"


def grayscale_mask(faces: np.ndarray, tol: float = GRAY_TOLERANCE) -> np.ndarray:
    """Per crop [N, H, W, 3] uint8: True when its channels agree (a grayscale image, JPEG noise allowed)."""
    f = np.asarray(faces)
    if f.ndim == 3:
        f = f[None]
    if len(f) == 0:
        return np.zeros(0, bool)
    f = f.astype(np.int16)
    diff = np.abs(f[..., 0] - f[..., 1]).mean(axis=(1, 2)) + np.abs(f[..., 1] - f[..., 2]).mean(axis=(1, 2))
    return diff < tol


def size_label(span: float | None) -> str:
    if span is None or not np.isfinite(span):
        return "unknown"
    return next(label for top, label in SIZE_BUCKETS if span < top)


def folder_label(name: str, root: Path | None) -> str | None:
    """The first subfolder of ``name`` below ``root``; NO_FOLDER for a file directly in it; None outside it."""
    if root is None:
        return None
    try:
        rel = Path(name).relative_to(root)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 else NO_FOLDER


@dataclass
class FaceLabels:
    """Per check face, its group on each axis (axes with a single group are still listed)."""

    axes: dict[str, list[str]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def of(self, i: int) -> dict[str, str]:
        return {axis: labels[i] for axis, labels in self.axes.items()}


def labels_for(
    faces: np.ndarray,
    names: Sequence[str] | None = None,
    spans: Sequence[float | None] | None = None,
    root: Path | str | None = None,
) -> FaceLabels:
    """Labels of check faces: colour from the crops, size from ``spans`` (see
    :func:`arcdeploy.faces.align.crop_span`), folder from ``names`` below ``root``."""
    n = len(faces)
    gray = grayscale_mask(faces)
    axes: dict[str, list[str]] = {"colour": ["grayscale" if g else "colour" for g in gray]}
    spans = list(spans) if spans is not None and len(spans) == n else [None] * n
    axes["face size"] = [size_label(s) for s in spans]
    names = [str(x) for x in names] if names is not None and len(names) == n else []
    if names and root is not None:
        folders = [folder_label(x, Path(root)) for x in names]
        if all(f is not None for f in folders) and any(f != NO_FOLDER for f in folders):
            axes["folder"] = [str(f) for f in folders]
    return FaceLabels(axes, names)


def labels_of_image_set(image_set) -> FaceLabels:
    """Labels for an :class:`arcdeploy.faces.calibration.ImageSet`."""
    return labels_for(image_set.faces, image_set.names, image_set.spans, image_set.root)


def _margin(stats: dict[str, float], floor: dict[str, float], judged: Sequence[str]) -> float:
    return min((stats[k] - floor[k] for k in judged), default=float("inf"))


def by_group(
    cos: np.ndarray, labels: FaceLabels, floor: dict[str, float], min_faces_for_mean: int = MIN_FACES_FOR_MEAN
) -> FidelityGroupsRecord:
    """Hold every group to ``floor``; the worst group is the verdict."""
    cos = np.asarray(cos, dtype=np.float64)
    groups: list[GroupFidelityRecord] = []
    margins: dict[str, float] = {}
    for axis in AXES:
        if axis not in labels.axes:
            continue
        values = np.array(labels.axes[axis])
        for group in sorted(set(values.tolist())):
            c = cos[values == group]
            stats = {"mean": float(c.mean()), "min": float(c.min()), "p1": float(np.percentile(c, 1))}
            judged = tuple(k for k in floor if k in stats and (k != "mean" or len(c) >= min_faces_for_mean))
            below = tuple(f"{k} {stats[k]:.6f} < {floor[k]}" for k in judged if not stats[k] >= floor[k])
            g = GroupFidelityRecord(axis, group, int(len(c)), judged=judged, below_floor=below, **stats)
            groups.append(g)
            margins[g.label] = _margin(stats, floor, judged)
    worst = min(margins, key=lambda k: margins[k]) if margins else None
    order = np.argsort(cos)[:LOWEST]
    lowest = tuple(
        {
            "name": labels.names[i] if labels.names else f"#{i}",
            "cosine": round(float(cos[i]), 6),
            "groups": labels.of(int(i)),
        }
        for i in order
    )
    return FidelityGroupsRecord(tuple(groups), worst, lowest, min_faces_for_mean)


def group_problems(grouped: FidelityGroupsRecord) -> list[str]:
    """Each group below the floor, e.g. ["colour: colour: min 0.931100 < 0.97"]."""
    return [f"{g.label}: {p}" for g in grouped.groups for p in g.below_floor]


MAX_FOLDER_ROWS = 12  # more folders than this: the worst ones are printed, the count of the rest said


def table(grouped: FidelityGroupsRecord, floor: dict[str, float], title: str | None = None):
    """The grouped table (a :class:`arcdeploy.tables.Table`): one row per group, worst folders first
    when there are many; the note says the verdict and names the lowest faces."""
    from .tables import Table

    rows = []
    folders = [g for g in grouped.groups if g.axis == "folder"]
    hidden = 0
    if len(folders) > MAX_FOLDER_ROWS:
        keep = sorted(folders, key=lambda g: (g.passed, g.min))[:MAX_FOLDER_ROWS]
        hidden = len(folders) - len(keep)
    else:
        keep = folders
    for g in grouped.groups:
        if g.axis == "folder" and g not in keep:
            continue
        state = "ok" if g.passed else "BELOW: " + "; ".join(g.below_floor)
        if g.passed and "mean" in floor and "mean" not in g.judged:
            state = f"ok (min only: n < {grouped.min_faces_for_mean})"
        rows.append([g.axis, g.group, g.n, f"{g.mean:.4f}", f"{g.min:.4f}", f"{g.p1:.4f}", state])
    floor_text = ", ".join(f"{k} >= {v}" for k, v in floor.items())
    verdict = "passed on every group" if grouped.passed else "BELOW THE FLOOR"
    lines = [f"verdict: {verdict} (floor {floor_text}); worst group: {grouped.worst}"]
    if hidden:
        failing = sum(1 for g in folders if not g.passed) - sum(1 for g in keep if not g.passed)
        tail = f"{failing} of them below the floor" if failing else "they pass"
        lines.append(f"{hidden} more folder group(s) not shown ({tail})")
    if grouped.lowest:
        lines.append(
            "lowest faces: "
            + ", ".join(
                f"{_short(x['name'])} {x['cosine']:.4f} ({', '.join(v for v in x['groups'].values())})"
                for x in grouped.lowest[:5]
            )
        )
    return Table(["axis", "group", "n", "mean", "min", "p1", "state"], rows, title=title, note="\n".join(lines))


def _short(name: str) -> str:
    p = Path(name)
    return "/".join(p.parts[-2:]) if len(p.parts) > 1 else name
