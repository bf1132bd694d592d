"""IJB-C-format 1:N (and 1:1) set from the shared real LFW faces, evaluated with a trained network.

    python benchmarks/ijb_1n_from_lfw.py [--real ../shared/real] [--workdir /tmp/arcdeploy-ijb1n]
                                        [--package PKG] [--people 100] [--distractors 308]
                                        [--gallery-images 4] [--probe-images 2] [--distractor-images 0]
                                        [--seed 0] [--json FILE]

The set (``WORKDIR/IJB_release/IJBC``, laid out as insightface's IJB-C release):

- enrolled people: the first ``--people`` identities of ``faces/lfw`` (grayscale, 8 images each, sorted
  by name), split by a seeded permutation into two disjoint halves: gallery G1 and gallery G2;
- per enrolled person, images in file order: the first ``--gallery-images`` form the gallery template;
  the rest form probe templates of ``--probe-images`` images each (8 = 4 + 2 + 2 by default);
- distractors: ``--distractors`` people of ``faces/lfw_colour`` (sorted by name) who are not among the
  enrolled people's names (the two sets may share people: those 19 are left out), each one probe
  template of all their images (1 to 4; ``--distractor-images K``: templates of K images). Their
  images are converted to grayscale (lossless PNG) so that colour alone cannot tell a non-mated
  probe from a mated one;
- so, as in IJB-C's mixed probes, every probe of an enrolled person is mated in one gallery and
  non-mated in the other, and the distractors are non-mated in both;
- every image is its own media; landmarks and faceness scores are those of ``lfw_5pts.txt`` /
  ``lfw_colour_5pts.txt`` (SCRFD-500M); loose crops are the images (copied);
- meta files: ``ijbc_face_tid_mid.txt``, ``ijbc_name_5pts_score.txt``, ``ijbc_template_pair_label.txt``
  (every pair of templates, genuine when the subject is the same), ``ijbc_1N_gallery_G1.csv``,
  ``ijbc_1N_gallery_G2.csv``, ``ijbc_1N_probe_mixed.csv`` (header, then TEMPLATE_ID,SUBJECT_ID,FILENAME
  per image).

The network: ``--package`` or, by default, ``models/w600k_mbf.onnx`` built with
``arcdeploy build MODEL --engine onnxruntime --precision fp32`` (into WORKDIR/pkg, reused). One feature
extraction (flip test, insightface's default mode F1 N1 D1) serves both protocols
(:func:`arcdeploy.evaluate.ijb.evaluate_protocols`).

Prints the 1:N tables (TPIR at FPIR 1e-4 ... 1 for G1, G2 and the mean; rank-1/5/10) and the 1:1
TAR@FAR table; writes the JSON (default ``benchmarks/results/ijb_1n_lfw.json``): the layout, the machine
and both documents (without the per-method copies). With about 400 non-mated probes per gallery, an FPIR
below 1/400 falls on the highest non-mated score (threshold index 0).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

DEFAULT_REAL = (HERE.parent / ".." / "shared" / "real").resolve()
DEFAULT_JSON = HERE / "results" / "ijb_1n_lfw.json"


def read_5pts(path: Path) -> dict[str, list[str]]:
    """relpath -> the 11 landmark and score fields of its line."""
    out = {}
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) == 12:
            out[f[0]] = f[1:]
    return out


def layout(
    real: Path,
    root: Path,
    people: int = 100,
    distractors: int | None = None,
    gallery_images: int = 4,
    probe_images: int = 2,
    seed: int = 0,
    distractor_images: int = 0,
) -> dict:
    """Write the IJB-C-format set under ``root`` (replacing it); returns what it holds (module doc)."""
    import cv2

    faces = real / "faces"
    gray_pts, colour_pts = read_5pts(faces / "lfw_5pts.txt"), read_5pts(faces / "lfw_colour_5pts.txt")
    by_person: dict[str, list[str]] = {}
    for rel in sorted(gray_pts):
        by_person.setdefault(rel.split("/")[0], []).append(rel)
    names = sorted(by_person)[:people]
    if len(names) < 2:
        raise SystemExit(f"{faces / 'lfw'}: need at least 2 people, found {len(names)}")
    colour_people: dict[str, list[str]] = {}
    for rel in sorted(colour_pts):
        colour_people.setdefault(rel.split("/")[0], []).append(rel)
    overlap = sorted(set(colour_people) & set(by_person))
    others = [p for p in sorted(colour_people) if p not in by_person]
    others = others[: len(others) if distractors is None else distractors]

    if root.exists():
        shutil.rmtree(root)
    (root / "meta").mkdir(parents=True)
    crops = root / "loose_crop"
    order = np.random.default_rng(seed).permutation(len(names))
    in_g1 = set(order[: len(names) // 2].tolist())
    tid_rows, pts_rows = [], []
    lists: dict[str, list[str]] = {"G1": [], "G2": [], "probe": []}
    template_subject: dict[int, int] = {}
    tid = media = 0

    def add_template(kind: str, subject: int, images: list[tuple[str, list[str]]]) -> None:
        nonlocal tid, media
        tid += 1
        template_subject[tid] = subject
        for name, fields in images:
            media += 1
            tid_rows.append(f"{name} {tid} {media}")
            pts_rows.append(" ".join([name, *fields]))
            lists[kind].append(f"{tid},{subject},{name}")

    for i, person in enumerate(names):
        subject = i + 1
        images = []
        for rel in by_person[person]:
            (crops / person).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(faces / "lfw" / rel, crops / rel)
            images.append((rel, gray_pts[rel]))
        add_template("G1" if i in in_g1 else "G2", subject, images[:gallery_images])
        rest = images[gallery_images:]
        for k in range(0, len(rest) - probe_images + 1, probe_images):
            add_template("probe", subject, rest[k : k + probe_images])
    for j, person in enumerate(others):
        subject = len(names) + j + 1
        images = []
        for rel in colour_people[person]:
            name = str(Path("distractors") / Path(rel).with_suffix(".png"))
            (crops / name).parent.mkdir(parents=True, exist_ok=True)
            img = cv2.imread(str(faces / "lfw_colour" / rel), cv2.IMREAD_GRAYSCALE)
            if img is None or not cv2.imwrite(str(crops / name), img):
                raise SystemExit(f"{faces / 'lfw_colour' / rel}: cannot convert to grayscale PNG")
            images.append((name, colour_pts[rel]))
        step = distractor_images or len(images)
        for k in range(0, len(images), step):
            add_template("probe", subject, images[k : k + step])

    meta = root / "meta"
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_rows) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(pts_rows) + "\n")
    tids = sorted(template_subject)
    pairs = [
        f"{a} {b} {int(template_subject[a] == template_subject[b])}" for x, a in enumerate(tids) for b in tids[x + 1 :]
    ]
    (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
    for key, stem in (("G1", "ijbc_1N_gallery_G1"), ("G2", "ijbc_1N_gallery_G2"), ("probe", "ijbc_1N_probe_mixed")):
        (meta / f"{stem}.csv").write_text("\n".join([header, *lists[key]]) + "\n")
    probe_templates = len({row.split(",")[0] for row in lists["probe"]})
    mated_probes = len({row.split(",")[0] for row in lists["probe"] if int(row.split(",")[1]) <= len(names)})
    return {
        "root": str(root),
        "enrolled_people": len(names),
        "gallery_people": {"G1": len(in_g1), "G2": len(names) - len(in_g1)},
        "gallery_images_per_template": gallery_images,
        "probe_images_per_template": probe_images,
        "mated_probe_templates": mated_probes,
        "distractor_probe_templates": probe_templates - mated_probes,
        "distractor_images_per_template": distractor_images or "all",
        "distractor_people": len(others),
        "distractor_images": sum(len(colour_people[p]) for p in others),
        "left_out_shared_people": len(overlap),
        "probe_templates": probe_templates,
        "templates": len(tids),
        "images": len(tid_rows),
        "pairs": len(pairs),
        "genuine_pairs": sum(p.endswith(" 1") for p in pairs),
        "seed": seed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/arcdeploy-ijb1n"))
    ap.add_argument("--package", type=Path, help="a built package (default: w600k_mbf.onnx, ONNX Runtime fp32)")
    ap.add_argument("--people", type=int, default=100, help="enrolled LFW people, split between G1 and G2")
    ap.add_argument("--distractors", type=int, default=None, help="lfw_colour people as non-mated probes (all)")
    ap.add_argument("--gallery-images", type=int, default=4)
    ap.add_argument("--probe-images", type=int, default=2)
    ap.add_argument("--distractor-images", type=int, default=0, help="images per distractor template (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)

    from arcdeploy.cli import main as cli
    from arcdeploy.evaluate.ijb import evaluate_protocols
    from arcdeploy.machine import machine_info

    root = args.workdir / "IJB_release" / "IJBC"
    info = layout(
        args.real,
        root,
        args.people,
        args.distractors,
        args.gallery_images,
        args.probe_images,
        args.seed,
        args.distractor_images,
    )
    print(json.dumps(info, indent=1))
    pkg = args.package
    if pkg is None:
        pkg = args.workdir / "pkg"
        if not (pkg / "manifest.json").exists():
            model = args.real / "models" / "w600k_mbf.onnx"
            argv_build = ["build", str(model), "--engine", "onnxruntime", "--precision", "fp32", "-o", str(pkg)]
            print("arcdeploy " + " ".join(argv_build), flush=True)
            if cli([*argv_build, "--force"]) != 0:
                return 1
    docs = evaluate_protocols(
        root, "IJBC", packages=[str(pkg)], out_dir=args.workdir / "eval", progress=False, force=True
    )
    one_n, one_one = docs["1:N"], docs["1:1"]
    print("TPIR (%) at FPIR")
    print(one_n["table"])
    print(one_n["rank_table"])
    print("TAR (%) at FAR (1:1, the same features)")
    print(one_one["table"])
    keep_1n = {k: v for k, v in one_n.items() if k not in ("results", "table", "rank_table")}
    keep_11 = {k: v for k, v in one_one.items() if k not in ("results", "table", "roc")}
    doc = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "command": "python benchmarks/ijb_1n_from_lfw.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "package": str(pkg),
        "layout": info,
        "1:N": keep_1n,
        "1:1": keep_11,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
