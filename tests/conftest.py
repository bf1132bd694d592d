"""Shared fixtures: generated (untrained) checkpoints, exports and packages.

Everything is made on the fly from arcdeploy.synthetic and arcdeploy.demo.synth, so the suite needs no
downloads. Session-scoped, because exporting and building cost seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcdeploy.demo.synth import generated_state_dict
from arcdeploy.synthetic import aligned_faces


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

    root = tmp_path_factory.mktemp("r18_pkgs")
    cache: dict = {}

    def get(engine: str, precision: str):
        if (engine, precision) not in cache:
            int8 = precision == "int8"
            cache[engine, precision] = build(
                r18_export.out_dir,
                root / f"{engine}_{precision}",
                engine=engine,
                precision=precision,
                calib=r18_calib_faces if int8 else None,
                calib_count=R18_CALIB_COUNT,
                check_count=R18_CHECK_COUNT,
                recipe=untrained_int8_recipe(R18_CALIB_COUNT) if int8 else None,
            )
        return cache[engine, precision]

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


def identity_split(lfw, tmp) -> tuple:
    """List files of the real LFW set's calibration identities (the first 50, sorted) and of the
    held-out ones (the other 50)."""
    people = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    lists = []
    for name, group in (("calib.txt", people[:50]), ("held_out.txt", people[50:])):
        paths = [str(p) for person in group for p in sorted((lfw / person).glob("*.jpg"))]
        (tmp / name).write_text("\n".join(paths) + "\n")
        lists.append(tmp / name)
    return lists[0], lists[1]


@pytest.fixture(scope="session")
def real_packages(tmp_path_factory):
    """Packages of the real trained mbf (../shared/real), built once per session on demand:
    ``get(engine, precision)``; int8 calibrated on 300 grayscale LFW faces of the first 50 people,
    every build checked on 160 faces of the other 50."""
    from arcdeploy import build, export
    from real_material import FACES, MODELS

    tmp = tmp_path_factory.mktemp("real")
    calib, held_out = identity_split(FACES / "lfw", tmp)
    export_dir = tmp / "export"
    export(MODELS / "mbf_w600k_gdc.pth", export_dir)
    cache: dict = {}

    def get(engine: str, precision: str):
        if (engine, precision) not in cache:
            cache[(engine, precision)] = build(
                export_dir,
                tmp / f"{engine}_{precision}",
                engine=engine,
                precision=precision,
                calib=calib if precision == "int8" else None,
                calib_landmarks=FACES / "lfw_5pts.txt",
                calib_count=300,
                check_images=held_out,
                check_landmarks=FACES / "lfw_5pts.txt",
                check_count=160,
            )
        return cache[(engine, precision)]

    return get


@pytest.fixture(scope="session")
def w600k_packages(tmp_path_factory):
    """Packages of insightface's trained ``w600k_mbf.onnx`` (../shared/real), built once per session per
    (engine, precision), on demand; float ones checked on 64 real LFW faces, int8 calibrated on 300 of
    them (the build checks on 128 of the ones it holds out). Skips when the real material is absent."""
    from arcdeploy import build
    from arcdeploy.faces.calibration import load_images
    from real_material import FACES, MODELS

    w600k, lfw, points = MODELS / "w600k_mbf.onnx", FACES / "lfw", FACES / "lfw_5pts.txt"
    if not (w600k.is_file() and points.is_file()):
        pytest.skip(f"real test material not found: {w600k}, {points}")
    check_faces = load_images(lfw, points, limit=64).faces
    root = tmp_path_factory.mktemp("w600k_pkgs")
    cache: dict = {}

    def get(engine: str, precision: str):
        if (engine, precision) not in cache:
            kw: dict = {"check_images": check_faces}
            if precision == "int8":
                # checked on 128 of the 500 faces it holds out (enough for the floors; keeps the suite fast)
                kw = {"calib": lfw, "calib_landmarks": points, "calib_count": 300, "check_count": 128}
            cache[engine, precision] = build(
                w600k, root / f"{engine}_{precision}", engine=engine, precision=precision, **kw
            )
        return cache[engine, precision]

    return get
