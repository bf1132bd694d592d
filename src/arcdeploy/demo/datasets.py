"""Small generated evaluation sets in the real formats, for the demo and the tests.

- :func:`write_ijb_set`: an IJB-style folder (``meta/`` with the three files of
  insightface's IJB layout, ``loose_crop/`` with real JPEG loose crops of cartoon faces
  from :func:`arcdeploy.synthetic.draw_face`, their absolute 5 landmarks and a
  faceness score), with every genuine and every impostor template pair, and the
  three 1:N list files (two disjoint galleries and the mixed probes, as in IJB).
- :func:`write_bin_set`: an LFW-style ``.bin`` (pickled ``(bins, issame_list)``
  of JPEG-encoded aligned 112x112 crops), either as Python 3 writes it
  (``bytes`` images) or as Python 2 wrote it (``str`` images: protocol-2
  ``BINSTRING`` opcodes, which Python 3 only loads with ``encoding='bytes'``).

The faces are drawn, not real: numbers measured on them show that the
protocols run, not how well a model recognises people.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from ..files import atomic_dir, write_bytes_atomic


def _jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def write_ijb_set(
    root: str | os.PathLike,
    target: str = "IJBC",
    identities: int = 8,
    templates_per_id: int = 2,
    images_per_template: int = 3,
    seed: int = 0,
    min_size: int = 150,
    max_size: int = 250,
    hard: bool = False,
    family_size: int = 1,
    likeness: float = 0.0,
    identification: bool = True,
) -> Path:
    """Write a small IJB set under ``root`` (replacing it) and return ``root``.

    Template ids count from 1 per identity block; in each template the first two
    images share a media id (like frames of one video), the others have their own.
    Faceness scores are drawn in [0.55, 1.0).

    ``identification`` (with two or more templates per identity): also the 1:N list files, laid
    out as IJB's: the first template of each even identity is enrolled in gallery G1 (IJB-B: S1),
    of each odd one in G2 (S2); every other template is a probe, so each probe is mated in one
    gallery and non-mated in the other. Subject ids are identity + 1.
    """
    from ..synthetic import draw_face

    root = Path(root)
    t = target.lower()
    rng = np.random.default_rng(seed)
    tid_lines, pts_lines = [], []
    template_identity: list[tuple[int, int]] = []
    template_images: dict[int, list[str]] = {}
    image_no = 0
    media_id = 1000
    with atomic_dir(root, force=True) as tmp:
        crops = tmp / "loose_crop"
        crops.mkdir(parents=True)
        (tmp / "meta").mkdir()
        tid = 0
        for ident in range(identities):
            face_id = seed * 100_003 + ident
            for _ in range(templates_per_id):
                tid += 1
                template_identity.append((tid, ident))
                for k in range(images_per_template):
                    if k != 1:
                        media_id += 1
                    image_no += 1
                    size = int(rng.integers(min_size, max_size + 1))
                    img, lmk = draw_face(
                        face_id,
                        variation=image_no,
                        size=size,
                        hard=hard,
                        family=_family(seed, ident, family_size),
                        likeness=likeness,
                    )
                    name = f"{image_no}.jpg"
                    template_images.setdefault(tid, []).append(name)
                    (crops / name).write_bytes(_jpeg(img))
                    score = float(rng.uniform(0.55, 1.0))
                    tid_lines.append(f"{name} {tid} {media_id}")
                    pts_lines.append(" ".join([name] + [f"{v:.3f}" for v in lmk.reshape(-1)] + [f"{score:.6f}"]))
        pairs = []
        for i, (ta, ia) in enumerate(template_identity):
            for tb, ib in template_identity[i + 1 :]:
                pairs.append(f"{ta} {tb} {int(ia == ib)}")
        (tmp / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
        (tmp / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(pts_lines) + "\n")
        (tmp / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
        if identification and templates_per_id >= 2:
            _write_1n_lists(tmp / "meta", t, template_identity, template_images, templates_per_id)
    return root


def _write_1n_lists(
    meta: Path, t: str, template_identity: list[tuple[int, int]], images: dict[int, list[str]], per_id: int
) -> None:
    galleries = ("G1", "G2") if t == "ijbc" else ("S1", "S2")
    files: dict[str, list[str]] = {galleries[0]: [], galleries[1]: [], "probe_mixed": []}
    for k, (tid, ident) in enumerate(template_identity):
        first = k % per_id == 0
        key = galleries[ident % 2] if first else "probe_mixed"
        files[key] += [f"{tid},{ident + 1},{name}" for name in images[tid]]
    for key, rows in files.items():
        stem = f"{t}_1N_gallery_{key}" if key != "probe_mixed" else f"{t}_1N_probe_mixed"
        (meta / f"{stem}.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(rows) + "\n")


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """``pickle.dumps((bins, issame), protocol=2)`` as Python 2 wrote it for ``str`` images:
    BINSTRING / SHORT_BINSTRING opcodes (Python 3 decodes those as text unless
    loaded with ``encoding='bytes'``). No memo: nothing is shared."""
    out = io.BytesIO()
    out.write(b"\x80\x02")  # PROTO 2
    out.write(b"]q\x00(")  # EMPTY_LIST, BINPUT 0, MARK
    for b in bins:
        if len(b) < 256:
            out.write(b"U" + bytes([len(b)]) + b)  # SHORT_BINSTRING
        else:
            out.write(b"T" + struct.pack("<I", len(b)) + b)  # BINSTRING
    out.write(b"e")  # APPENDS
    out.write(b"]q\x01(")
    for s in issame:
        out.write(b"\x88" if s else b"\x89")  # NEWTRUE / NEWFALSE
    out.write(b"e")
    out.write(b"\x86q\x02.")  # TUPLE2, BINPUT 2, STOP
    return out.getvalue()


def _family(seed: int, ident: int, family_size: int) -> int | None:
    """The family (look-alike group) of an identity: ``family_size`` consecutive identities share one."""
    return None if family_size <= 1 else 900_000 + seed * 10_007 + ident // family_size


def bin_set_faces(
    pairs: int = 40, seed: int = 0, hard: bool = False, likeness: float = 0.0
) -> tuple[np.ndarray, list[bool]]:
    """Aligned RGB faces [2 * pairs, 112, 112, 3] and the issame list (alternating True, False).
    With ``likeness`` the two people of a different pair share that much of one look."""
    from ..faces.align import align_face
    from ..synthetic import draw_face

    faces = np.empty((2 * pairs, 112, 112, 3), np.uint8)
    issame = []
    base = 500_000 + seed * 100_003
    for k in range(pairs):
        same = k % 2 == 0
        a, b = base + 2 * k, base + 2 * k + (0 if same else 1)
        for j, (ident, var) in enumerate(((a, 2 * k), (b, 2 * k + 1))):
            img, lmk = draw_face(
                ident,
                variation=var,
                size=160,
                hard=hard,
                family=_family(seed, 2 * k, 2) if likeness else None,
                likeness=likeness,
            )
            faces[2 * k + j] = align_face(img, lmk)
        issame.append(same)
    return faces, issame


def write_bin_set(
    path: str | os.PathLike,
    pairs: int = 40,
    seed: int = 0,
    encoding: str = "py3",
    hard: bool = False,
    likeness: float = 0.0,
) -> Path:
    """Write an LFW-style .bin of ``pairs`` pairs; ``encoding``: "py3" (bytes images,
    protocol 4) or "py2-bytes" (str images as Python 2 wrote them, protocol 2)."""

    if encoding not in ("py3", "py2-bytes"):
        raise ValueError(f"encoding must be 'py3' or 'py2-bytes', got {encoding!r}")
    faces, issame = bin_set_faces(pairs, seed, hard=hard, likeness=likeness)
    bins = [_jpeg(f) for f in faces]
    data = pickle.dumps((bins, issame), protocol=4) if encoding == "py3" else _py2_pickle(bins, issame)
    path = Path(path)
    write_bytes_atomic(path, data)
    return path
