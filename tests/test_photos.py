"""Photos in: EXIF orientation, insightface's detection geometry, reduced JPEG decodes, JPEG planes, batched detection.

The real photos and SCRFD-500M come from the shared material (skipped with the reason when absent);
the 12 MP and group photos are made from them in a temporary folder (benchmarks/_photo_sets.py)."""

from __future__ import annotations

import os
import struct
import sys
import zlib
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest

from arcdeploy.faces.io import decode_image, jpeg_orientation
from arcdeploy.faces.jpeg_planes import decode_planes, planes_available
from arcdeploy.faces.types import DecodedImage
from real_material import FACES, MODELS, needs_real

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRFD = MODELS / "scrfd_500m_kps.onnx"
PHOTOS = FACES / "photos"

# the stored pixels of an upright image for each EXIF orientation (what a camera writes)
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def exif_tiff(orientation: int, big_endian: bool = False) -> bytes:
    """A minimal EXIF (TIFF) block holding one tag: Orientation."""
    e = ">" if big_endian else "<"
    head = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    ifd = struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
    return head + ifd


def with_orientation(encoded: bytes, orientation: int, big_endian: bool = False) -> bytes:
    """JPEG or PNG bytes with an EXIF orientation tag written in (APP1 after SOI; eXIf after IHDR)."""
    tiff = exif_tiff(orientation, big_endian)
    if encoded[:2] == b"\xff\xd8":
        body = b"Exif\0\0" + tiff
        return encoded[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + encoded[2:]
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n"
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    return encoded[:33] + chunk + encoded[33:]


def encode(rgb: np.ndarray, ext: str = ".jpg", quality: int = 95) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    return cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)[1].tobytes()


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_imread_applies_it(tmp_path, ext, orientation):
    rng = np.random.default_rng(orientation)
    upright = cv2.resize(rng.integers(0, 255, (7, 11, 3), dtype=np.uint8), (99, 63), interpolation=cv2.INTER_NEAREST)
    data = with_orientation(encode(STORED[orientation](upright), ext), orientation, big_endian=orientation % 2 == 0)
    path = tmp_path / f"o{orientation}{ext}"
    path.write_bytes(data)
    got = decode_image(data, path)
    imread = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert got.shape == upright.shape and np.array_equal(got, imread)
    # upright: the stored pixels (decoded as stored) turned the way the tag says, exactly
    as_stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(STORED[orientation](got), cv2.cvtColor(as_stored, cv2.COLOR_BGR2RGB))
    if ext == ".jpg":
        assert jpeg_orientation(data) == orientation


def test_orientation_reader_survives_broken_exif():
    plain = encode(np.zeros((16, 16, 3), np.uint8))
    assert jpeg_orientation(plain) == 1
    broken = plain[:2] + b"\xff\xe1\x00\x10Exif\0\0II*\0\xff\xff\xff\x7f" + plain[2:]
    assert jpeg_orientation(broken) == 1
    assert jpeg_orientation(with_orientation(plain, 9)) == 1  # out of range: as stored


# ---------------------------------------------------------------- JPEG decoding (libjpeg-turbo, OpenCV's pixels)


def _opencv(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _jpeg_variants() -> dict[str, bytes]:
    """Every chroma subsampling OpenCV writes, progressive, restart markers, grayscale, odd sizes."""
    rng = np.random.default_rng(7)
    # smooth colour with sharp edges: chroma upsampling and the IDCT both show in the pixels
    small = rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)
    img = cv2.resize(small, (205, 147), interpolation=cv2.INTER_CUBIC)
    img[40:60, 30:180] = (250, 10, 120)
    out = {}
    for sampling in ("411", "420", "422", "440", "444"):
        flag = getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}")
        out[f"4:{sampling[1]}:{sampling[2]}"] = cv2.imencode(
            ".jpg", img, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, flag, cv2.IMWRITE_JPEG_QUALITY, 90]
        )[1].tobytes()
    out["progressive"] = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    out["restart markers"] = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_RST_INTERVAL, 3])[1].tobytes()
    out["grayscale"] = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))[1].tobytes()
    out["1x1"] = cv2.imencode(".jpg", img[:1, :1])[1].tobytes()
    return out


JPEG_VARIANTS = _jpeg_variants()


@pytest.mark.parametrize("variant", list(JPEG_VARIANTS))
def test_jpeg_decoder_gives_opencvs_pixels(variant):
    from arcdeploy.faces.io import _turbo_jpeg, decode_reduced

    data = JPEG_VARIANTS[variant]
    bgr = _turbo_jpeg(data, bgr=True)
    assert bgr is not None, "libjpeg-turbo (simplejpeg) declined a plain JPEG"
    assert np.array_equal(bgr, _opencv(data))
    assert np.array_equal(decode_image(data, variant), cv2.cvtColor(_opencv(data), cv2.COLOR_BGR2RGB))
    assert np.array_equal(decode_reduced(data, variant).pixels, _opencv(data))


def test_jpeg_decoder_leaves_what_it_cannot_do_to_opencv():
    from PIL import Image

    from arcdeploy.faces.io import ImageError, _turbo_jpeg

    rgb = cv2.resize(np.random.default_rng(3).integers(0, 255, (5, 7, 3), dtype=np.uint8), (70, 50))
    buf = BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    cmyk = buf.getvalue()
    assert _turbo_jpeg(cmyk, bgr=False) is None  # OpenCV converts CMYK itself
    assert np.array_equal(decode_image(cmyk, "cmyk.jpg"), cv2.cvtColor(_opencv(cmyk), cv2.COLOR_BGR2RGB))
    cut = encode(cv2.resize(rgb, (280, 200)))
    cut = cut[: len(cut) // 2]  # the scan cut off: libjpeg only warns (and greys the rest)
    assert _turbo_jpeg(cut, bgr=False) is None
    with pytest.raises(ImageError, match=r"cut\.jpg: (truncated|corrupt) JPEG"):
        decode_image(cut, "cut.jpg")


@needs_real("faces/photos", "faces/lfw_colour", "faces/lfw")
def test_jpeg_decoder_gives_opencvs_pixels_on_real_photos():
    from arcdeploy.faces.io import _turbo_jpeg

    lfw = sorted((FACES / "lfw").rglob("*.jpg"))[::40]
    colour = sorted((FACES / "lfw_colour").rglob("*.jpg"))[::40]
    files = [*sorted(PHOTOS.rglob("*.jpg")), *lfw, *colour]
    assert len(files) > 40
    for path in files:
        data = path.read_bytes()
        assert np.array_equal(_turbo_jpeg(data, bgr=True), _opencv(data)), path


@needs_real("models/scrfd_500m_kps.onnx", "faces/photos")
def test_sideways_real_photo_is_seen_upright(tmp_path):
    from arcdeploy.faces.detectors import open_detector

    src = PHOTOS / "Jacinda_Ardern" / "Jacinda_Ardern_2018.jpg"
    upright = decode_image(src.read_bytes(), src)
    detector = open_detector(SCRFD, threads=1)
    want = detector.best(upright)
    for orientation in (3, 6, 8):
        data = with_orientation(encode(STORED[orientation](upright), quality=97), orientation)
        (tmp_path / "sideways.jpg").write_bytes(data)
        got = decode_image(data, "sideways.jpg")
        assert got.shape == upright.shape
        face = detector.best(got)
        iod = np.linalg.norm(want.points[1] - want.points[0])
        assert np.abs(face.points - want.points).max() < 0.02 * iod, orientation


# ---------------------------------------------------------------- the same faces as insightface


def _insightface():
    pytest.importorskip("skimage", reason="scikit-image (insightface's norm_crop) is needed for the comparison")
    sys.path.insert(0, str(BENCHMARKS))
    import _insightface_loop

    return _insightface_loop


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """The real photos, a 3000x2171 group photo and the 12 MP set, made once per module."""
    sys.path.insert(0, str(BENCHMARKS))
    from _photo_sets import group_photo, twelve_mp_set
    from arcdeploy.faces.io import list_images

    folder = tmp_path_factory.mktemp("photo_sets")
    return {
        "photos": list_images(PHOTOS),
        "group": [group_photo(FACES.parent, folder / "group.jpg")],
        "12mp": twelve_mp_set(FACES.parent, folder / "12mp"),
    }


@pytest.fixture(scope="module")
def w600k_fp32(w600k_packages):
    import arcdeploy

    return arcdeploy.load(w600k_packages("onnxruntime", "fp32"))


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_faces(ref_boxes, got_boxes, min_iou: float = 0.9) -> list[tuple[int, int]]:
    """Pairs (reference face, found face) with box IoU >= ``min_iou``, each face in one pair at most."""
    pairs, used = [], set()
    for i, rb in enumerate(ref_boxes):
        ious = [box_iou(rb, gb) if j not in used else 0.0 for j, gb in enumerate(got_boxes)]
        if ious and max(ious) >= min_iou:
            j = int(np.argmax(ious))
            used.add(j)
            pairs.append((i, j))
    return pairs


@pytest.mark.slow
@needs_real("models/scrfd_500m_kps.onnx", "models/w600k_mbf.onnx", "faces/photos", "faces/lfw_colour")
@pytest.mark.parametrize("which", ["photos", "group"])
def test_same_faces_landmarks_and_embeddings_as_insightface(photo_sets, w600k_fp32, which):
    """insightface's loop (SCRFD at 640 + norm_crop + ArcFaceONNX) and arcdeploy's embed with an fp32
    package find the same faces, with landmarks within 0.2% (mean) / 0.5% (max) of the inter-ocular
    distance and embeddings at cosine >= 0.998, on the real photos and a 3000x2171 group photo."""
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.pipeline import embed_files
    from arcdeploy.faces.prepare import Detection, prepare_image

    loop = _insightface().InsightfaceLoop(SCRFD, MODELS / "w600k_mbf.onnx", threads=1)
    detection = Detection(open_detector(SCRFD, threads=1), all_faces=True)
    paths = photo_sets[which]
    res = embed_files(w600k_fp32, paths, detector=SCRFD, all_faces=True, progress=False)
    assert not res.failures
    errors, cosines, faces = [], [], 0
    for k, path in enumerate(paths):
        ref = loop.run_file(path)
        got = prepare_image(path, detection=detection).faces
        rows = [r for r in range(len(res.faces)) if res.faces[r].image == k]
        assert len(got) == len(ref) == len(rows), path
        faces += len(ref)
        ref_boxes = [f["bbox"] for f in ref]
        for i, j in match_faces(ref_boxes, [f.box for f in got]):
            iod = np.linalg.norm(ref[i]["kps"][1] - ref[i]["kps"][0])
            errors.append(np.linalg.norm(got[j].points - ref[i]["kps"], axis=1).mean() / iod)
        pairs = match_faces(ref_boxes, [res.faces[r].box for r in rows])
        assert len(pairs) == len(ref), path
        for i, j in pairs:
            e = ref[i]["embedding"] / np.linalg.norm(ref[i]["embedding"])
            cosines.append(float(e @ res.features[rows[j]]))
    assert len(errors) == faces and faces >= (12 if which == "photos" else 100)
    assert np.mean(errors) <= 0.002 and np.max(errors) <= 0.005, (np.mean(errors), np.max(errors))
    assert min(cosines) >= 0.998, min(cosines)


# ---------------------------------------------------------------- reduced JPEG decodes


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_maps_onto_the_full_decode(orientation):
    """Each pixel of a 1/2, 1/4, 1/8 decode is the block of full pixels the mapping says (upright,
    any EXIF orientation, a size that is no multiple of 8): one pixel off in either axis is worse."""
    from arcdeploy.faces.io import decode_reduced

    rng = np.random.default_rng(0)
    h, w = 203, 341
    texture = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 1.5)
    upright = np.clip((texture - texture.mean()) * 4 + 128, 0, 255).astype(np.uint8)
    data = with_orientation(encode(STORED[orientation](upright), quality=100), orientation)
    full = decode_image(data).astype(np.float32)
    for r in (2, 4, 8):
        got = decode_reduced(data, "t.jpg", at_least=lambda fw, fh, r=r: (fw // r - 1, fh // r - 1))
        assert got.reduction == r and got.full_size == (w, h) and got.pixels.shape == (-(-h // r), -(-w // r), 3)
        block = cv2.boxFilter(full, -1, (r, r), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
        errors = {}
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                # the block of reduced pixel i starts at r * i + offset - (r - 1) / 2 (an integer)
                x0 = np.arange(1, got.pixels.shape[1] - 1) * r + round(got.offset[0] - (r - 1) / 2) + dx
                y0 = np.arange(1, got.pixels.shape[0] - 1) * r + round(got.offset[1] - (r - 1) / 2) + dy
                ok_x, ok_y = (x0 >= 0) & (x0 + r <= w), (y0 >= 0) & (y0 + r <= h)
                want = block[y0[ok_y]][:, x0[ok_x]]
                have = got.rgb()[1:-1][ok_y][:, 1:-1][:, ok_x].astype(np.float32)
                errors[(dx, dy)] = float(np.abs(want - have).mean())
        assert min(errors, key=errors.get) == (0, 0), (r, errors)
        assert errors[(0, 0)] < 0.6 * min(v for k, v in errors.items() if k != (0, 0)), (r, errors)


def test_reduced_decode_only_where_it_fits(tmp_path):
    from arcdeploy.faces.io import decode_reduced, reduction_for

    assert reduction_for(4000, 3000, (1280, 960)) == 2
    assert reduction_for(4000, 3000, (500, 375)) == 8
    assert reduction_for(4000, 3000, (1001, 750)) == 2  # 1/4 would give 1000 columns
    assert reduction_for(1000, 800, (1280, 960)) == 1
    big = np.zeros((900, 1300, 3), np.uint8)
    jpeg, png = encode(big), encode(big, ".png")
    fits = lambda w, h: (w // 4, h // 4)  # noqa: E731
    assert decode_reduced(jpeg, "a.jpg", at_least=fits).reduction == 4
    assert decode_reduced(png, "a.png", at_least=fits).reduction == 1  # only JPEG has DCT scaling
    assert decode_reduced(jpeg, "a.jpg").reduction == 1
    assert decode_reduced(jpeg, "a.jpg", at_least=lambda w, h: None).reduction == 1
    tagged = with_orientation(jpeg, 6)
    got = decode_reduced(tagged, "a.jpg", at_least=fits)
    assert got.full_size == (900, 1300) and got.pixels.shape == (325, 225, 3)


@pytest.mark.slow
@needs_real("models/scrfd_500m_kps.onnx", "models/w600k_mbf.onnx", "faces/photos", "faces/lfw_colour")
def test_reduced_decode_against_full_decode(photo_sets, w600k_fp32):
    """decode="reduced" on the real photos (none is large enough: the same result), a group photo
    (small faces: decoded again in full, the same result) and 12 MP JPEGs (large faces aligned from
    the 1/2 decode): crops from the reduced decode lose nothing against the full decode's (same
    points: cosine >= 0.999), and what the reduced detection costs stays within what is documented."""
    from arcdeploy.faces.align import to_aligned
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.prepare import Detection, find_faces, prepare_image

    full = Detection(open_detector(SCRFD, threads=1), all_faces=True)
    reduced = Detection(open_detector(SCRFD, threads=1, decode="reduced"), all_faces=True)

    def unit(x):
        x = w600k_fp32.infer(x)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    for which in ("photos", "group"):
        for path in photo_sets[which]:
            a, b = prepare_image(path, detection=full), prepare_image(path, detection=reduced)
            assert np.array_equal(a.crops, b.crops), path
    errors, cosines, crop_cosines = [], [], []
    for path in photo_sets["12mp"]:
        (f,), (r,) = find_faces([(path, str(path))], full), find_faces([(path, str(path))], reduced)
        assert f.image.reduction == 1 and len(r.faces) == len(f.faces)
        if r.image.reduction == 1:  # a face too small for the 1/2 decode: decoded again in full
            assert np.array_equal(r.faces[0].points, f.faces[0].points), path
            continue
        assert r.image.reduction == 2
        ff, rf = f.faces[0], r.faces[0]
        iod = np.linalg.norm(ff.points[1] - ff.points[0])
        errors.append(np.linalg.norm(rf.points - ff.points, axis=1).mean() / iod)
        full_crop = f.image.in_rgb(to_aligned(f.image.pixels, ff.points))
        same_points = r.image.in_rgb(to_aligned(r.image.pixels, r.image.from_full(ff.points)))
        own_points = prepare_image(path, detection=reduced).crops[0]
        e = unit(np.stack([full_crop, same_points, own_points]))
        crop_cosines.append(float(e[0] @ e[1]))
        cosines.append(float(e[0] @ e[2]))
    assert len(cosines) >= 8 and min(crop_cosines) >= 0.999, crop_cosines
    # the reduced decode's detection: a few tenths of a canvas pixel (README: 0.13% / 0.46%, 0.989)
    assert np.mean(errors) <= 0.003 and np.max(errors) <= 0.008, errors
    assert min(cosines) >= 0.98 and np.mean(cosines) >= 0.995, cosines


# ---------------------------------------------------------------- batched detection


@needs_real("models/scrfd_500m_kps.onnx", "faces/photos")
def test_batch_1_and_batch_8_find_the_same_faces(tmp_path):
    """SCRFD given a batch axis (its reshapes keep the batch) finds, 8 canvases per call, exactly the
    faces it finds one canvas per call, and those of the source file."""
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.detectors.graph import batch_check, write_batched
    from arcdeploy.faces.io import list_images
    from arcdeploy.faces.types import DecodedImage

    batched = tmp_path / "scrfd_batched.onnx"
    rewrites = write_batched(SCRFD, batched, (640, 640))
    assert sum("keeps the batch" in r for r in rewrites) == 9
    source, one, eight = (
        open_detector(SCRFD, threads=1),
        open_detector(batched, threads=1, batch=1),
        open_detector(batched, threads=1, batch=8),
    )
    assert (source.batch, one.batch, eight.batch) == (1, 1, 8)
    paths = list_images(PHOTOS)
    images = [DecodedImage.full(decode_image(p.read_bytes(), p)) for p in paths]
    images += [DecodedImage.full(np.ascontiguousarray(img.pixels[:, ::-1])) for img in images[:4]]  # 16: 2 calls
    canvases = np.stack([eight.canvas(img)[0] for img in images[:3]]).transpose(0, 3, 1, 2).astype(np.float32)
    assert batch_check(SCRFD, batched, (canvases - 127.5) / 128) < 1e-4
    found = [det.detect_decoded(images) for det in (source, one, eight)]
    assert sum(len(f) for f in found[2]) >= 16
    for a, b, c in zip(*found):
        assert len(a) == len(b) == len(c) >= 1
        for fa, fb, fc in zip(a, b, c):
            np.testing.assert_allclose(fb.points, fa.points, atol=1e-3)
            # one canvas per call or eight: the same numbers
            assert np.array_equal(fc.points, fb.points) and np.array_equal(fc.box, fb.box) and fc.score == fb.score
    # the embed pipeline's preparation workers, 8 photos per task: the crops one photo per task gives
    from arcdeploy.faces.job import EmbedJob
    from arcdeploy.faces.pipeline import prepare_batches
    from arcdeploy.faces.prepare import Detection

    job = EmbedJob(paths + paths[:5], workers=2)
    crops = [
        np.concatenate([b.crops for b in prepare_batches(job, [(0, 9), (9, 17)], Detection(det, all_faces=True))])
        for det in (one, eight)
    ]
    assert len(crops[0]) >= 17 and np.array_equal(crops[0], crops[1])


@needs_real("models/scrfd_500m_kps.onnx", "faces/photos")
def test_detect_command_takes_the_decode_mode(tmp_path):
    """--decode reduced on photos no larger than twice the canvas: nothing is reduced, the same rows."""
    from arcdeploy.cli import main

    rows = {}
    for mode in ("full", "reduced"):
        out = tmp_path / f"{mode}.txt"
        assert main(["detect", str(PHOTOS), "--detector", str(SCRFD), "--decode", mode, "-q", "-o", str(out)]) == 0
        rows[mode] = out.read_text()
    assert rows["full"] == rows["reduced"] and len(rows["full"].splitlines()) == 12


_FAULTS = """
import resource, sys, threading
import cv2
import numpy as np
from arcdeploy.machine import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
rng = np.random.default_rng(0)
photo = cv2.resize(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), (4000, 3000), interpolation=cv2.INTER_CUBIC)
data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
def prepare():  # what a preparation worker does with each 12 MP photo: decode, make a canvas
    for _ in range(6):
        cv2.resize(cv2.imdecode(data, cv2.IMREAD_COLOR), (640, 480))
prepare()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
threads = [threading.Thread(target=prepare) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator: Linux only")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    """With keep_freed_memory (the command line's and the Ray workers' setting), threads decoding
    12 MP JPEGs again and again reuse the pages they had; by default every decode's 36 MB is faulted
    in (and zeroed by the kernel) anew. A user's own malloc settings are left alone."""
    import subprocess

    def run(mode, **env):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        ).stdout.split()
        return out[0] == "True", int(out[1])

    kept, faults_kept = run("keep")
    if not kept:
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    default, faults_default = run("default")
    assert not default
    pages = 3000 * 4000 * 3 // 4096  # one decode's pages
    assert faults_default > 12 * pages, faults_default  # 18 decodes in 3 threads: nearly each anew
    assert faults_kept < 4 * pages, faults_kept  # each thread's first decode only
    assert run("keep", MALLOC_ARENA_MAX="2")[0] is False  # the user's own setting wins


# ---------------------------------------------------------------- JPEGs held as planes (decode="planes")

needs_planes = pytest.mark.skipif(not planes_available(), reason="libturbojpeg is not installed on this machine")


def _full(data: bytes) -> np.ndarray:
    return decode_image(data)


def _planes(data: bytes) -> DecodedImage:
    planes = decode_planes(data, jpeg_orientation(data))
    assert planes is not None
    return DecodedImage.from_planes(planes, data)


@needs_planes
@pytest.mark.parametrize("variant", ["4:2:0", "4:2:2", "4:4:0", "4:4:4", "progressive", "grayscale"])
def test_planes_give_the_full_decode_back(variant):
    """Every pixel sampled from the planes (luma at its place, chroma where libjpeg's smooth
    upsampling puts it) within two grey levels of the full decode: the rounding of two conversions."""
    data = JPEG_VARIANTS[variant]
    img = _planes(data)
    full = _full(data)
    assert img.full_size == (full.shape[1], full.shape[0])
    diff = np.abs(img.rgb().astype(int) - full.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())


@needs_planes
@pytest.mark.parametrize("orientation", range(1, 9))
def test_planes_are_turned_upright(orientation):
    """A photo stored turned with an EXIF orientation: the planes' picture and canvas are the upright
    image's, as the full decode's are."""
    rng = np.random.default_rng(orientation)
    upright = cv2.resize(rng.integers(0, 255, (7, 11, 3), dtype=np.uint8), (330, 210), interpolation=cv2.INTER_CUBIC)
    data = with_orientation(encode(STORED[orientation](upright)), orientation)
    img, full = _planes(data), _full(data)
    assert img.full_size == (330, 210) and full.shape == (210, 330, 3)
    assert np.abs(img.rgb().astype(int) - full.astype(int)).max() <= 2
    small = cv2.resize(full, (110, 70), interpolation=cv2.INTER_LINEAR)
    assert np.abs(img.resized(110, 70).astype(int) - small.astype(int)).mean() < 1.0


@needs_planes
def test_what_planes_decline_is_decoded_in_full():
    from arcdeploy.faces.io import decode_reduced

    png = encode(np.full((60, 80, 3), 77, np.uint8), ".png")
    cut = JPEG_VARIANTS["4:2:0"][: len(JPEG_VARIANTS["4:2:0"]) // 2]
    # 4:1:1: libjpeg-turbo repeats its chroma samples instead of interpolating them
    assert decode_planes(png) is None and decode_planes(cut) is None and decode_planes(JPEG_VARIANTS["4:1:1"]) is None
    got = decode_reduced(png, "a.png", as_planes=lambda w, h: True)
    assert got.planes is None and got.pixels is not None
    held = decode_reduced(JPEG_VARIANTS["4:2:0"], "a.jpg", as_planes=lambda w, h: True)
    assert held.planes is not None and held.pixels is None
    assert decode_reduced(JPEG_VARIANTS["4:2:0"], "a.jpg", as_planes=lambda w, h: False).planes is None


@needs_planes
@needs_real("faces/photos")
def test_canvas_and_crops_from_planes_on_real_photos():
    """On the real photos: the canvas resized from the planes is within a grey level or two of
    cv2.resize of the full decode, and a crop sampled from them of the full decode's crop."""
    import cv2

    from arcdeploy.faces.align import aligned_from
    from arcdeploy.faces.io import list_images

    points = np.array([[0.38, 0.45], [0.62, 0.45], [0.5, 0.58], [0.41, 0.7], [0.59, 0.7]])
    for path in [p for p in list_images(PHOTOS) if p.suffix.lower() in (".jpg", ".jpeg")]:
        data = path.read_bytes()
        img, full = _planes(data), _full(data)
        w, h = img.full_size
        size = (max(1, w // 3), max(1, h // 3))
        diff = np.abs(img.resized(*size).astype(int) - cv2.resize(full, size).astype(int))
        assert diff.mean() < 0.5 and np.mean(diff > 4) < 0.005, (path, diff.mean(), diff.max())
        lmk = (points * [w, h]).astype(np.float32)
        crop = np.abs(aligned_from(img, lmk).astype(int) - aligned_from(DecodedImage.full(full), lmk).astype(int))
        # chroma interpolated once where the full decode's crop interpolates upsampled chroma: a few
        # levels apart at sharp colour edges
        assert crop.mean() < 0.5 and np.mean(crop > 4) < 0.01, (path, crop.mean(), crop.max())


@pytest.mark.slow
@needs_planes
@needs_real("models/scrfd_500m_kps.onnx", "models/w600k_mbf.onnx", "faces/photos", "faces/lfw_colour")
def test_planes_against_full_decode_on_12mp_photos(photo_sets, w600k_fp32):
    """decode="planes" on 12 MP JPEGs with SCRFD-500M fp32: the same faces as the full decode's,
    landmarks within 0.2% (mean) / 0.5% (max) of the eye distance, embeddings at cosine >= 0.998."""
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.prepare import Detection, prepare_image

    full = Detection(open_detector(SCRFD, threads=1), all_faces=True)
    planes = Detection(open_detector(SCRFD, threads=1, decode="planes"), all_faces=True)
    errors, cosines = [], []
    for path in photo_sets["12mp"]:
        a, b = prepare_image(path, detection=full), prepare_image(path, detection=planes)
        pairs = match_faces([f.box for f in a.faces], [f.box for f in b.faces])
        assert len(pairs) == len(a.faces) == len(b.faces), path
        e = w600k_fp32.infer(np.concatenate([a.crops, b.crops]))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        for i, j in pairs:
            fa, fb = a.faces[i].points, b.faces[j].points
            errors.append(np.linalg.norm(fa - fb, axis=1).mean() / np.linalg.norm(fa[1] - fa[0]))
            cosines.append(float(e[i] @ e[len(a.faces) + j]))
    assert len(errors) >= 12
    assert np.mean(errors) <= 0.002 and np.max(errors) <= 0.005, errors
    assert min(cosines) >= 0.998, cosines
