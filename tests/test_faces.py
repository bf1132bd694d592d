"""Faces in: image lists, decoding, landmark files and 5-point alignment."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from arcdeploy.errors import ArcdeployError
from arcdeploy.faces import (
    TEMPLATE_112,
    ImageError,
    align_face,
    estimate_transform,
    list_images,
    read_image,
    read_landmarks,
    reduce_68_to_5,
    to_aligned,
)
from arcdeploy.faces.align import landmarks_problem, umeyama
from arcdeploy.synthetic import draw_face


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(m, pts):
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


def _inverse(m):
    full = np.vstack([m, [0, 0, 1]])
    return np.linalg.inv(full)[:2]


@pytest.fixture(scope="module")
def loose():
    img, lm = draw_face(3, 1, size=250)
    return img, lm


# ---------------------------------------------------------------- alignment


def test_template_maps_onto_itself():
    m = estimate_transform(TEMPLATE_112)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-5)


@pytest.mark.parametrize(
    "angle,scale,tx,ty", [(0, 1, 0, 0), (17, 1.8, 40, -12), (-35, 0.6, 130.5, 77.25), (180, 2.5, 300, 300)]
)
def test_known_similarity_is_recovered(angle, scale, tx, ty):
    fwd = _similarity(angle, scale, tx, ty)  # template frame -> image frame
    pts = _apply(fwd, TEMPLATE_112)
    m = estimate_transform(pts)
    np.testing.assert_allclose(m, _inverse(fwd), rtol=0, atol=1e-9 * max(1, scale) * 300)
    np.testing.assert_allclose(_apply(m, pts), TEMPLATE_112, atol=1e-6)


def test_least_squares_matches_linear_solution_on_noisy_points():
    # A similarity without reflection is x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty),
    # so ordinary least squares gives the optimum Umeyama must reach.
    rng = np.random.default_rng(0)
    for _ in range(20):
        fwd = _similarity(rng.uniform(-40, 40), rng.uniform(0.5, 3), *rng.uniform(0, 200, 2))
        pts = _apply(fwd, TEMPLATE_112) + rng.normal(0, 2.0, (5, 2))
        a = np.zeros((10, 4))
        a[0::2] = np.c_[pts[:, 0], -pts[:, 1], np.ones(5), np.zeros(5)]
        a[1::2] = np.c_[pts[:, 1], pts[:, 0], np.zeros(5), np.ones(5)]
        (p, q, tx, ty), *_ = np.linalg.lstsq(a, TEMPLATE_112.astype(np.float64).ravel(), rcond=None)
        expected = np.array([[p, -q, tx], [q, p, ty]])
        np.testing.assert_allclose(estimate_transform(pts), expected, atol=1e-8)


def test_mirrored_points_give_a_rotation_not_a_reflection():
    pts = TEMPLATE_112.astype(np.float64).copy()
    pts[:, 0] = 112 - pts[:, 0]  # left/right swapped
    m = estimate_transform(pts)
    assert np.linalg.det(m[:, :2]) > 0


def test_degenerate_points_give_nan():
    assert np.isnan(umeyama(np.ones((5, 2)), TEMPLATE_112)).all()


def test_warped_image_matches_hand_computed_transform(loose):
    img, _ = loose
    fwd = _similarity(12, 1.7, 30, 20)
    pts = _apply(fwd, TEMPLATE_112)
    got = align_face(img, pts)
    want = cv2.warpAffine(
        img, _inverse(fwd), (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    assert got.shape == (112, 112, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # same matrix up to float rounding


def test_alignment_undoes_a_placement(faces16):
    # an aligned face placed into a larger image by a known similarity comes back out
    face = faces16[0]
    fwd = _similarity(-20, 1.5, 60, 40)
    canvas = cv2.warpAffine(face, fwd, (300, 300), flags=cv2.INTER_LINEAR)
    back = align_face(canvas, _apply(fwd, TEMPLATE_112))
    inner = (slice(10, 102), slice(10, 102))
    diff = np.abs(back[inner].astype(int) - face[inner].astype(int))
    assert diff.mean() < 4, diff.mean()
    # and with a different transform the result is clearly different
    wrong = align_face(canvas, _apply(_similarity(-20, 1.5, 75, 40), TEMPLATE_112))
    assert np.abs(wrong[inner].astype(int) - face[inner].astype(int)).mean() > 10


def test_border_is_black(loose):
    img, lm = loose
    far = lm + np.array([120.0, 0.0])  # face near the right edge: part of the crop is off the image
    out = align_face(img, far)
    assert (out[:, -5:] == 0).all()


def test_to_aligned_resizes_crops():
    crop = np.zeros((224, 224, 3), np.uint8)
    crop[:112] = 200
    out = to_aligned(crop)
    assert out.shape == (112, 112, 3)
    assert out[:50].min() == 200 and out[62:].max() == 0
    small = np.full((56, 56, 3), 7, np.uint8)
    assert (to_aligned(small) == 7).all() and to_aligned(small).shape == (112, 112, 3)
    same = np.full((112, 112, 3), 9, np.uint8)
    assert to_aligned(same) is same


def test_landmarks_problem(loose):
    img, lm = loose
    assert landmarks_problem(lm, img.shape) is None
    assert "off the image" in landmarks_problem(lm + 400, img.shape)
    assert "off the image" in landmarks_problem(lm - [0, 260], img.shape)
    assert "degenerate" in landmarks_problem(np.full((5, 2), 50.0), img.shape)
    assert "finite" in landmarks_problem(np.full((5, 2), np.nan), img.shape)


# ---------------------------------------------------------------- landmark files


def test_five_point_files_with_and_without_score(tmp_path, loose):
    _, lm = loose
    coords = " ".join(f"{v:.4f}" for v in lm.ravel())
    (tmp_path / "ijb.txt").write_text(f"# comment\n1.jpg {coords} 0.98\n\n2.jpg {coords} 0.5\n")
    (tmp_path / "plain.txt").write_text(f"a/1.jpg {coords}\n")
    ijb = read_landmarks(tmp_path / "ijb.txt")
    assert ijb.names == ["1.jpg", "2.jpg"] and len(ijb) == 2
    np.testing.assert_allclose(ijb["1.jpg"], lm, atol=1e-4)
    assert ijb["1.jpg"].dtype == np.float32 and ijb["1.jpg"].shape == (5, 2)
    np.testing.assert_allclose(ijb.scores, [0.98, 0.5])
    plain = read_landmarks(tmp_path / "plain.txt")
    assert plain.scores is None
    # lookup: relative path to the root, then the file name
    np.testing.assert_allclose(plain.find(tmp_path / "a" / "1.jpg", tmp_path), lm, atol=1e-4)
    np.testing.assert_allclose(plain.find("elsewhere/1.jpg"), lm, atol=1e-4)
    assert plain.find("2.jpg") is None


def test_68_point_rows_reduce_to_5(tmp_path):
    rng = np.random.default_rng(1)
    pts68 = rng.uniform(0, 200, (68, 2))
    want = np.array([(pts68[36] + pts68[39]) / 2, (pts68[42] + pts68[45]) / 2, pts68[30], pts68[48], pts68[54]])
    np.testing.assert_allclose(reduce_68_to_5(pts68), want, atol=1e-4)
    line = " ".join(f"{v:.5f}" for v in pts68.ravel())
    (tmp_path / "l68.txt").write_text(f"x.png {line}\ny.png {line}\n")
    (tmp_path / "l68s.txt").write_text(f"x.png {line} 0.7\n")
    np.testing.assert_allclose(read_landmarks(tmp_path / "l68.txt")["y.png"], want, atol=1e-3)
    assert read_landmarks(tmp_path / "l68s.txt").scores[0] == pytest.approx(0.7)


@pytest.mark.parametrize(
    "body,needle",
    [
        ("a.jpg 1 2 3\n", ":1: expected"),
        ("a.jpg " + "1 " * 10 + "\nb.jpg 1 2 x 4 5 6 7 8 9 10\n", ":2: not a number: 'x'"),
        ("a.jpg " + "1 " * 10 + "\nb.jpg " + "1 " * 11 + "\n", ":2: rows mix"),
        ("a.jpg " + "nan " * 10 + "\n", ":1: non-finite"),
        ("# only a comment\n", "no landmark rows"),
    ],
)
def test_malformed_landmark_files_name_file_and_line(tmp_path, body, needle):
    f = tmp_path / "bad.txt"
    f.write_text(body)
    with pytest.raises(ArcdeployError) as info:
        read_landmarks(f)
    assert str(f) in str(info.value) and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_landmark_file(tmp_path):
    with pytest.raises(ArcdeployError, match="no such landmark file"):
        read_landmarks(tmp_path / "nope.txt")


# ---------------------------------------------------------------- image lists


def test_list_images_from_folder_and_list(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.webp", "sub/deeper/d.Bmp", "e.jpeg", "notes.txt", "f.gif"]:
        p = tmp_path / "imgs" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = [p.relative_to(tmp_path / "imgs").as_posix() for p in list_images(tmp_path / "imgs")]
    assert got == ["a.png", "b.JPG", "e.jpeg", "sub/c.webp", "sub/deeper/d.Bmp"]
    lst = tmp_path / "imgs" / "list.txt"
    lst.write_text(f"# header\nsub/c.webp 7 label\n\n  b.JPG\n{tmp_path}/abs.jpg\nmissing.jpg\n")
    assert list_images(lst) == [
        tmp_path / "imgs/sub/c.webp",
        tmp_path / "imgs/b.JPG",
        tmp_path / "abs.jpg",
        tmp_path / "imgs/missing.jpg",
    ]
    assert list_images(tmp_path / "imgs" / "a.png") == [tmp_path / "imgs" / "a.png"]  # one image


def test_list_images_errors(tmp_path):
    with pytest.raises(ArcdeployError, match="no such image folder or list"):
        list_images(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArcdeployError, match="no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(ArcdeployError, match="names no images"):
        list_images(tmp_path / "blank.txt")


# ---------------------------------------------------------------- decoding


def _bgr(img):
    return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)


@pytest.mark.parametrize("ext,params", [(".png", []), (".bmp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])])
def test_lossless_formats_decode_to_the_same_rgb(tmp_path, loose, ext, params):
    img, _ = loose
    path = tmp_path / f"face{ext}"
    assert cv2.imwrite(str(path), _bgr(img), params)
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == img.shape
    np.testing.assert_array_equal(got, img)  # RGB order, not BGR


def test_jpeg_decodes_close(tmp_path, loose):
    img, _ = loose
    path = tmp_path / "face.jpg"
    cv2.imwrite(str(path), _bgr(img), [cv2.IMWRITE_JPEG_QUALITY, 95])
    got = read_image(path)
    assert got.shape == img.shape
    np.testing.assert_array_equal(got, cv2.imread(str(path))[..., ::-1])  # what insightface's cv2.imread sees
    assert np.abs(got.astype(int) - img.astype(int)).mean() < 8  # the drawing's noise costs some JPEG fidelity
    # channel order: the red channel of the decoded image follows the source's red channel
    assert np.corrcoef(got[..., 0].ravel(), img[..., 0].ravel())[0, 1] > 0.95


def test_grayscale_alpha_and_16_bit(tmp_path, loose):
    img, _ = loose
    gray = img[..., 1]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    g = read_image(tmp_path / "g.png")
    assert g.shape == (*gray.shape, 3) and all((g[..., c] == gray).all() for c in range(3))
    bgra = cv2.cvtColor(img, cv2.COLOR_RGB2BGRA)
    bgra[..., 3] = 30
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    cv2.imwrite(str(tmp_path / "a.webp"), bgra, [cv2.IMWRITE_WEBP_QUALITY, 101])
    for name in ("a.png", "a.webp"):
        np.testing.assert_array_equal(read_image(tmp_path / name), img)  # alpha dropped, colours kept
    cv2.imwrite(str(tmp_path / "c16.png"), _bgr(img).astype(np.uint16) * 256 + 255)
    np.testing.assert_array_equal(read_image(tmp_path / "c16.png"), img)


def test_unicode_path(tmp_path, loose):
    img, _ = loose
    path = tmp_path / "visage-é-顔.png"
    path.write_bytes(cv2.imencode(".png", _bgr(img))[1].tobytes())
    np.testing.assert_array_equal(read_image(path), img)


def test_bad_images_raise_with_reason(tmp_path, loose):
    img, _ = loose
    good = cv2.imencode(".jpg", _bgr(img))[1].tobytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    (tmp_path / "corrupt.jpg").write_bytes(good[:30] + bytes(range(256)) * 8)
    (tmp_path / "half.jpg").write_bytes(good[: len(good) // 2])
    png = cv2.imencode(".png", _bgr(img))[1].tobytes()
    (tmp_path / "corrupt.png").write_bytes(png[:200] + b"\0" * 100)
    (tmp_path / "dir.jpg").mkdir()
    cases = {
        "empty.jpg": "empty file",
        "text.jpg": "not an image (a text file)",
        "corrupt.jpg": "corrupt JPEG",
        "half.jpg": "JPEG",
        "corrupt.png": "corrupt PNG",
        "missing.jpg": "no such file",
        "dir.jpg": "is a folder",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageError) as info:
            read_image(tmp_path / name)
        assert reason in info.value.reason, (name, info.value.reason)
        assert str(info.value).startswith(str(tmp_path / name))
        assert isinstance(info.value, ArcdeployError)
