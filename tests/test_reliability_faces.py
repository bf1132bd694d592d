"""Faces in, failing safely: outputs never clobbered, disk full, concurrent and failed runs, stale resumes,
any file name, decompression bombs, implausible landmarks, non-finite model output, calibration = inference."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import arcdeploy
from arcdeploy.cli import main
from arcdeploy.errors import ArcdeployError
from arcdeploy.faces import chunks as chunks_mod
from arcdeploy.faces.align import landmarks_problem
from arcdeploy.faces.calibration import load_images
from arcdeploy.faces.chunks import ChunkStore, failures_path_for, parts_dir_for, read_failures, write_failures
from arcdeploy.faces.io import DEFAULT_MAX_PIXELS, image_size, read_image
from arcdeploy.faces.landmarks import read_landmarks
from arcdeploy.faces.pipeline import embed_files, embed_images
from arcdeploy.faces.prepare import prepare_face
from arcdeploy.faces.types import Failure
from arcdeploy.files import FileLock
from arcdeploy.synthetic import draw_face

REAL = (Path(__file__).resolve().parents[1] / ".." / "shared" / "real").resolve()
N = 6


@pytest.fixture(scope="module")
def pkg(r18_ort_fp32_pkg):
    return arcdeploy.load(r18_ort_fp32_pkg)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N loose-crop PNGs and their landmark file."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(N):
        img, lm = draw_face(i % 3, i, size=160)
        cv2.imwrite(str(root / f"{i}.png"), img[..., ::-1])
        rows.append(f"{i}.png " + " ".join(f"{v:.3f}" for v in lm.ravel()))
    (root / "lmk.txt").write_text("\n".join(rows) + "\n")
    return root


def _paths(root):
    return sorted(root.glob("*.png"))


def _embed_args(pkg, root, out, *extra):
    return [
        "embed",
        str(pkg.path),
        "--images",
        str(root),
        "--landmarks",
        str(root / "lmk.txt"),
        "--quiet",
        "--batch",
        "2",
        "--chunk-size",
        "2",
        "-o",
        str(out),
        *extra,
    ]


def _litter(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------- nothing replaced without --force


def test_existing_output_and_failures_file_need_force(pkg, photos, tmp_path, capsys):
    out = tmp_path / "f.npy"
    out.write_bytes(b"mine")
    assert main(_embed_args(pkg, photos, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--force" in err
    assert out.read_bytes() == b"mine"
    assert main(_embed_args(pkg, photos, out, "--force")) == 0
    assert np.load(out).shape == (N, 512)
    # a failures list of an earlier run is not deleted behind the user's back either
    out2 = tmp_path / "g.npy"
    tsv = failures_path_for(out2)
    tsv.write_text("index\tpath\treason\n0\tx.png\tmine\n")
    assert main(_embed_args(pkg, photos, out2)) == 2
    assert str(tsv) in capsys.readouterr().err and tsv.read_text().endswith("mine\n") and not out2.exists()
    assert main(_embed_args(pkg, photos, out2, "--force")) == 0
    assert not tsv.exists()  # no failures this time: the stale list is gone with --force


# ---------------------------------------------------------------- disk full, unwritable


def _good_output(pkg, photos, out):
    embed_files(pkg, _paths(photos), landmarks=photos / "lmk.txt", output=out, batch=2, chunk_rows=2, progress=False)
    return out.read_bytes()


def test_no_space_in_the_final_write_leaves_the_old_output(pkg, photos, tmp_path, monkeypatch):
    out = tmp_path / "f.npy"
    before = _good_output(pkg, photos, out)

    def blocks_then_full(self, bounds, row_shape):
        yield np.zeros((bounds[0][1], *row_shape), np.float32)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ChunkStore, "_blocks", blocks_then_full)
    with pytest.raises(ArcdeployError) as exc:
        embed_files(
            pkg,
            _paths(photos),
            landmarks=photos / "lmk.txt",
            output=out,
            batch=2,
            chunk_rows=2,
            progress=False,
            force=True,
        )
    assert str(exc.value) == f"{out}: cannot write (no space left on device)"
    assert out.read_bytes() == before and _litter(tmp_path) == []
    assert parts_dir_for(out).is_dir()  # the computed chunks are kept: a rerun with space only assembles


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True)
    except OSError as exc:
        pytest.skip(f"cannot run mount ({exc})")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.decode(errors='replace').strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_really_full_disk(pkg, photos, tmp_path, tiny_tmpfs):
    # the flip output (N x 2 x 512 float32, 24 KiB) fits beside its saved chunk, not a second time:
    # the final write runs out of space
    out = tiny_tmpfs / "f.npy"
    out.write_bytes(b"an earlier good result")
    args = _embed_args(pkg, photos, out, "--flip", "--force", "--chunk-size", "6")
    proc = subprocess.run([sys.executable, "-m", "arcdeploy", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err == f"arcdeploy embed: error: {out}: cannot write (no space left on device)"
    assert out.read_bytes() == b"an earlier good result" and _litter(tiny_tmpfs) == []
    assert len(list(parts_dir_for(out).glob("chunk_*.npy"))) == 1  # the work is kept for a rerun with room


# ---------------------------------------------------------------- concurrent and failed runs


def test_a_second_writer_is_refused(pkg, photos, tmp_path):
    out = tmp_path / "f.npy"
    with FileLock(out):
        with pytest.raises(ArcdeployError, match=f"{out}: is being written by another arcdeploy process"):
            embed_files(pkg, _paths(photos), output=out, progress=False)
    assert not parts_dir_for(out).exists()


def test_a_package_that_cannot_load_leaves_no_parts(pkg, photos, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(pkg.path, broken)
    model = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    model.write_bytes(b"not an onnx model")
    out = tmp_path / "f.npy"
    with pytest.raises(ArcdeployError, match="model.onnx: .*cannot load it"):
        embed_files(arcdeploy.load(broken), _paths(photos), output=out, progress=False)
    assert not parts_dir_for(out).exists() and not out.exists()
    # a parts folder that holds no chunk (another job's start) is replaced without a word
    parts = parts_dir_for(out)
    parts.mkdir()
    (parts / "state.json").write_text('{"format": "another job"}')
    res = embed_files(pkg, _paths(photos), landmarks=photos / "lmk.txt", output=out, progress=False)
    assert res.ok and res.features.shape == (N, 512) and not parts.exists()


def test_resume_refuses_an_image_changed_since(pkg, photos, tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    shutil.copytree(photos, root)
    out = tmp_path / "f.npy"
    save = ChunkStore.save

    def save_then_stop(self, *a, **kw):
        save(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ChunkStore, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        embed_files(pkg, _paths(root), landmarks=root / "lmk.txt", output=out, batch=2, chunk_rows=2, progress=False)
    monkeypatch.setattr(ChunkStore, "save", save)
    assert len(list(parts_dir_for(out).glob("chunk_*.npy"))) == 1
    first = _paths(root)[0]
    img = cv2.imread(str(first))
    cv2.imwrite(str(first), 255 - img)  # same name, same size: other content, other mtime
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    with pytest.raises(ArcdeployError, match="different job .*images differ"):
        embed_files(pkg, _paths(root), landmarks=root / "lmk.txt", output=out, batch=2, chunk_rows=2, progress=False)
    fresh = embed_files(
        pkg, _paths(root), landmarks=root / "lmk.txt", output=out, batch=2, chunk_rows=2, progress=False, resume=False
    )
    assert fresh.resumed_rows == 0
    want = embed_images(pkg, [first], landmarks=root / "lmk.txt")
    np.testing.assert_allclose(fresh.features[0], want[0], atol=2e-5)


def test_a_damaged_chunk_is_computed_again(pkg, photos, tmp_path, monkeypatch):
    out = tmp_path / "f.npy"
    ref = embed_files(
        pkg,
        _paths(photos),
        landmarks=photos / "lmk.txt",
        output=tmp_path / "ref.npy",
        batch=2,
        chunk_rows=2,
        progress=False,
    )
    save = ChunkStore.save

    def save_then_stop(self, c, *a, **kw):
        save(self, c, *a, **kw)
        if c == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ChunkStore, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        embed_files(
            pkg, _paths(photos), landmarks=photos / "lmk.txt", output=out, batch=2, chunk_rows=2, progress=False
        )
    monkeypatch.setattr(ChunkStore, "save", save)
    chunk = parts_dir_for(out) / "chunk_000000.npy"
    data = bytearray(chunk.read_bytes())
    data[-2048:] = bytes(2048)  # zeroed on disk: shape and dtype still look right
    chunk.write_bytes(bytes(data))
    res = embed_files(
        pkg, _paths(photos), landmarks=photos / "lmk.txt", output=out, batch=2, chunk_rows=2, progress=False
    )
    assert res.resumed_rows == 2  # chunk 1 reused, chunk 0 recomputed
    assert out.read_bytes() == Path(ref.output).read_bytes()


# ---------------------------------------------------------------- any file name


def test_failures_file_takes_names_that_are_not_utf8(pkg, photos, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"  # Latin-1, not UTF-8
    with open(raw, "wb") as f:
        f.write(b"not a picture at all\n")
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"".join(os.fsencode(p) + b"\n" for p in _paths(photos)) + raw + b"\n")
    out = tmp_path / "f.npy"
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")  # a terminal that takes UTF-8 only
    proc = subprocess.run(
        [sys.executable, "-m", "arcdeploy", "embed", str(pkg.path), "--images", str(lst), "-q", "-o", str(out)],
        capture_output=True,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr
    assert b"caf\\xe9.png" in proc.stderr and b"Traceback" not in proc.stderr
    assert np.load(out).shape == (N + 1, 512)
    tsv = failures_path_for(out)
    assert raw in tsv.read_bytes()
    (fail,) = read_failures(tsv)
    assert fail.index == N and os.fsencode(fail.path) == raw and "not an image" in fail.reason


def test_failures_file_escapes_and_round_trips(tmp_path):
    fails = [Failure(0, "a\tb\nc\\d.png", "why\tnot"), Failure(3, os.fsdecode(b"\xff\xfe.jpg"), "x")]
    with open(tmp_path / "f.tsv", "wb") as f:
        write_failures(f, fails)
    lines = (tmp_path / "f.tsv").read_bytes().split(b"\n")
    assert lines[1] == b"0\ta\\tb\\nc\\\\d.png\twhy\\tnot" and lines[2] == b"3\t\xff\xfe.jpg\tx"
    assert read_failures(tmp_path / "f.tsv") == fails


def test_failures_are_written_before_the_output_is_replaced(pkg, photos, tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    shutil.copytree(photos, root)
    out = tmp_path / "f.npy"
    before = _good_output(pkg, root, out)
    (root / "0.png").write_bytes(b"broken")

    def cannot(f, failures):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "a name the list cannot hold")

    monkeypatch.setattr(chunks_mod, "write_failures", cannot)
    with pytest.raises(UnicodeEncodeError):
        embed_files(pkg, _paths(root), landmarks=root / "lmk.txt", output=out, progress=False, force=True)
    assert out.read_bytes() == before and not failures_path_for(out).exists() and _litter(tmp_path) == []


# ---------------------------------------------------------------- decompression bombs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h RGB pixels; its data is a few compressed rows of zeros (under 1 KB)."""
    rows = zlib.compress(b"\0" * (1 + 3 * w) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def test_huge_images_are_refused_before_decoding(pkg, tmp_path, monkeypatch, faces16):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(32000, 32000))
    assert bomb.stat().st_size < 1 << 20
    assert image_size(bomb.read_bytes()) == ("PNG", (32000, 32000))
    got = embed_files(pkg, [bomb], progress=False)
    (fail,) = got.failures
    assert "32000x32000" in fail.reason and "1024.0 megapixels" in fail.reason
    assert "limit of 50 megapixels" in fail.reason
    # the limit is a parameter and an environment variable
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), faces16[0])
    assert read_image(small).shape == (112, 112, 3)
    with pytest.raises(ArcdeployError, match="112x112 is 0.0 megapixels, above the limit"):
        read_image(small, max_pixels=10_000)
    monkeypatch.setenv("ARCDEPLOY_MAX_PIXELS", "10000")
    assert "above the limit" in embed_files(pkg, [small], progress=False).failures[0].reason
    monkeypatch.setenv("ARCDEPLOY_MAX_PIXELS", "lots")
    with pytest.raises(ArcdeployError, match="ARCDEPLOY_MAX_PIXELS='lots': not a number"):
        read_image(small)
    assert DEFAULT_MAX_PIXELS == 50_000_000


@pytest.mark.parametrize(
    "ext,params",
    [
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".png", []),
        (".bmp", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    ],
)
def test_header_sizes_equal_decoded_sizes(ext, params):
    img = np.random.default_rng(0).integers(0, 255, (53, 77, 3), dtype=np.uint8)
    data = cv2.imencode(ext, img, params)[1].tobytes()
    kind, size = image_size(data)
    assert size == (77, 53), kind


def test_header_sizes_of_real_photos():
    if not REAL.is_dir():
        pytest.skip(f"real test material not found at {REAL}")
    files = sorted((REAL / "faces").rglob("*.jpg"))[::40] + sorted((REAL / "faces" / "photos").rglob("*.*"))
    files = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")]
    assert files
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        kind, size = image_size(f.read_bytes())
        assert size in ((img.shape[1], img.shape[0]), (img.shape[0], img.shape[1])), f  # EXIF may rotate


# ---------------------------------------------------------------- implausible landmarks, tiny crops


def test_implausible_landmarks_are_refused():
    img, lm = draw_face(1, 0, size=200)
    assert landmarks_problem(lm, img.shape) is None
    far = lm.copy()
    far[3:] = 1e9  # 2 of 5 points far off: accepted before, gave a black crop
    assert "2 of 5 points" in landmarks_problem(far, img.shape)
    clump = np.array([[100, 100], [101, 100.5], [100.5, 101], [101.2, 100.2], [100.3, 100.9]])
    assert "degenerate" in landmarks_problem(clump, img.shape)
    near_eyes = lm.copy()
    near_eyes[1] = near_eyes[0] + [2.0, 0.0]
    assert "eyes 2.0 px apart" in landmarks_problem(near_eyes, img.shape)
    # points within the margin but spread so wide the crop would cover far more than the image
    wide = np.array([[-95, -90], [295, -90], [100, 120], [-95, 290], [295, 290]], np.float32)
    assert "implausible" in landmarks_problem(wide, img.shape)
    # a few points just outside the image (a face cut by the border) stay acceptable
    edge = lm - lm.min(axis=0) - 10
    assert landmarks_problem(edge, img.shape) is None


def test_every_real_landmark_row_is_accepted():
    if not REAL.is_dir():
        pytest.skip(f"real test material not found at {REAL}")
    for table, folder in (("lfw_5pts.txt", "lfw"), ("photos_5pts.txt", "photos")):
        lmk = read_landmarks(REAL / "faces" / table)
        for name, pts in zip(lmk.names, lmk.points):
            shape = read_image(REAL / "faces" / folder / name).shape
            assert landmarks_problem(pts, shape) is None, (name, landmarks_problem(pts, shape))


def test_tiny_images_are_not_aligned_crops(pkg):
    one = np.zeros((1, 1, 3), np.uint8)
    with pytest.raises(ArcdeployError, match=r"1x1: too small to be taken as an aligned face crop \(at least 32x32"):
        embed_images(pkg, [one])
    assert embed_images(pkg, [np.full((32, 32, 3), 90, np.uint8)]).shape == (1, 512)


# ---------------------------------------------------------------- non-finite model output


def test_non_finite_model_rows_are_failures(pkg, faces16, tmp_path, monkeypatch):
    infer = pkg.infer

    def sometimes_nan(crops):
        out = infer(crops)
        out[crops[:, 56, 56, 0] == 1] = np.nan  # the rows of image 2 and 5, marked by one pixel
        out[crops[:, 56, 56, 0] == 2] = np.inf
        return out

    faces = faces16[:8].copy()
    faces[2, 56, 56, 0], faces[5, 56, 56, 0] = 1, 2
    faces[[0, 1, 3, 4, 6, 7], 56, 56, 0] = 100
    monkeypatch.setattr(pkg, "infer", lambda crops: sometimes_nan(crops))
    with pytest.raises(ArcdeployError, match=r"<array 2>: the model gave a non-finite embedding \(and 1 more\)"):
        embed_images(pkg, faces, batch=3)
    got = embed_images(pkg, faces, batch=3, on_error="nan")
    assert np.isnan(got[[2, 5]]).all() and np.isfinite(got[[0, 1, 3, 4, 6, 7]]).all()
    paths = []
    for i, f in enumerate(faces):
        cv2.imwrite(str(tmp_path / f"{i}.png"), f[..., ::-1])
        paths.append(tmp_path / f"{i}.png")
    res = embed_files(pkg, paths, output=tmp_path / "f.npy", batch=3, chunk_rows=3, progress=False)
    assert [(f.index, f.reason) for f in res.failures] == [
        (2, "the model gave a non-finite embedding"),
        (5, "the model gave a non-finite embedding"),
    ]
    assert [f.index for f in read_failures(res.failures_path)] == [2, 5]


# ---------------------------------------------------------------- calibration sees what inference sees


def test_calibration_prepares_faces_as_inference_does(photos, tmp_path):
    lmk = read_landmarks(photos / "lmk.txt")
    bad = tmp_path / "lmk_bad.txt"
    rows = (photos / "lmk.txt").read_text().splitlines()
    rows[1] = "1.png " + " ".join(["5000"] * 10)  # a landmark row far off its image
    bad.write_text("\n".join(rows) + "\n")
    got = load_images(photos, bad)
    assert got.names == [str(p) for p in _paths(photos) if p.name != "1.png"]
    assert len(got.skipped) == 1 and "1.png: landmarks off the image" in got.skipped[0]
    want = np.stack([prepare_face(p, lmk[p.name]) for p in _paths(photos) if p.name != "1.png"])
    np.testing.assert_array_equal(got.faces, want)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    cv2.imwrite(str(tiny / "t.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tiny / "u.png"), np.zeros((112, 112, 3), np.uint8))
    assert "too small" in load_images(tiny).skipped[0]
