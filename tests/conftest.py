"""Shared fixtures: generated (untrained) checkpoints, exports and packages.

Everything is made on the fly from arcdeploy.synthetic and arcdeploy.demo.synth, so the suite needs no
downloads. Session-scoped, because exporting and building cost seconds.

The README runs the suite in two processes (pytest-xdist, ``-n 2 --dist loadfile``: each test file in
one of them). The packages the files share are built once for the whole run, by whichever process asks
first, under a lock (:func:`built_once`); the other process waits for it and opens the same folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from arcdeploy.demo.synth import generated_state_dict
from arcdeploy.synthetic import aligned_faces


def shared_root(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this run shares (the run's base temporary folder; the
    session's own without xdist), for the packages :func:`built_once` makes."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # each worker's base is popen-gwN inside the run's
    root = base / "shared" / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def built_once(target: Path, build: Callable[[], Path]) -> Path:
    """The package ``target``, built by ``build`` unless a process of this run (this one included)
    has built it: a build writes its folder atomically, so a folder there is a whole package; the
    lock makes a second process wait for the first's build instead of building it again. (The
    fixtures ask it each time and keep no cache of their own: a free lock is taken in microseconds.)"""
    with FileLock(f"{target}.lock"):
        return target if target.is_dir() else build()


# generic tests modules, slowest first: pytest-xdist's loadfile hands them out in this order, so the
# long ones start early and the two processes finish together (measured with --durations: 50-110 s
# each, serial, on 2 cores; every other module follows in its usual order)
SLOWEST_MODULES = (
    "test_int8_faithful.py",
    "test_ray.py",
    "test_real_models.py",
    "test_detector_package.py",
    "test_build.py",
    "test_run.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: k for k, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def r18_state_dict() -> dict[str, torch.Tensor]:
    return generated_state_dict("r18", seed=0)


@pytest.fixture(scope="session")
def r18_ckpt(tmp_path_factory, r18_state_dict):
    path = tmp_path_factory.mktemp("ckpt") / "r18_backbone.pth"
    torch.save(r18_state_dict, path)
    return path


@pytest.fixture(scope="session")
def mbf_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mbf_backbone.pth"
    torch.save(generated_state_dict("mbf", seed=0), path)
    return path


@pytest.fixture(scope="session")
def r18_export(tmp_path_factory, r18_ckpt):
    from arcdeploy.exporter import export

    return export(r18_ckpt, tmp_path_factory.mktemp("export") / "r18")


@pytest.fixture(scope="session")
def mbf_export(tmp_path_factory, mbf_ckpt):
    from arcdeploy.exporter import export

    return export(mbf_ckpt, tmp_path_factory.mktemp("export") / "mbf")


R18_CALIB_COUNT = 32  # the shared r18 int8 packages' calibration faces
R18_CHECK_COUNT = 16  # and the faces each shared package's build checks it on (keeps the suite fast)


@pytest.fixture(scope="session")
def r18_calib_faces() -> np.ndarray:
    """32 calibration crops + 16 held out for the build's fidelity check."""
    return aligned_faces(R18_CALIB_COUNT + 16, seed=11)


@pytest.fixture(scope="session")
def r18_packages(tmp_path_factory, r18_export, r18_calib_faces):
    """Packages of the generated r18, built once per session per (engine, precision), on demand: the
    tests of later stages share them (no test may change one; copy it first)."""
    from arcdeploy import build

    root = shared_root(tmp_path_factory, "r18_pkgs")

    def get(engine: str, precision: str):
        int8 = precision == "int8"
        target = root / f"{engine}_{precision}"
        return built_once(
            target,
            lambda: build(
                r18_export.out_dir,
                target,
                engine=engine,
                precision=precision,
                calib=r18_calib_faces if int8 else None,
                calib_count=R18_CALIB_COUNT,
                check_count=R18_CHECK_COUNT,
                recipe=untrained_int8_recipe(R18_CALIB_COUNT) if int8 else None,
            ),
        )

    return get


@pytest.fixture(scope="session")
def r18_ort_fp32_pkg(r18_packages):
    """A small real package (ONNX Runtime fp32) for tests of later stages."""
    return r18_packages("onnxruntime", "fp32")


@pytest.fixture(scope="session")
def faces16() -> np.ndarray:
    """16 aligned synthetic faces, uint8 RGB [16, 112, 112, 3]."""
    return aligned_faces(16, seed=3)


def untrained_int8_recipe(calibration_count: int):
    """The int8 recipe for the generated (untrained) networks of tests about the build itself: NNCF's
    own activation ranges. Untrained IResNets lose a little with the default recipe's widest
    per-image ranges (see arcdeploy.quantize) and ONNX Runtime's int8 then needs the fallback (about
    150 s instead of 20 s for an r18); the default recipe is held to its floors on trained networks
    in test_real_models.py and test_int8_faithful.py."""
    from arcdeploy.quantize import QuantRecipe

    return QuantRecipe.for_untrained_network(calibration_count=calibration_count)


# The real trained networks' int8 packages here are calibrated on 100 faces, a third of the default (300):
# NNCF gathers each calibration image's activation quantiles one image at a time, about 0.09 s an image
# for the mbf, so 300 cost each build some 18 s more. Fewer faces make no floor easier to meet: the
# recipe's ranges are the widest of the per-image ranges, and fewer images tend to give narrower ones,
# which clip faces outside the calibration set as often or more; the floors, the checked faces and the
# LFW-600 margin are unchanged (all passed at 100 on an AVX-512 EPYC, as they did at 300).
REAL_CALIB_COUNT = 100


def identity_split(lfw, tmp) -> tuple:
    """List files of the real LFW set's calibration identities (the first 50, sorted) and of the
    held-out ones (the other 50). The calibration list takes each person's first photo, then each
    one's second, and so on: a build calibrated on its first REAL_CALIB_COUNT images has seen all 50
    people (two photos each), not the first dozen."""
    people = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    photos = {person: sorted((lfw / person).glob("*.jpg")) for person in people}
    rounds = range(max(len(v) for v in photos.values()))
    calib = [str(photos[p][i]) for i in rounds for p in people[:50] if i < len(photos[p])]
    held_out = [str(path) for p in people[50:] for path in photos[p]]
    lists = []
    for name, paths in (("calib.txt", calib), ("held_out.txt", held_out)):
        (tmp / name).write_text("\n".join(paths) + "\n")
        lists.append(tmp / name)
    return lists[0], lists[1]


@pytest.fixture(scope="session")
def real_exports(tmp_path_factory):
    """The real trained networks (../shared/real) exported once per session, on demand: ``get("mbf")``
    (mbf_w600k_gdc.pth), ``get("w600k")`` (insightface's w600k_mbf.onnx). The session's packages of
    them build from these folders rather than each exporting the source again (a checkpoint's trace or
    an ONNX file's checks, 2-4 s each); building from the source file itself is tested with the small
    foreign networks of test_onnx_source.py and the edited w600k files of test_reliability_round2.py."""
    from arcdeploy import export
    from real_material import MODELS

    sources = {"mbf": MODELS / "mbf_w600k_gdc.pth", "w600k": MODELS / "w600k_mbf.onnx"}
    cache: dict = {}

    def get(model: str):
        if model not in cache:
            cache[model] = export(sources[model], tmp_path_factory.mktemp("real_export") / model)
        return cache[model]

    return get


@pytest.fixture(scope="session")
def real_packages(tmp_path_factory, real_exports):
    """Packages of the real trained mbf (../shared/real), built once per session on demand:
    ``get(engine, precision)``; int8 calibrated on 100 grayscale LFW faces of the first 50 people,
    every build checked on 160 faces of the other 50."""
    from arcdeploy import build
    from real_material import FACES

    tmp = tmp_path_factory.mktemp("real")
    calib, held_out = identity_split(FACES / "lfw", tmp)
    root = shared_root(tmp_path_factory, "real_pkgs")

    def get(engine: str, precision: str):
        target = root / f"{engine}_{precision}"
        return built_once(
            target,
            lambda: build(
                real_exports("mbf").out_dir,
                target,
                engine=engine,
                precision=precision,
                calib=calib if precision == "int8" else None,
                calib_landmarks=FACES / "lfw_5pts.txt",
                calib_count=REAL_CALIB_COUNT,
                check_images=held_out,
                check_landmarks=FACES / "lfw_5pts.txt",
                check_count=160,
            ),
        )

    return get


@pytest.fixture(scope="session")
def w600k_packages(tmp_path_factory, real_exports):
    """Float packages of insightface's trained ``w600k_mbf.onnx`` (../shared/real), built once per session
    per (engine, precision), on demand, checked on 64 real LFW faces (its int8 ones: ``faithful_packages``).
    Skips when the real material is absent."""
    from arcdeploy import build
    from arcdeploy.faces.calibration import load_images
    from real_material import FACES, MODELS

    w600k, lfw, points = MODELS / "w600k_mbf.onnx", FACES / "lfw", FACES / "lfw_5pts.txt"
    if not (w600k.is_file() and points.is_file()):
        pytest.skip(f"real test material not found: {w600k}, {points}")
    root = shared_root(tmp_path_factory, "w600k_pkgs")

    def get(engine: str, precision: str):
        assert precision != "int8", "the w600k's int8 packages: faithful_packages"
        target = root / f"{engine}_{precision}"
        return built_once(
            target,
            lambda: build(
                real_exports("w600k").out_dir,
                target,
                engine=engine,
                precision=precision,
                check_images=load_images(lfw, points, limit=64).faces,
            ),
        )

    return get


# ------------------------------------------------------------------ int8 on faces unlike the calibration set

GROUPS_IN_CHECK = ("black", "east_asian", "latino", "white")  # colour LFW groups the check folder holds


def _colour_people() -> dict[str, list[str]]:
    """Colour LFW images by visual group label (lfw_colour_groups.tsv), in file order."""
    import csv

    from real_material import FACES

    with open(FACES / "lfw_colour_groups.tsv") as f:
        group_of = {r["identity"]: r["group"] for r in csv.DictReader(f, delimiter="\t")}
    names = [line.split()[0] for line in (FACES / "lfw_colour_5pts.txt").read_text().splitlines() if line.strip()]
    by_group: dict[str, list[str]] = {}
    for n in names:
        by_group.setdefault(group_of[n.split("/")[0]], []).append(n)
    return by_group


@pytest.fixture(scope="session")
def material(tmp_path_factory):
    """A check folder (photos/, grayscale LFW of held-out people, colour LFW by group, one landmark file
    for all, names relative to the folder), colour calibration images (people the check does not
    hold), and small faces: the photos shrunk so the face is 60-100 px wide in a large picture."""

    tmp = shared_root(tmp_path_factory, "faithful")
    made = {
        "check": tmp / "check",
        "check_5pts": tmp / "check_5pts.txt",
        "colour_calib": tmp / "colour_calib.txt",
        "small": tmp / "small",
    }
    with FileLock(f"{tmp}.lock"):  # made once for the run (its packages are gated on this check folder)
        if not (tmp / "made").is_file():
            _make_material(made)
            (tmp / "made").touch()
    return made


def _make_material(made: dict) -> None:
    import cv2

    from real_material import FACES, MODELS

    check_dir = made["check"]
    rows: list[str] = []

    def link(folder: str, src_root, names: list[str], lmk_file) -> None:
        points = {ln.split()[0]: ln.split()[1:] for ln in lmk_file.read_text().splitlines() if ln.strip()}
        for n in names:
            dst = check_dir / folder / n
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src_root / n)
            rows.append(f"{folder}/{n} " + " ".join(points[n]))

    photos = sorted(ln.split()[0] for ln in (FACES / "photos_5pts.txt").read_text().splitlines() if ln.strip())
    link("photos", FACES / "photos", photos, FACES / "photos_5pts.txt")
    people = sorted(p.name for p in (FACES / "lfw").iterdir() if p.is_dir())[50:]
    held = [f"{p}/{f.name}" for p in people[::12] for f in sorted((FACES / "lfw" / p).glob("*.jpg"))]
    link("lfw_grayscale", FACES / "lfw", held, FACES / "lfw_5pts.txt")
    by_group = _colour_people()
    calib: list[str] = []
    for group, names in by_group.items():
        people_in = sorted({n.split("/")[0] for n in names})
        checked = set(people_in[1::3])  # a third of each group's people are checked, never calibrated on
        if group in GROUPS_IN_CHECK:
            link(
                f"lfw_colour_{group}",
                FACES / "lfw_colour",
                [n for n in names if n.split("/")[0] in checked][:12],
                FACES / "lfw_colour_5pts.txt",
            )
        calib += [str(FACES / "lfw_colour" / n) for n in names if n.split("/")[0] not in checked]
    made["check_5pts"].write_text("\n".join(rows) + "\n")
    made["colour_calib"].write_text("\n".join(calib[::2]) + "\n")  # every group, many people
    small = made["small"]
    small.mkdir()
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.io import list_images, read_image

    det = open_detector(MODELS / "scrfd_500m_kps.onnx")
    rng = np.random.default_rng(0)
    for path in list_images(FACES / "photos"):
        img = read_image(path)
        width = det.best(img).width
        for w in (60, 80, 100):
            s = w / width
            shrunk = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
            canvas = np.full((960, 1280, 3), rng.integers(60, 200, 3), np.uint8)
            h, ww = shrunk.shape[:2]
            y, x = int(rng.integers(0, 960 - h)), int(rng.integers(0, 1280 - ww))
            canvas[y : y + h, x : x + ww] = shrunk
            cv2.imwrite(str(small / f"{path.stem}_{w}px.jpg"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="session")
def faithful_packages(tmp_path_factory, material, real_packages, real_exports):
    """int8 packages of the real trained networks by (model, engine, calibration), each calibrated on
    REAL_CALIB_COUNT faces and gated by group on ``material["check"]``: the mbf's grayscale ones come from
    real_packages (gated on held-out LFW faces); test_int8_faithful.py holds them all to the int8 floor,
    test_onnx_source.py checks the w600k's ONNX Runtime one against its source."""
    from arcdeploy import build
    from real_material import FACES

    tmp = tmp_path_factory.mktemp("faithful_pkgs")
    root = shared_root(tmp_path_factory, "faithful_pkgs")
    gray_calib, _ = identity_split(FACES / "lfw", tmp)
    sources = {
        "gray": (gray_calib, FACES / "lfw_5pts.txt"),
        "colour": (material["colour_calib"], FACES / "lfw_colour_5pts.txt"),
    }

    def get(model: str, engine: str, calibration: str):
        if model == "mbf" and calibration == "gray":
            return real_packages(engine, "int8")
        calib, lmk = sources[calibration]
        target = root / f"{model}_{engine}_{calibration}"
        return built_once(
            target,
            lambda: build(
                real_exports(model).out_dir,
                target,
                engine=engine,
                precision="int8",
                calib=calib,
                calib_landmarks=lmk,
                calib_count=REAL_CALIB_COUNT,
                check_images=material["check"],
                check_landmarks=material["check_5pts"],
            ),
        )

    return get
