"""Raw photos in: a real detector (SCRFD-500M, YuNet) feeding alignment and a real trained network
(mbf_w600k_gdc.pth) in one pass: embed / compare / build --calib-detector, one row per face, failures,
resuming."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import arcdeploy
from arcdeploy.cli import main
from arcdeploy.errors import ArcdeployError
from arcdeploy.faces.calibration import load_images
from arcdeploy.faces.chunks import (
    ChunkStore,
    FaceRow,
    faces_path_for,
    failures_path_for,
    parts_dir_for,
    read_faces_index,
    read_failures,
)
from arcdeploy.faces.detectors import open_detector
from arcdeploy.faces.io import list_images, read_image
from arcdeploy.faces.landmarks import read_landmarks
from arcdeploy.faces.pipeline import embed_files
from arcdeploy.faces.prepare import Detection, prepare_image

REAL = (Path(__file__).resolve().parents[1] / ".." / "shared" / "real").resolve()
CKPT = REAL / "models" / "mbf_w600k_gdc.pth"
SCRFD = REAL / "models" / "scrfd_500m_kps.onnx"
YUNET = REAL / "models" / "yunet_2023mar_int8bq.onnx"
RECOGNITION = REAL / "models" / "w600k_mbf.onnx"
PHOTOS = REAL / "faces" / "photos"
PHOTO_POINTS = REAL / "faces" / "photos_5pts.txt"
LFW = REAL / "faces" / "lfw"
LFW_POINTS = REAL / "faces" / "lfw_5pts.txt"  # the session's mbf packages are checked on LFW faces

needs_real = pytest.mark.skipif(
    not all(p.exists() for p in (CKPT, SCRFD, YUNET, RECOGNITION, PHOTO_POINTS, LFW, LFW_POINTS)),
    reason=f"real networks, detectors and photos not found at {REAL}",
)
pytestmark = [pytest.mark.slow, needs_real]  # real networks and photos, built packages

DETECTORS = {"scrfd": SCRFD, "yunet": YUNET}
# photo pasted on a 1000 x 600 canvas: side, top-left corner (largest first)
PASTED = [
    ("Barack_Obama/Barack_Obama_portrait.jpg", 240, (40, 60)),
    ("Jacinda_Ardern/Jacinda_Ardern_2018.jpg", 170, (380, 300)),
    ("Rishi_Sunak/Rishi_Sunak_portrait.jpg", 130, (650, 80)),
    ("Isaac_Newton/Isaac_Newton_painting.png", 100, (850, 420)),
]


def _identity(path) -> str:
    return Path(path).parent.name


def _separation(feats, paths) -> tuple[float, float]:
    """(lowest same-person cosine, highest different-person cosine)."""
    ids = np.array([_identity(p) for p in paths])
    cos = feats @ feats.T
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    return float(cos[same].min()), float(cos[ids[:, None] != ids[None]].max())


@pytest.fixture(scope="module")
def pkg(real_packages):
    """The real trained mbf as an OpenVINO fp32 package: the session's (conftest.py; no test here
    writes into it)."""
    return arcdeploy.load(real_packages("openvino", "fp32"))


@pytest.fixture(scope="module")
def photo_paths():
    paths = list_images(PHOTOS)
    assert len(paths) == 12 and len({_identity(p) for p in paths}) == 8
    return paths


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Four real faces of four people, cut around their reference points, scaled to four sizes and
    pasted on a noisy canvas. Returns the image's path and the pasted squares (largest first)."""
    reference = read_landmarks(PHOTO_POINTS)
    rng = np.random.default_rng(0)
    canvas = rng.normal(128, 20, (600, 1000, 3)).clip(0, 255).astype(np.uint8)
    squares = []
    for name, side, (x, y) in PASTED:
        photo = read_image(PHOTOS / name)
        pts = reference[name]
        centre = pts.mean(axis=0)
        half = 2.2 * np.linalg.norm(pts[0] - pts[1])
        x0, y0 = int(centre[0] - half), int(centre[1] - half)
        crop = photo[max(y0, 0) : y0 + int(2 * half), max(x0, 0) : x0 + int(2 * half)]
        canvas[y : y + side, x : x + side] = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        squares.append((x, y, x + side, y + side))
    path = tmp_path_factory.mktemp("group") / "group.png"
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return path, squares


def _no_face_image(path: Path) -> Path:
    rng = np.random.default_rng(5)
    img = np.full((300, 400, 3), 120, np.uint8)
    img[100:200] = rng.integers(0, 256, (100, 400, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)
    return path


def _square_of(box, squares):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hits = [i for i, (x1, y1, x2, y2) in enumerate(squares) if x1 < cx < x2 and y1 < cy < y2]
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------ recognition through the detector


@pytest.mark.parametrize("kind", ["scrfd", "yunet"])
def test_same_person_above_different_person(kind, pkg, photo_paths):
    feats = pkg.embed(photo_paths, detector=DETECTORS[kind])  # the Python API: one row per photo
    assert feats.shape == (12, 512) and np.isfinite(feats).all()
    lowest_same, highest_different = _separation(feats, photo_paths)
    assert lowest_same > highest_different, (kind, lowest_same, highest_different)


def test_detector_rows_match_the_reference_landmark_rows(pkg, tmp_path):
    # the reference points came from SCRFD-500M too, mapped back with one scale for both axes (up to
    # 0.2% off in one axis here): rows agree closely, not bit for bit
    det, lmk = tmp_path / "det.npy", tmp_path / "lmk.npy"
    assert main(["embed", str(pkg.path), "--images", str(PHOTOS), "--detector", str(SCRFD), "-q", "-o", str(det)]) == 0
    assert (
        main(["embed", str(pkg.path), "--images", str(PHOTOS), "--landmarks", str(PHOTO_POINTS), "-q", "-o", str(lmk)])
        == 0
    )
    a, b = np.load(det), np.load(lmk)
    assert a.shape == b.shape == (12, 512)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.99, cos
    assert not faces_path_for(det).exists()  # the row index is written for --all-faces only


def test_compare_with_a_detector(pkg, capsys):
    args = ["compare", str(pkg.path), "--detector", str(SCRFD)]
    macron = PHOTOS / "Emmanuel_Macron"
    same = (macron / "Emmanuel_Macron_2014.jpg", macron / "Emmanuel_Macron_2025.jpg")
    different = (macron / "Emmanuel_Macron_2014.jpg", PHOTOS / "Rishi_Sunak" / "Rishi_Sunak_portrait.jpg")
    assert main([*args, *map(str, same)]) == 0
    same_score = float(capsys.readouterr().out)
    assert main([*args, *map(str, different)]) == 0
    different_score = float(capsys.readouterr().out)
    assert same_score > different_score
    # the same number as embedding both through the API
    fa, fb = pkg.embed(list(same), detector=SCRFD)
    assert same_score == pytest.approx(arcdeploy.compare(fa, fb), abs=1e-5)


# ------------------------------------------------------------------ one row per face


def test_group_photo_one_row_per_face(pkg, group, photo_paths, tmp_path, capsys):
    path, squares = group
    folder = path.parent
    out = tmp_path / "all.npy"
    code = main(
        ["embed", str(pkg.path), "--images", str(folder), "--detector", str(SCRFD), "--all-faces", "-q", "-o", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    feats = np.load(out)
    index = read_faces_index(faces_path_for(out))
    assert feats.shape == (len(squares), 512) and len(index) == len(squares)
    assert [r.image for r in index] == [0] * len(squares) and [r.face for r in index] == list(range(len(squares)))
    assert all(r.path == str(path) for r in index)
    # each row's box lies on a pasted face, largest first, and the row is that person's face:
    # closest to the face found in the photo it was cut from
    sources = pkg.embed([PHOTOS / name for name, _, _ in PASTED], detector=SCRFD)
    for row, r in enumerate(index):
        k = _square_of(r.box, squares)
        assert k == row, (row, r.box)
        assert int(np.argmax(sources @ feats[row])) == k

    # without --all-faces: one row, the largest face's
    best = tmp_path / "best.npy"
    assert main(["embed", str(pkg.path), "--images", str(folder), "--detector", str(SCRFD), "-q", "-o", str(best)]) == 0
    np.testing.assert_allclose(np.load(best), feats[:1], atol=1e-5)

    # the API gives the same rows and index
    res = embed_files(pkg, [path], detector=SCRFD, all_faces=True, progress=False)
    np.testing.assert_allclose(res.features, feats, atol=1e-5)
    assert [(r.image, r.face) for r in res.faces] == [(r.image, r.face) for r in index]
    np.testing.assert_allclose([r.box for r in res.faces], [r.box for r in index], atol=0.006)


def test_image_without_a_face_is_a_failed_row(pkg, photo_paths, tmp_path, capsys):
    empty = _no_face_image(tmp_path / "no_face.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo_paths[0]}\n{empty}\n{photo_paths[1]}\n")
    out = tmp_path / "f.npy"
    code = main(["embed", str(pkg.path), "--images", str(listing), "--detector", str(SCRFD), "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 3
    feats = np.load(out)
    assert feats.shape == (3, 512)
    assert np.isnan(feats[1]).all() and np.isfinite(feats[[0, 2]]).all()
    reason = "no face found (detector scrfd_500m_kps.onnx, threshold 0.5)"
    (fail,) = read_failures(failures_path_for(out))
    assert fail.index == 1 and fail.path == str(empty) and fail.reason == reason
    assert "no_face.png" in err and reason in err

    # --all-faces: no row for it; still listed, still exit 3; the threshold named is the one used
    out2 = tmp_path / "g.npy"
    code = main(
        [
            "embed",
            str(pkg.path),
            "--images",
            str(listing),
            "--detector",
            str(SCRFD),
            "--all-faces",
            "--det-threshold",
            "0.6",
            "-q",
            "-o",
            str(out2),
        ]
    )
    assert code == 3
    np.testing.assert_allclose(np.load(out2), feats[[0, 2]], atol=1e-5)
    assert [r.image for r in read_faces_index(faces_path_for(out2))] == [0, 2]
    (fail,) = read_failures(failures_path_for(out2))
    assert fail.index == 1 and "threshold 0.6" in fail.reason

    # the API raises, naming the image, unless asked for NaN rows
    with pytest.raises(ArcdeployError, match="no_face.png: no face found"):
        pkg.embed([photo_paths[0], empty], detector=SCRFD)


# The CLI in a child process whose chunk store kills the process (SIGKILL: no cleanup of any kind)
# right after its k-th chunk is saved; k = 0 runs the plain CLI.
KILLED_AFTER_CHUNKS = """
import os, signal, sys
from arcdeploy.cli import main
from arcdeploy.faces import chunks

k, saved, save = int(sys.argv[1]), [0], chunks.ChunkStore.save

def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    saved[0] += 1
    if saved[0] >= k:
        os.kill(os.getpid(), signal.SIGKILL)

if k:
    chunks.ChunkStore.save = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_all_faces_resume_after_kill_is_bit_identical(pkg, group, photo_paths, tmp_path):
    path, squares = group
    images = [
        photo_paths[0],
        path,
        photo_paths[3],
        _no_face_image(tmp_path / "blank.png"),
        photo_paths[5],
        path,
        photo_paths[7],
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images))

    def cmd(out, kill_after=0):
        return [
            sys.executable,
            "-c",
            KILLED_AFTER_CHUNKS,
            str(kill_after),
            "embed",
            str(pkg.path),
            "--images",
            str(listing),
            "--detector",
            str(SCRFD),
            "--all-faces",
            "--batch",
            "2",
            "--chunk-size",
            "2",
            "-q",
            "-o",
            str(out),
        ]

    full = tmp_path / "full.npy"
    ref = subprocess.run(cmd(full), capture_output=True, text=True)
    assert ref.returncode == 3, ref.stderr  # the blank image
    rows = 4 + 2 * len(squares)  # four photos of one face, the group twice
    assert np.load(full).shape == (rows, 512)

    out = tmp_path / "resumed.npy"
    killed = subprocess.run(cmd(out, kill_after=2), capture_output=True, text=True)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr
    parts = parts_dir_for(out)
    assert sorted(p.name for p in parts.glob("chunk_*.npy")) == ["chunk_000000.npy", "chunk_000001.npy"]
    assert not out.exists()
    # chunk 0 holds the photo's face and the group's four: its record carries which row is which
    first = ChunkStore(parts, {}).load(0, None)
    assert first is not None and len(first.features) == 1 + len(squares)
    assert [(r.image, r.face) for r in first.faces] == [(0, 0)] + [(1, k) for k in range(len(squares))]

    # another job's settings are refused (here: one row per image instead of per face)
    with pytest.raises(ArcdeployError, match="different job"):
        embed_files(pkg, images, detector=SCRFD, batch=2, chunk_rows=2, output=out, progress=False)

    done = subprocess.run(cmd(out), capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "4 resumed" in done.stdout
    assert out.read_bytes() == full.read_bytes()
    assert faces_path_for(out).read_bytes() == faces_path_for(full).read_bytes()
    assert failures_path_for(out).read_bytes() == failures_path_for(full).read_bytes()
    assert not parts.exists()
    index = read_faces_index(faces_path_for(out))
    assert [r.image for r in index] == [0, 1, 1, 1, 1, 2, 4, 5, 5, 5, 5, 6]


def test_saved_chunk_with_a_row_index_that_does_not_fit_is_recomputed(tmp_path):
    store = ChunkStore.open(tmp_path / "f.npy", {"job": 1})
    faces = [FaceRow(0, "a.jpg", 0, (1.0, 2.0, 3.0, 4.0), 0.9), FaceRow(0, "a.jpg", 1, (5.0, 6.0, 7.0, 8.0), 0.8)]
    store.save(0, np.ones((2, 4), np.float32), [], faces)
    got = store.load(0, None)
    assert got is not None and got.faces == faces and got.features.shape == (2, 4)
    assert store.load(0, 3) is None  # a per-image job expecting 3 rows
    store.save(1, np.ones((2, 4), np.float32), [])
    assert store.load(1, None) is None  # no row index: not a chunk of faces
    with pytest.raises(ValueError, match="row index"):
        store.save(2, np.ones((3, 4), np.float32), [], faces)


# ------------------------------------------------------------------ calibration through the detector


def test_calibration_crops_are_the_embed_crops(photo_paths):
    detector = open_detector(SCRFD, threads=1)
    got = load_images(PHOTOS, detector=detector)
    want = np.concatenate([prepare_image(p, detection=Detection(detector)).crops for p in photo_paths])
    np.testing.assert_array_equal(got.faces, want)
    # LFW's tight grayscale crops need the detector's second try inside a border
    lfw = load_images(LFW, detector=detector, limit=8)
    assert len(lfw.faces) == 8 and not lfw.skipped


def test_int8_build_calibrated_through_the_detector(tmp_path, photo_paths):
    # 48 faces found by the detector calibrate (the 12 photos and 36 LFW crops), 32 more check: what
    # this test is about is the detector's crops reaching the calibration (a wrong crop shows as a low
    # cosine on the held-out faces and as people no longer told apart); NNCF's statistics cost about
    # 0.09 s a face, so the 100 of before cost some 5 s more for the same assertions
    calib = tmp_path / "calib.txt"
    lfw = list_images(LFW)[:68]
    calib.write_text("".join(f"{p}\n" for p in [*photo_paths, *lfw]))
    out = arcdeploy.build(
        CKPT, tmp_path / "int8", engine="openvino", precision="int8", calib=calib, calib_detector=SCRFD, calib_count=48
    )
    pkg = arcdeploy.load(out)
    cal = pkg.manifest.calibration.to_json()
    assert cal["count"] == 48 and "SCRFD scrfd_500m_kps.onnx" in cal["preprocessing"]
    assert not cal.get("skipped")  # every photo and LFW crop had a face
    fid = pkg.manifest.fidelity.to_json()
    assert "held-out" in fid["images"] and fid["cosine"]["n"] == 32
    assert fid["cosine"]["mean"] > 0.97  # int8 against fp32 on held-out detected faces
    feats = pkg.embed(photo_paths, detector=SCRFD)
    lowest_same, highest_different = _separation(feats, photo_paths)
    assert lowest_same > highest_different, (lowest_same, highest_different)


# ------------------------------------------------------------------ errors


def test_errors_are_one_line(pkg, photo_paths, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    embed = ["embed", str(pkg.path), "--images", str(PHOTOS / "Barack_Obama"), "-q", "-o", str(tmp_path / "f.npy")]
    cases = [
        ([*embed, "--detector", str(RECOGNITION)], ["not a face detector", "[N,512]", "recognition model"]),
        ([*embed, "--detector", str(garbage)], ["garbage.onnx", "not an ONNX model"]),
        ([*embed, "--detector", str(CKPT)], ["mbf_w600k_gdc.pth", "not an ONNX face detector"]),
        ([*embed, "--detector", str(SCRFD), "--landmarks", str(PHOTO_POINTS)], ["--landmarks and --detector"]),
        ([*embed, "--all-faces"], ["--all-faces needs --detector"]),
        ([*embed, "--detector", str(SCRFD), "--det-threshold", "1.5"], ["--det-threshold"]),
        (
            [
                "compare",
                str(pkg.path),
                str(photo_paths[0]),
                str(photo_paths[1]),
                "--detector",
                str(SCRFD),
                "--landmarks",
                str(PHOTO_POINTS),
            ],
            ["--landmarks and --detector"],
        ),
        (
            [
                "build",
                str(CKPT),
                "--precision",
                "int8",
                "--calib",
                str(PHOTOS),
                "--calib-landmarks",
                str(PHOTO_POINTS),
                "--calib-detector",
                str(SCRFD),
                "-o",
                str(tmp_path / "p"),
            ],
            ["--calib-landmarks and --calib-detector"],
        ),
    ]
    for args, words in cases:
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2, args
        assert len(err.splitlines()) == 1, err
        for w in words:
            assert w in err, err
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "p").exists()
    with pytest.raises(ArcdeployError, match="exclude each other"):
        pkg.embed(photo_paths[:1], landmarks=PHOTO_POINTS, detector=SCRFD)


def test_existing_faces_index_needs_force(pkg, tmp_path, capsys):
    out = tmp_path / "f.npy"
    faces_path_for(out).write_text("mine\n")
    args = [
        "embed",
        str(pkg.path),
        "--images",
        str(PHOTOS / "Barack_Obama"),
        "--detector",
        str(SCRFD),
        "--all-faces",
        "-q",
        "-o",
        str(out),
    ]
    assert main(args) == 2
    assert str(faces_path_for(out)) in capsys.readouterr().err and not out.exists()
    assert faces_path_for(out).read_text() == "mine\n"
    assert main([*args, "--force"]) == 0
    assert len(read_faces_index(faces_path_for(out))) == 1
