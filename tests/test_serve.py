"""arcdeploy serve: a real server (uvicorn, 127.0.0.1, an ephemeral port) and a real HTTP client
(httpx), the trained w600k_mbf as an OpenVINO package, SCRFD-500M on real photos. Nothing mocked.

Served embeddings are compared with ``Package.embed`` on the same files: the same preparation,
the same engine and the same normalisation, only the batches differ (the server gathers faces
across requests), so rows agree to float32 rounding (on the machines seen so far, bit for bit).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

import arcdeploy
from real_material import FACES, MODELS, needs_real
from test_ray import cluster, ray_env  # noqa: F401  (fixtures: the Ray tests' two-node loopback cluster)

httpx = pytest.importorskip("httpx", reason="the service tests need httpx (pip install 'arcdeploy[test]')")
pytest.importorskip("fastapi", reason="serving needs pip install 'arcdeploy[serve]'")
msgpack = pytest.importorskip("msgpack")

RECOGNITION = MODELS / "w600k_mbf.onnx"
SCRFD = MODELS / "scrfd_500m_kps.onnx"
PHOTOS = FACES / "photos"
LFW = FACES / "lfw"
LFW_POINTS = FACES / "lfw_5pts.txt"
SRC = Path(__file__).resolve().parents[1] / "src"
N_CROPS = 24
MAX_BODY_MB = 8
TOL = 1e-5  # float32 rounding between batch shapes; embeddings are unit vectors

pytestmark = [
    pytest.mark.slow,  # builds a package and starts servers
    needs_real(
        "models/w600k_mbf.onnx", "models/scrfd_500m_kps.onnx", "faces/photos", "faces/lfw", "faces/lfw_5pts.txt"
    ),
]


# ------------------------------------------------------------------ material


@pytest.fixture(scope="module")
def pkg(w600k_packages):
    """The trained w600k_mbf as an OpenVINO fp32 package (the session's: conftest.py)."""
    return arcdeploy.load(w600k_packages("openvino", "fp32"))


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Aligned 112x112 crops of real LFW faces (aligned with their landmarks), as PNG files."""
    from arcdeploy.faces.io import list_images
    from arcdeploy.faces.landmarks import read_landmarks
    from arcdeploy.faces.prepare import prepare_face

    table = read_landmarks(LFW_POINTS)
    folder = tmp_path_factory.mktemp("crops")
    paths = []
    for i, src in enumerate(list_images(LFW)[: N_CROPS * 8 : 8]):
        crop = prepare_face(src, table.find(src, LFW))
        path = folder / f"{i:02d}_{src.stem}.png"
        cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def photos():
    from arcdeploy.faces.io import list_images

    paths = list_images(PHOTOS)
    assert len(paths) == 12
    return paths


@pytest.fixture(scope="module")
def expected_crops(pkg, crops):
    return pkg.embed(crops)


@pytest.fixture(scope="module")
def expected_photos(pkg, photos):
    return pkg.embed(photos, detector=SCRFD)


# ------------------------------------------------------------------ servers


@dataclass
class Served:
    proc: subprocess.Popen | None
    url: str
    stderr: list[str]


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


def _start(*args: str, env: dict | None = None, ready_timeout: float = 240.0) -> Served:
    """``arcdeploy serve ...`` in a child process; returns once /healthz says 200."""
    environ = dict(env or os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [environ.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [sys.executable, "-m", "arcdeploy", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    first = proc.stdout.readline() if proc.stdout else ""
    m = re.search(r"http://127\.0\.0\.1:(\d+)", first)
    if not m:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no listening line: {first!r}; stderr: {''.join(lines)}")
    served = Served(proc, f"http://127.0.0.1:{m.group(1)}", lines)
    _wait_ready(served.url, proc, ready_timeout)
    return served


def _stop(served: Served, timeout: float = 60.0) -> int:
    assert served.proc is not None
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        served.proc.wait()
        raise


@pytest.fixture(scope="module")
def server(pkg):
    """The CLI's server: the package and SCRFD, a small body limit (8 MiB)."""
    s = _start(str(pkg.path), "--detector", str(SCRFD), "--max-body-mb", str(MAX_BODY_MB))
    try:
        yield s
    finally:
        assert _stop(s) == 0, "".join(s.stderr)


class ThreadServer:
    """create_app's application served by uvicorn in a thread of this process (the library way)."""

    def __init__(self, app):
        import uvicorn

        from arcdeploy.serve.server import listen

        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        _wait_ready(self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive()


# ------------------------------------------------------------------ client helpers


def _files(paths, name: str = "image") -> list:
    return [(name, (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in paths]


def _rows(answer: dict) -> np.ndarray:
    """One embedding per result (its best face), float32."""
    return np.array([r["faces"][0]["embedding"] for r in answer["results"]], np.float32)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


def _healthy(url: str) -> None:
    r = httpx.get(f"{url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def _one_line_error(r) -> str:
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    msg = body["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{name} (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            return float(m.groups()[-1])
    return 0.0


async def _concurrent(url: str, bodies: list[dict], connections: int = 64, timeout: float = 120.0) -> list:
    """Each body POSTed to url at once (a connection each); responses (or exceptions) in order."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        return await asyncio.gather(*(client.post(url, **b) for b in bodies), return_exceptions=True)


# ------------------------------------------------------------------ equal to Package.embed


def test_aligned_crops_equal_package_embed(server, crops, expected_crops):
    r = httpx.post(f"{server.url}/v1/embed", files=_files(crops), data={"aligned": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [x["error"] for x in answer["results"]] == [None] * len(crops)
    _close(_rows(answer), expected_crops)
    face = answer["results"][0]["faces"][0]
    assert face["box"] is None and face["landmarks"] is None and face["score"] is None  # nothing was detected
    assert answer["model"]["engine"] == "openvino" and answer["model"]["dim"] == 512


def test_json_base64_and_msgpack_answers_are_the_same_rows(server, crops, expected_crops):
    images = [base64.b64encode(Path(p).read_bytes()).decode() for p in crops[:6]]
    as_json = httpx.post(f"{server.url}/v1/embed", json={"images": images, "aligned": True}, timeout=60)
    assert as_json.status_code == 200, as_json.text
    _close(_rows(as_json.json()), expected_crops[:6])
    r = httpx.post(
        f"{server.url}/v1/embed",
        json={"images": images, "aligned": True},
        headers={"Accept": "application/msgpack"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    packed = msgpack.unpackb(r.content)
    _close(_rows(packed), expected_crops[:6])
    assert len(r.content) < 0.5 * len(as_json.content)  # 5 bytes per float32


def test_photos_through_the_detector_equal_package_embed(server, photos, expected_photos):
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.io import read_image

    r = httpx.post(f"{server.url}/v1/embed", files=_files(photos), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert all(x["error"] is None and len(x["faces"]) == 1 for x in answer["results"])
    _close(_rows(answer), expected_photos)
    # the box, points and score are the detector's, as embed found them
    detector = open_detector(SCRFD, threads=1)
    for path, result in zip(photos[:3], answer["results"]):
        best = detector.detect(read_image(path))[0]
        face = result["faces"][0]
        np.testing.assert_allclose(face["box"], best.box, atol=1e-3)
        np.testing.assert_allclose(face["landmarks"], best.points, atol=1e-3)
        assert face["score"] == pytest.approx(best.score, abs=1e-5)


def test_all_faces_equal_embed_files(server, pkg, photos, tmp_path):
    from arcdeploy.faces.io import read_image
    from arcdeploy.faces.pipeline import embed_files

    a, b = read_image(photos[0]), read_image(photos[5])
    h = max(a.shape[0], b.shape[0])
    pad = lambda x: np.pad(x, ((0, h - x.shape[0]), (0, 0), (0, 0)))  # noqa: E731
    group = tmp_path / "two.png"
    cv2.imwrite(str(group), cv2.cvtColor(np.concatenate([pad(a), pad(b)], axis=1), cv2.COLOR_RGB2BGR))
    want = embed_files(pkg, [group], detector=SCRFD, all_faces=True, progress=False)
    assert len(want.features) >= 2
    r = httpx.post(f"{server.url}/v1/embed", files=_files([group]), data={"all_faces": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    faces = r.json()["results"][0]["faces"]
    _close(np.array([f["embedding"] for f in faces], np.float32), np.asarray(want.features))
    np.testing.assert_allclose([f["box"] for f in faces], [fr.box for fr in want.faces or []], atol=1e-3)


def test_compare(server, photos, expected_photos):
    same = [i for i, p in enumerate(photos) if p.parent == photos[0].parent]
    assert len(same) >= 2
    i, j = same[:2]
    files = [
        ("a", (photos[i].name, photos[i].read_bytes())),
        ("b", (photos[j].name, photos[j].read_bytes())),
    ]
    r = httpx.post(f"{server.url}/v1/compare", files=files, timeout=60)
    assert r.status_code == 200, r.text
    want = float(expected_photos[i].astype(np.float64) @ expected_photos[j].astype(np.float64))
    assert r.json()["cosine"] == pytest.approx(want, abs=1e-5)
    files[1] = ("b", ("noise.txt", b"not an image at all"))
    r = httpx.post(f"{server.url}/v1/compare", files=files, timeout=60)
    assert r.status_code == 422 and _one_line_error(r).startswith("b: noise.txt: not an image")


# ------------------------------------------------------------------ batching across requests


def test_64_concurrent_requests_give_the_serial_rows_in_shared_batches(server, crops, expected_crops):
    before = httpx.get(f"{server.url}/metrics").text
    picks = [k % len(crops) for k in range(64)]
    bodies = [{"files": _files([crops[k]]), "data": {"aligned": "true"}} for k in picks]
    answers = asyncio.run(_concurrent(f"{server.url}/v1/embed", bodies))
    assert all(not isinstance(a, Exception) and a.status_code == 200 for a in answers), answers[:3]
    got = np.concatenate([_rows(a.json()) for a in answers])
    _close(got, expected_crops[picks])
    after = httpx.get(f"{server.url}/metrics").text
    calls = _metric(after, "arcdeploy_batch_size_count") - _metric(before, "arcdeploy_batch_size_count")
    singles = _metric(after, "arcdeploy_batch_size_bucket", le="1.0") - _metric(
        before, "arcdeploy_batch_size_bucket", le="1.0"
    )
    faces = _metric(after, "arcdeploy_batch_size_sum") - _metric(before, "arcdeploy_batch_size_sum")
    assert faces == 64
    assert calls < 64 and singles < calls  # some engine calls carried several requests' faces
    assert _metric(after, "arcdeploy_requests_total", endpoint="/v1/embed", status="200") >= 64


# ------------------------------------------------------------------ bad requests


def _image_bytes(shape, seed=0, ext=".png") -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def sixty_mp_png() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((6000, 10000), 90, np.uint8))  # 60 megapixels of one grey
    assert ok
    return buf.tobytes()


PER_IMAGE = [
    ("not an image", b"hello, I am text", "not an image (a text file)"),
    ("empty part", b"", "empty file"),
    ("2-byte JPEG", b"\xff\xd8", "not an image (not JPEG, PNG, BMP or WebP data)"),
]


@pytest.mark.parametrize("what,data,reason", PER_IMAGE, ids=[c[0] for c in PER_IMAGE])
def test_a_bad_image_is_its_own_error_and_the_rest_is_answered(server, crops, expected_crops, what, data, reason):
    files = [*_files(crops[:1]), ("image", ("bad.jpg", data, "image/jpeg")), *_files(crops[1:2])]
    r = httpx.post(f"{server.url}/v1/embed", files=files, data={"aligned": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [len(x["faces"]) for x in results] == [1, 0, 1]
    assert results[1]["error"].startswith(f"bad.jpg: {reason}") and "\n" not in results[1]["error"]
    _close(np.array([results[0]["faces"][0]["embedding"], results[2]["faces"][0]["embedding"]]), expected_crops[:2])
    _healthy(server.url)


def test_sixty_megapixels_is_refused_by_the_pixel_limit(server, sixty_mp_png):
    assert len(sixty_mp_png) < MAX_BODY_MB << 20  # under the body limit: the pixel limit answers
    r = httpx.post(f"{server.url}/v1/embed", files=[("image", ("huge.png", sixty_mp_png))], timeout=60)
    assert r.status_code == 200
    (result,) = r.json()["results"]
    assert result["faces"] == [] and "huge.png: image too large: 10000x6000 is 60.0 megapixels" in result["error"]
    _healthy(server.url)


MALFORMED = [
    ("wrong content type", {"content": b"image bytes", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
    ("no content type", {"content": b"image bytes"}, 415, "no Content-Type"),
    (
        "no parts",
        {"content": b"--xyz--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
        400,
        "no images",
    ),
    ("only a field", {"files": [("aligned", (None, b"true"))]}, 400, "no images"),
    ("unknown part", {"files": [("images", ("a.png", b"x"))]}, 400, "unexpected part 'images'"),
    (
        "cut multipart",
        {
            "content": b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nabc',
            "headers": {"Content-Type": "multipart/form-data; boundary=xyz"},
        },
        400,
        "malformed multipart body",
    ),
    ("bad JSON", {"content": b'{"images": [', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("JSON not an object", {"json": ["a"]}, 400, "must be an object"),
    ("JSON images not a list", {"json": {"images": "abc"}}, 400, "'images' must be a list"),
    ("bad flag", {"files": [("image", ("a.png", b"x")), ("aligned", (None, b"maybe"))]}, 400, "aligned must be"),
    ("all faces of a crop", {"json": {"images": ["eA=="], "aligned": True, "all_faces": True}}, 400, "all_faces"),
]


@pytest.mark.parametrize("what,request_kw,status,message", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_a_one_line_4xx(server, what, request_kw, status, message):
    r = httpx.post(f"{server.url}/v1/embed", timeout=30, **request_kw)
    assert r.status_code == status, r.text
    assert message in _one_line_error(r)
    _healthy(server.url)


def test_bad_base64_is_an_error_of_that_image(server):
    r = httpx.post(f"{server.url}/v1/embed", json={"images": ["%%%not base64"], "aligned": True}, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["error"] == "image 1: not valid base64"


def test_body_over_the_limit_is_413(server):
    big = _image_bytes((2000, 2000, 3))  # ~12 MB of noise as PNG, over the 8 MiB limit
    assert len(big) > MAX_BODY_MB << 20
    r = httpx.post(f"{server.url}/v1/embed", files=[("image", ("big.png", big))], timeout=60)
    assert r.status_code == 413 and "larger than the limit of 8 MiB" in _one_line_error(r)

    def chunks():  # no Content-Length: the limit holds while the body streams
        for k in range(0, len(big), 1 << 20):
            yield big[k : k + (1 << 20)]

    r = httpx.post(
        f"{server.url}/v1/embed",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and "larger than the limit" in _one_line_error(r)
    _healthy(server.url)


def test_search_answers_as_the_gallery_does(pkg, crops, expected_crops, photos, expected_photos, tmp_path):
    """serve --gallery: POST /v1/search gives each image's best face searched in the gallery, the
    answer ``Gallery.search`` gives for ``Package.embed``'s rows; without a gallery, 404."""
    pytest.importorskip("faiss", reason="the folder gallery needs pip install 'arcdeploy[gallery]'")
    from arcdeploy.gallery import open_gallery
    from arcdeploy.serve import create_app

    folder = tmp_path / "gallery"
    people = [p.stem.split("_", 1)[1].rsplit("_", 1)[0] for p in crops]
    with open_gallery(folder, write=True) as g:
        g.add(expected_crops, people, pkg, samples=[p.name for p in crops])
        g.add(expected_photos, [p.parent.name for p in photos], pkg, samples=[p.name for p in photos])
    with open_gallery(folder) as g:
        want_crops, _ = g.search(expected_crops[:6], pkg, top_k=3, queries=[p.name for p in crops[:6]])
        want_photos, _ = g.search(expected_photos, pkg, top_k=2, threshold=0.3, queries=[p.name for p in photos])
    ts = ThreadServer(create_app(pkg, detector=SCRFD, gallery=folder))
    try:
        r = httpx.post(f"{ts.url}/v1/search", files=_files(crops[:6]), data={"aligned": "true", "top_k": "3"})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [x["query"] for x in got] == [p.name for p in crops[:6]]
        for g_, w in zip(got, want_crops):
            assert g_["error"] is None and [m["identity"] for m in g_["matches"]] == [m.identity for m in w.matches]
            assert [m["score"] for m in g_["matches"]] == pytest.approx([m.score for m in w.matches], abs=1e-5)
        assert got[0]["matches"][0]["identity"] == people[0]
        r = httpx.post(f"{ts.url}/v1/search", files=_files(photos), data={"top_k": "2", "threshold": "0.3"})
        got = r.json()["results"]
        assert [[m["identity"] for m in x["matches"]] for x in got] == [
            [m.identity for m in w.matches] for w in want_photos
        ]
        assert all(x["face"]["box"] and "embedding" not in x["face"] for x in got)
        bad = httpx.post(f"{ts.url}/v1/search", files=_files(crops[:1]), data={"aligned": "true", "top_k": "0"})
        assert bad.status_code == 400 and "top_k" in bad.json()["error"]
    finally:
        ts.close()
    plain = ThreadServer(create_app(pkg))
    try:
        r = httpx.post(f"{plain.url}/v1/search", files=_files(crops[:1]), data={"aligned": "true"})
        assert r.status_code == 404 and "--gallery" in r.json()["error"]
    finally:
        plain.close()


def test_other_endpoints(server, pkg):
    model = httpx.get(f"{server.url}/v1/model").json()
    m = pkg.manifest
    assert (model["engine"], model["precision"], model["arch"]) == (m.engine, m.precision, m.arch)
    assert model["fidelity"] == m.fidelity.to_json() and model["executed"] == m.executed.to_json()
    assert model["source"] == m.source.to_json()
    assert model["fingerprint"] == pkg.fingerprint() and "SCRFD" in model["detector"].upper()
    assert model["serving"]["max_body_bytes"] == MAX_BODY_MB << 20
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/embed", "/v1/compare", "/healthz", "/v1/model", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    r = httpx.get(f"{server.url}/nowhere")
    assert r.status_code == 404 and _one_line_error(r)
    r = httpx.get(f"{server.url}/v1/embed")
    assert r.status_code == 405 and _one_line_error(r)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("arcdeploy_requests_total", "arcdeploy_request_seconds_bucket", "arcdeploy_batch_size_bucket"):
        assert name in text
    assert "arcdeploy_queue_depth" in text and _metric(text, "arcdeploy_ready") == 1.0
    assert _metric(text, "arcdeploy_requests_total", endpoint="/v1/embed", status="413") >= 1


def test_each_error_is_one_log_line_without_traceback(server):
    httpx.post(f"{server.url}/v1/embed", content=b"x", headers={"Content-Type": "text/csv"})
    httpx.post(f"{server.url}/v1/embed", files=[("image", ("tiny.jpg", b"\xff\xd8"))])
    time.sleep(0.5)
    log = "".join(server.stderr)
    assert "Traceback" not in log
    assert re.search(r"^arcdeploy: warning: POST /v1/embed 415: unsupported Content-Type text/csv", log, re.M)
    line = r"^arcdeploy: warning: image refused: tiny\.jpg: not an image \(not JPEG, PNG, BMP or WebP data\)$"
    assert re.search(line, log, re.M), log


# ------------------------------------------------------------------ overload, timeouts, shutdown


def test_overload_is_503_with_retry_after_and_memory_stays_bounded(pkg, crops, expected_crops, tmp_path):
    import psutil

    s = _start(str(pkg.path), "--max-queue", "2", "--workers", "1")
    try:
        proc = psutil.Process(s.proc.pid)  # type: ignore[union-attr]
        body = _image_bytes((1000, 1000, 3), seed=1)  # ~3 MB each: 96 of them held would be ~290 MB
        bodies = [{"files": [("image", ("noise.png", body))], "data": {"aligned": "true"}} for _ in range(96)]
        base = proc.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            answers = asyncio.run(_concurrent(f"{s.url}/v1/embed", bodies, connections=96))
        finally:
            done.set()
            sampler.join()
        codes = [a.status_code if not isinstance(a, Exception) else repr(a) for a in answers]
        busy = [a for a in answers if not isinstance(a, Exception) and a.status_code == 503]
        assert busy and all(c in (200, 503) for c in codes), codes
        assert all(a.headers.get("retry-after") == "1" and "server busy" in _one_line_error(a) for a in busy)
        (tmp_path / "noise.png").write_bytes(body)
        want = pkg.embed([tmp_path / "noise.png"])
        for a in answers:
            if a.status_code == 200:
                _close(_rows(a.json()), want)
        grown = (peak[0] - base) / 2**20
        assert grown < 120, f"server memory grew by {grown:.0f} MiB under overload"
        # after the storm: healthy, and a plain request is answered
        _healthy(s.url)
        r = httpx.post(f"{s.url}/v1/embed", files=_files(crops[:1]), data={"aligned": "true"}, timeout=60)
        _close(_rows(r.json()), expected_crops[:1])
    finally:
        assert _stop(s) == 0


def test_request_timeout_is_504(pkg, photos):
    from arcdeploy.serve import create_app

    server = ThreadServer(create_app(pkg, detector=SCRFD, timeout_s=0.001))
    try:
        r = httpx.post(f"{server.url}/v1/embed", files=_files(photos[:4]), timeout=60)
        assert r.status_code == 504 and "not answered within 0.001 s" in _one_line_error(r)
        _healthy(server.url)
    finally:
        server.close()


def test_sigterm_during_load_answers_every_accepted_request_and_exits_0(pkg, photos, expected_photos):
    s = _start(str(pkg.path), "--detector", str(SCRFD), "--workers", "1", "--max-batch", "4")
    picks = [k % len(photos) for k in range(48)]
    bodies = [{"files": _files([photos[k]])} for k in picks]
    accepted = [0.0]

    async def load_then_sigterm():
        task = asyncio.ensure_future(_concurrent(f"{s.url}/v1/embed", bodies, connections=48))
        async with httpx.AsyncClient() as client:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                text = (await client.get(f"{s.url}/metrics")).text
                accepted[0] = _metric(text, "arcdeploy_requests_in_flight")
                if accepted[0] >= 8:
                    break
                await asyncio.sleep(0.01)
        s.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        return await task

    answers = asyncio.run(load_then_sigterm())
    rc = s.proc.wait(120)  # type: ignore[union-attr]
    assert rc == 0, "".join(s.stderr)
    assert accepted[0] >= 8
    answered = [(k, a) for k, a in zip(picks, answers) if not isinstance(a, Exception)]
    # a request is either answered whole (never a 5xx) or was never taken (its connection refused or closed
    # before the server read it); every request the server had accepted when the signal came was answered
    assert all(a.status_code == 200 for _, a in answered), [a.status_code for _, a in answered]
    assert len(answered) >= accepted[0]
    for a in answers:
        if isinstance(a, Exception):
            assert isinstance(a, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)), repr(a)
    _close(np.concatenate([_rows(a.json()) for _, a in answered]), expected_photos[[k for k, _ in answered]])
    assert "Traceback" not in "".join(s.stderr)


@needs_real("models/scrfd_500m_kps.onnx")
def test_cli_detector_settings_reach_the_detector(tmp_path):
    """serve's --detector settings (threshold, minimum face, decode) are the detector spec's, as embed's."""
    from arcdeploy.cli import build_parser
    from arcdeploy.cli.serve import _open_detector

    serve = ["serve", str(tmp_path), "--detector", str(SCRFD)]
    args = build_parser().parse_args([*serve, "--det-threshold", "0.6", "--min-face", "20", "--decode", "planes"])
    spec = _open_detector(args)
    assert (spec.threshold, spec.min_face, spec.decode) == (0.6, 20.0, "planes")
    assert _open_detector(build_parser().parse_args(serve)).decode == "full"


def test_cli_refusals_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "arcdeploy", "serve", *args], capture_output=True, text=True, env=env, timeout=120
        )

    r = run(str(tmp_path / "nothing"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nothing" in r.stderr
    r = run(str(tmp_path), "--replicas", "2")
    assert r.returncode == 2 and "--replicas needs --ray" in r.stderr


# ------------------------------------------------------------------ Ray Serve


def test_serve_on_ray_gives_the_local_embeddings(request, pkg, crops, photos, expected_crops, expected_photos):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'arcdeploy[ray]')")
    two_nodes = request.getfixturevalue("cluster")  # the two-node loopback cluster of the Ray tests
    s = _start(
        str(pkg.path),
        "--ray",
        two_nodes.address,
        "--replicas",
        "2",
        "--detector",
        str(SCRFD),
        "--max-batch",
        "4",
        "--threads",
        "1",
        ready_timeout=300,
    )
    try:
        r = httpx.post(f"{s.url}/v1/embed", files=_files(crops), data={"aligned": "true"}, timeout=120)
        assert r.status_code == 200, r.text
        _close(_rows(r.json()), expected_crops)
        r = httpx.post(f"{s.url}/v1/embed", files=_files(photos), timeout=120)
        _close(_rows(r.json()), expected_photos)
        r = httpx.post(f"{s.url}/v1/embed", files=[("image", ("x.txt", b"text"))], timeout=60)
        assert r.json()["results"][0]["error"] == "x.txt: not an image (a text file)"
        # under load the requests spread over both replicas, one per node
        picks = [k % len(crops) for k in range(48)]
        bodies = [{"files": _files([crops[k]]), "data": {"aligned": "true"}} for k in picks]
        answers = asyncio.run(_concurrent(f"{s.url}/v1/embed", bodies, connections=48))
        assert all(not isinstance(a, Exception) and a.status_code == 200 for a in answers)
        _close(np.concatenate([_rows(a.json()) for a in answers]), expected_crops[picks])
        nodes = {re.sub(r" pid \d+$", "", a.headers["x-arcdeploy-instance"]) for a in answers}
        assert len(nodes) == 2, nodes
    finally:
        assert _stop(s, timeout=120) == 0, "".join(s.stderr)
