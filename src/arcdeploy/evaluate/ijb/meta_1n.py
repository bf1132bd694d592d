"""The three IJB 1:N list files: two galleries and the mixed probes, read and cross-checked.

Under ``ROOT/meta`` (as insightface's ``ijb_evals.py`` reads them):

- IJB-C: ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``, ``ijbc_1N_probe_mixed.csv``;
- IJB-B: ``ijbb_1N_gallery_S1.csv``, ``ijbb_1N_gallery_S2.csv``, ``ijbb_1N_probe_mixed.csv``.

Each is a CSV file: a header line, then one row per image, ``TEMPLATE_ID,SUBJECT_ID,...`` (the
other columns are not used). A template is the set of its rows; its subject is that of its first
row (insightface: ``np.unique(templates, return_index=True)``). A template's images, media and
features come from the 1:1 meta files (``t_face_tid_mid.txt``), as insightface builds them, so
every listed template must have images there.

Checks beyond insightface (which would silently score a missing template as a zero vector, or
fail on a ragged array): a template with no image in the tid_mid file and a subject enrolled with
two templates in one gallery are one-line errors naming the file and the line. A file without
its header line is an error too (reading it as insightface does would drop its first row).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ArcdeployError
from .meta import TARGETS, IJBMeta, template_index

log = logging.getLogger(__name__)

GALLERIES = ("G1", "G2")  # the keys of both targets' galleries in results (IJB-B's S1, S2 are G1, G2)
_FILE_LABELS = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


def gallery_labels(target: str) -> dict[str, str]:
    """{result key: the gallery's own name}: G1/G2 for IJB-C, S1/S2 for IJB-B."""
    return dict(zip(GALLERIES, _FILE_LABELS[_target(target)]))


def _target(target: str) -> str:
    t = str(target).upper()
    if t not in TARGETS:
        raise ArcdeployError(f"unknown IJB target {target!r}: use IJBC or IJBB")
    return t


def list_paths(root: str | os.PathLike, target: str) -> dict[str, Path]:
    """{"G1": ..., "G2": ..., "probe": ...}: where the three 1:N files of ``target`` are."""
    t = _target(target)
    meta = Path(root) / "meta"
    a, b = _FILE_LABELS[t]
    low = t.lower()
    return {
        "G1": meta / f"{low}_1N_gallery_{a}.csv",
        "G2": meta / f"{low}_1N_gallery_{b}.csv",
        "probe": meta / f"{low}_1N_probe_mixed.csv",
    }


def has_1n_lists(root: str | os.PathLike, target: str) -> bool:
    """Whether all three 1:N files of ``target`` are present under ``root``."""
    return all(p.is_file() for p in list_paths(root, target).values())


@dataclass
class TemplateList:
    """One list file: its templates (sorted unique ids, as ``np.unique`` gives them) and their subjects."""

    path: Path
    ids: np.ndarray  # int64 [T], sorted unique template ids
    subjects: np.ndarray  # int64 [T], the subject of each template's first row
    lines: np.ndarray  # int64 [T], the file line of each template's first row
    rows: int  # image rows
    conflicting: int = 0  # templates whose rows name more than one subject (the first row's counts)

    @property
    def templates(self) -> int:
        return int(self.ids.size)


@dataclass
class IJB1NLists:
    target: str
    galleries: dict[str, TemplateList]  # "G1", "G2"
    probes: TemplateList
    labels: dict[str, str] = field(default_factory=dict)  # "G1" -> "G1" (IJB-C) or "S1" (IJB-B)


def _int_field(text: str, path: Path, line: int, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ArcdeployError(f"{path}: line {line}: {what} {text.strip()!r} is not an integer") from None


def read_template_list(path: str | os.PathLike) -> TemplateList:
    """Read one 1:N list file (module doc); every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        what = "missing IJB 1:N list file" if not path.exists() else "not a file"
        raise ArcdeployError(
            f"{path}: {what}; expected ROOT/meta/{path.name} (header, then TEMPLATE_ID,SUBJECT_ID,...)"
        )
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ArcdeployError(f"{path}: cannot read ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    tids: list[int] = []
    sids: list[int] = []
    lines: list[int] = []
    header_seen = False
    try:
        for fields in reader:
            no = reader.line_num
            if not header_seen:
                header_seen = True
                if len(fields) >= 2 and all(f.strip().lstrip("-").isdigit() for f in fields[:2]):
                    raise ArcdeployError(
                        f"{path}: line {no}: a data row where the header line should be "
                        "(TEMPLATE_ID,SUBJECT_ID,...); the first line is skipped as a header"
                    )
                continue
            if not fields or not "".join(fields).strip():
                continue  # a blank line
            if len(fields) < 2:
                raise ArcdeployError(
                    f"{path}: line {no}: expected at least 2 comma-separated fields (TEMPLATE_ID,SUBJECT_ID,...), "
                    f"got {len(fields)}"
                )
            tids.append(_int_field(fields[0], path, no, "template id"))
            sids.append(_int_field(fields[1], path, no, "subject id"))
            lines.append(no)
    except csv.Error as exc:
        raise ArcdeployError(f"{path}: line {reader.line_num}: not readable as CSV ({exc})") from None
    if not tids:
        raise ArcdeployError(f"{path}: no rows after the header line")
    t = np.asarray(tids, np.int64)
    s = np.asarray(sids, np.int64)
    ids, first, inverse = np.unique(t, return_index=True, return_inverse=True)
    subjects = s[first]
    conflicting = np.unique(inverse[s != subjects[inverse]]).size
    if conflicting:
        log.warning(
            "%s: %d templates have rows naming different subjects; each takes its first row's, as insightface does",
            path,
            conflicting,
        )
    return TemplateList(path, ids, subjects, np.asarray(lines, np.int64)[first], len(tids), int(conflicting))


def _check_known(lst: TemplateList, known: np.ndarray, tid_mid: str) -> None:
    missing = template_index(known, lst.ids) < 0
    if missing.any():
        # the earliest line of a missing template
        i = int(np.flatnonzero(missing)[np.argmin(lst.lines[missing])])
        raise ArcdeployError(
            f"{lst.path}: line {int(lst.lines[i])}: template {int(lst.ids[i])} has no image in {tid_mid}"
        )


def _check_enrolled_once(lst: TemplateList) -> None:
    order = np.argsort(lst.subjects, kind="stable")
    s = lst.subjects[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        subject = s[dup[0]]
        rows = order[lst.subjects[order] == subject]
        ids = ", ".join(str(int(x)) for x in lst.ids[np.sort(rows)][:4])
        raise ArcdeployError(
            f"{lst.path}: line {int(np.sort(lst.lines[rows])[1])}: subject {int(subject)} is enrolled with "
            f"{rows.size} templates ({ids}); a 1:N gallery holds one template per subject"
        )


def read_1n_lists(root: str | os.PathLike, target: str, meta: IJBMeta | None = None) -> IJB1NLists:
    """The three 1:N files of ``target`` under ``root``; with ``meta`` (the 1:1 meta files of the
    same root), every listed template is checked to have images in its tid_mid file."""
    target = _target(target)
    paths = list_paths(root, target)
    galleries = {k: read_template_list(paths[k]) for k in GALLERIES}
    probes = read_template_list(paths["probe"])
    for k in GALLERIES:
        _check_enrolled_once(galleries[k])
    if meta is not None:
        known = meta.template_ids if meta.template_ids is not None else np.unique(meta.templates)
        tid_mid = Path(meta.files.get("tid_mid", "tid_mid file")).name
        for lst in (*galleries.values(), probes):
            _check_known(lst, known, tid_mid)
    both = np.intersect1d(galleries["G1"].subjects, galleries["G2"].subjects)
    if both.size:
        log.warning(
            "%d subjects are enrolled in both galleries (%s, %s); IJB's galleries are disjoint",
            both.size,
            paths["G1"].name,
            paths["G2"].name,
        )
    for k in GALLERIES:
        shared = np.intersect1d(galleries[k].ids, probes.ids)
        if shared.size:
            log.warning(
                "%d templates of %s are also probes in %s; such a probe finds itself",
                shared.size,
                paths[k].name,
                paths["probe"].name,
            )
    return IJB1NLists(target, galleries, probes, gallery_labels(target))
