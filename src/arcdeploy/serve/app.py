"""The HTTP service: a package (and optionally a face detector) as an ASGI application.

``create_app(package, detector=None, ...)`` returns a FastAPI application (mount it in your own
stack, or run it with ``arcdeploy serve``):

``POST /v1/embed``
    ``multipart/form-data`` with one or more parts named ``image`` (encoded image files) and the
    optional fields ``aligned`` (the images are 112x112 aligned crops: no detection) and
    ``all_faces`` (every face, not only the largest); or a JSON (or msgpack) body
    ``{"images": ["<base64>", ...], "aligned": bool, "all_faces": bool}``. Answer
    ``{"results": [{"faces": [{"embedding": [...], "box": [x1, y1, x2, y2], "landmarks":
    [[x, y] x 5], "score": s}], "error": null}, ...], "model": {...}}``, one result per image in
    order; an image that cannot be used has ``"error": "one line"`` and no faces (the others are
    still answered). An aligned crop has ``box``, ``landmarks`` and ``score`` null. With
    ``Accept: application/msgpack`` the answer is msgpack, embeddings as float32.
    Without a detector, images are aligned crops (as ``embed`` takes images without landmarks).
``POST /v1/compare``
    parts ``a`` and ``b`` (or JSON ``{"a": "<base64>", "b": "<base64>", "aligned": bool}``):
    ``{"cosine": c, "a": face, "b": face, "model": {...}}`` (each image's best face).
``GET /healthz``
    200 ``{"status": "ok"}`` once the model is loaded and warmed up, 503 before.
``GET /v1/model``
    the package's manifest in short (source, engine, precision, fidelity, what executes) and the
    serving settings.
``GET /metrics``
    Prometheus text: requests by endpoint and status, latency, faces per engine call, queue depth.
``GET /docs``, ``GET /openapi.json``
    the OpenAPI description.

Images are prepared (decoded, faces found, aligned) in a worker pool through the same path as
``arcdeploy embed``; the faces of concurrent requests share engine calls
(:class:`~arcdeploy.serve.batcher.Batcher`). Limits: at most ``max_queue`` embedding requests
accepted at once (the next gets 503 with ``Retry-After``; memory stays under about ``max_queue``
times ``max_body_bytes`` plus the images being decoded), a body of at most ``max_body_bytes``
(413), the decoding pixel limit of ``embed`` (a per-image error), ``timeout_s`` per request
(504). Every error is a one-line JSON ``{"error": "..."}`` and one log line; no traceback reaches
a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ArcdeployError, describe, first_line
from ..package import Package, load
from .adapter import (
    NON_FINITE,
    Detection,
    FaceFound,
    PreparedPart,
    default_batch,
    embed_crops,
    open_detection,
    pixel_limit,
    prepare_part,
)
from .batcher import Batcher, BatchStats, name_os_thread
from .metrics import Metrics

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_BODY = 64 * MiB
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_TIMEOUT_S = 60.0
MAX_IMAGES = 256  # images in one request
DEFAULT_TOP_K = 5
MAX_FIELD_BYTES = 64  # a form field (aligned, all_faces, top_k, threshold) is a word or a number
WORK_PATHS = ("/v1/embed", "/v1/compare", "/v1/search")
KNOWN_PATHS = (*WORK_PATHS, "/healthz", "/v1/model", "/metrics", "/docs", "/openapi.json")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
PREPARE_THREAD = "arcdeploy-prep"


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches and what it accepts.

    ``max_batch``: faces per engine call (default: the package's batch, else 32); 1 turns
    cross-request batching off. ``max_wait_ms``: how long the oldest waiting face may wait for
    others to fill a batch. ``max_queue``: embedding requests accepted at once (waiting or in work);
    beyond, 503. ``workers``: threads that decode, detect and align (default: CPUs, 2 to 8).
    ``max_body_bytes``: the largest request body (413 beyond). ``timeout_s``: the longest a
    request is worked on (504 beyond). ``max_pixels``: the decoding limit (default: embed's, 50
    megapixels or ``ARCDEPLOY_MAX_PIXELS``). ``warm_up``: "background" (the server answers at
    once, /healthz says 503 until the model is warm) or "startup" (the application's start waits
    for it). ``retry_after_s``: the ``Retry-After`` of a 503.
    """

    max_batch: int | None = None
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    workers: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_pixels: int | None = None
    warm_up: str = "background"
    retry_after_s: int = 1
    engine_streams: int = 1

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "workers",
            "max_body_bytes",
            "max_pixels",
            "retry_after_s",
            "engine_streams",
        ):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ArcdeployError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.max_wait_ms >= 0:
            raise ArcdeployError(f"max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not self.timeout_s > 0:
            raise ArcdeployError(f"timeout must be more than 0 seconds, got {self.timeout_s}")
        if self.warm_up not in ("background", "startup"):
            raise ArcdeployError(f"warm_up must be 'background' or 'startup', not {self.warm_up!r}")


class RequestError(Exception):
    """A request the service refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.headers = headers or {}


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than the limit of {_size(limit)}")


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


# ------------------------------------------------------------------ the service's state


@dataclass(frozen=True)
class Embedded:
    """One image's faces (None for an aligned crop) and their L2-normalised embeddings [k, D]."""

    faces: list[FaceFound | None]
    rows: np.ndarray


@dataclass
class _Upload:
    """One image of a request: a name for messages and its bytes (None: why not, in ``error``)."""

    name: str
    data: bytes | None
    error: str | None = None


class Service:
    """What one application holds: the package, the detector, the pools, the batcher, metrics."""

    def __init__(self, package: Package, detector, settings: ServeSettings, gallery=None):
        self.package = package
        self.gallery = _open_gallery(gallery, package)
        # one thread asks the gallery: its store (SQLite, a PostgreSQL connection) is one connection
        self.gallery_pool: ThreadPoolExecutor | None = None
        self.settings = settings
        self.max_batch = int(settings.max_batch or default_batch(package))
        self.workers = int(settings.workers or min(8, max(2, os.cpu_count() or 2)))
        self.detection: Detection | None = open_detection(detector) if detector is not None else None
        self.detection_all: Detection | None = (
            open_detection(self.detection, all_faces=True) if self.detection is not None else None
        )
        self.metrics = Metrics()
        self.ready = False
        self.load_error: str | None = None
        self.in_flight = 0
        self.on_the_way = 0  # requests whose images are being prepared, not yet queued for the engine
        self.pool: ThreadPoolExecutor | None = None
        self.batcher: Batcher | None = None
        self._warm_task: asyncio.Task | None = None
        m = package.manifest
        self.model = {
            "package": package.path.name,
            "arch": m.arch,
            "engine": m.engine,
            "precision": m.precision,
            "dim": int(m.output.dim),
        }

    # ---- life
    async def start(self) -> None:
        if self.gallery is not None:
            self.gallery_pool = ThreadPoolExecutor(1, thread_name_prefix="arcdeploy-gallery")
        self.pool = ThreadPoolExecutor(
            self.workers, thread_name_prefix=PREPARE_THREAD, initializer=name_os_thread, initargs=(PREPARE_THREAD,)
        )
        self.batcher = Batcher(
            self._run_engine,
            self.max_batch,
            self.settings.max_wait_ms / 1000.0,
            self._on_batch,
            engine_calls=self.settings.engine_streams,
            coming=lambda: self.on_the_way,
        )
        self.batcher.start()
        if self.settings.warm_up == "startup":
            await self._warm_up()
            if self.load_error:
                raise ArcdeployError(self.load_error)
        else:
            self._warm_task = asyncio.get_running_loop().create_task(self._warm_up())

    async def stop(self) -> None:
        if self._warm_task is not None:
            with contextlib.suppress(BaseException):
                await self._warm_task
        if self.batcher is not None:
            await self.batcher.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.gallery_pool is not None:
            self.gallery_pool.shutdown(wait=True, cancel_futures=True)
        if self.gallery is not None:
            self.gallery.close()

    async def _warm_up(self) -> None:
        """Open the engine and run it once at the largest batch and at one face (the engine then has
        what it compiles or allocates per shape ready), and the detector once."""

        def warm_engine() -> None:
            self.model["fingerprint"] = self.package.fingerprint()
            crops = np.full((self.max_batch, 112, 112, 3), 127, np.uint8)
            embed_crops(self.package, crops)
            embed_crops(self.package, crops[:1])

        def warm_detector() -> None:
            if self.detection is not None:
                self.detection.detector.detect(np.full((480, 640, 3), 127, np.uint8))

        assert self.batcher is not None
        t0 = time.perf_counter()
        try:
            await self.batcher.in_engine_thread(warm_engine)
            await asyncio.get_running_loop().run_in_executor(self.pool, warm_detector)
        except Exception as exc:
            self.load_error = f"{self.package.path}: the model failed to load ({describe(exc)})"
            log.error("%s", self.load_error)
            return
        log.info("model warmed up in %.1f s", time.perf_counter() - t0)
        self.ready = True
        self.metrics.ready.set(1)

    # ---- work
    def _run_engine(self, crops: np.ndarray) -> np.ndarray:
        return embed_crops(self.package, crops)

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batch_requests.observe(stats.pieces)
        self.metrics.engine_seconds.observe(stats.seconds)
        self.metrics.faces.inc(stats.size)
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.waiting)

    def detection_for(self, aligned: bool | None, all_faces: bool) -> Detection | None:
        if aligned is None:
            aligned = self.detection is None
        if aligned:
            if all_faces:
                raise RequestError(400, "all_faces=true needs photos (aligned=false): aligned crops are one face each")
            return None
        if self.detection is None:
            raise RequestError(
                400,
                "this server has no face detector (start it with --detector FILE); send aligned 112x112 crops "
                "with aligned=true",
            )
        return self.detection_all if all_faces else self.detection

    def _prepare(self, upload: _Upload, detection: Detection | None) -> PreparedPart | str:
        if upload.data is None:
            return f"{upload.name}: {upload.error}"
        t0 = time.perf_counter()
        try:
            return prepare_part(upload.data, upload.name, detection, self.settings.max_pixels)
        finally:
            self.metrics.prepare_seconds.observe(time.perf_counter() - t0)

    async def embed_uploads(self, uploads: list[_Upload], detection: Detection | None) -> list[Embedded | str]:
        """Each upload's faces with their embeddings, or a one-line reason why it has none."""
        assert self.pool is not None and self.batcher is not None
        loop = asyncio.get_running_loop()
        self.on_the_way += 1
        try:
            prepared = await asyncio.gather(
                *(loop.run_in_executor(self.pool, self._prepare, u, detection) for u in uploads)
            )
        finally:
            self.on_the_way -= 1
            # a batch waiting for this request: its faces come now (queued before the batcher runs
            # again), or never (none found, or the request gave up)
            self.batcher.nudge()
        ok = [p for p in prepared if isinstance(p, PreparedPart)]
        rows = np.empty((0, 0), np.float32)
        if ok:
            crops = ok[0].crops if len(ok) == 1 else np.concatenate([p.crops for p in ok])
            self.metrics.queue_depth.set(self.batcher.waiting + len(crops))
            rows = await self.batcher.embed(crops)
        out: list[Embedded | str] = []
        start = 0
        for upload, p in zip(uploads, prepared):
            if isinstance(p, PreparedPart):
                mine = rows[start : start + len(p.crops)]
                start += len(p.crops)
                # as embed does, a face the model gives as NaN or infinity is a failure, not a result
                done: Embedded | str = (
                    Embedded(p.faces, mine) if np.isfinite(mine).all() else f"{upload.name}: {NON_FINITE}"
                )
            else:
                done = p
            if isinstance(done, str):
                self.metrics.image_errors.inc()
                log.warning("image refused: %s", done)
            out.append(done)
        return out

    async def search(self, rows: np.ndarray, queries: list[str], top_k: int, threshold: float | None) -> list:
        """Each row's ``top_k`` identities in the gallery (``arcdeploy gallery search``'s answer)."""
        assert self.gallery is not None and self.gallery_pool is not None
        gallery, package = self.gallery, self.package

        def run():
            return gallery.search(rows, package, top_k=top_k, threshold=threshold, queries=queries)[0]

        return await asyncio.get_running_loop().run_in_executor(self.gallery_pool, run)


def _open_gallery(gallery, package: Package):
    """The gallery a server searches, checked against its package's model now (at start-up, not at
    the first request): a gallery of another model is refused in one line."""
    if gallery is None:
        return None
    from ..gallery import Gallery, open_gallery

    opened = gallery if isinstance(gallery, Gallery) else open_gallery(gallery)
    try:
        opened.check_package(package)
    except BaseException:
        opened.close()
        raise
    return opened


# ------------------------------------------------------------------ reading requests


def _media_type(request: Request) -> tuple[str, dict[str, str]]:
    raw = request.headers.get("content-type", "")
    kind, _, rest = raw.partition(";")
    params = {}
    for item in rest.split(";"):
        key, eq, value = item.strip().partition("=")
        if eq:
            params[key.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), params


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off", ""):
        return False
    raise RequestError(400, f"{name} must be true or false, got {str(value)[:40]!r}")


def _number(value: Any, name: str, kind: type, low: float, high: float):
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    try:
        number = kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not low <= number <= high:  # NaN too
        raise RequestError(400, f"{name} must be between {low:g} and {high:g}, got {number}")
    return number


def _text(raw: bytes | None, fallback: str) -> str:
    if not raw:
        return fallback
    return " ".join(raw.decode("utf-8", "backslashreplace").split()) or fallback


async def _multipart(request: Request, boundary: str | None) -> list[tuple[str, str | None, bytes]]:
    """The parts of a multipart/form-data body: (name, file name or None, bytes), in order."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary in its Content-Type")
    parts: list[tuple[str, str | None, bytes]] = []
    current: dict[str, Any] = {}
    header: dict[str, bytearray] = {}
    ended = [False]

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def on_header_end() -> None:
        current["headers"][bytes(header.get("field", b"")).lower()] = bytes(header.get("value", b""))
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].extend(data[start:end])

    def on_part_end() -> None:
        _, options = parse_options_header(current["headers"].get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise RequestError(400, "a multipart part without a name (Content-Disposition: form-data; name=...)")
        filename = options.get(b"filename")
        if len(parts) >= MAX_IMAGES + 8:
            raise RequestError(400, f"too many parts (at most {MAX_IMAGES} images)")
        parts.append(
            (
                name.decode("utf-8", "replace"),
                None if filename is None else filename.decode("utf-8", "backslashreplace"),
                bytes(current["data"]),
            )
        )

    def on_end() -> None:
        ended[0] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestError(400, f"malformed multipart body ({first_line(exc)})") from None
    if not ended[0]:
        raise RequestError(400, "malformed multipart body (it ends before its closing boundary)")
    return parts


def _decode_b64(item: Any, name: str) -> _Upload:
    if isinstance(item, (bytes, bytearray)):
        return _Upload(name, bytes(item))
    if not isinstance(item, str):
        return _Upload(name, None, f"expected a base64 string, got {type(item).__name__}")
    text = item
    if text.startswith("data:") and "," in text:  # a data: URI
        text = text.split(",", 1)[1]
    try:
        return _Upload(name, base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return _Upload(name, None, "not valid base64")


async def _structured_body(request: Request, kind: str) -> dict:
    body = await request.body()
    if not body:
        raise RequestError(400, f"empty {kind} body")
    try:
        if kind == "JSON":
            data = json.loads(body)
        else:
            import msgpack

            data = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise RequestError(400, f"malformed {kind} body ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the {kind} body must be an object, got {type(data).__name__}")
    return data


async def _read_form(request: Request, names: tuple[str, ...], fields: tuple[str, ...]) -> tuple[list, dict]:
    """A request's images by part name (multipart, or a JSON / msgpack object) and its fields."""
    kind, params = _media_type(request)
    files: dict[str, list[_Upload]] = {n: [] for n in names}
    values: dict[str, Any] = {}
    if kind == "multipart/form-data":
        for name, filename, data in await _multipart(request, params.get("boundary")):
            if name in names:
                files[name].append(_Upload(filename or f"{name} {len(files[name]) + 1}", data))
            elif name in fields:
                if len(data) > MAX_FIELD_BYTES:
                    raise RequestError(400, f"field {name} is too long ({len(data)} bytes) for a word or a number")
                values[name] = data
            else:
                raise RequestError(
                    400, f"unexpected part {name!r} (parts: {', '.join(names)}; fields: {', '.join(fields)})"
                )
    elif kind in ("application/json", *MSGPACK_TYPES):
        what = "JSON" if kind == "application/json" else "msgpack"
        body = await _structured_body(request, what)
        key = "images" if "image" in names else None
        for k, v in body.items():
            if k == key:
                if isinstance(v, dict) and isinstance(v.get("data"), list):  # InsightFace-REST's form
                    v = v["data"]
                if not isinstance(v, list):
                    raise RequestError(400, f"'images' must be a list of base64 strings, got {type(v).__name__}")
                files["image"] = [_decode_b64(item, f"image {i + 1}") for i, item in enumerate(v)]
            elif k in names and key is None:
                files[k] = [_decode_b64(v, k)]
            elif k in fields:
                values[k] = v
            else:
                expected = ", ".join([key] if key else list(names))
                raise RequestError(
                    400, f"unexpected key {k!r} in the {what} body (keys: {expected}, {', '.join(fields)})"
                )
    elif not kind:
        raise RequestError(415, "no Content-Type: send multipart/form-data or application/json")
    else:
        raise RequestError(415, f"unsupported Content-Type {kind}: send multipart/form-data or application/json")
    return [files[n] for n in names], values


def _wants_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return any(t in accept for t in MSGPACK_TYPES)


def _face_json(found: FaceFound | None, row: np.ndarray) -> dict:
    return {
        "embedding": row.tolist(),
        "box": None if found is None else found.box,
        "landmarks": None if found is None else found.landmarks,
        "score": None if found is None else found.score,
    }


def _answer(request: Request, content: dict) -> Response:
    if _wants_msgpack(request):
        import msgpack

        # float32 embeddings as msgpack float32: 5 bytes per number
        return Response(msgpack.packb(content, use_single_float=True), media_type="application/msgpack")
    return Response(json.dumps(content, separators=(",", ":")).encode(), media_type="application/json")


# ------------------------------------------------------------------ the ASGI gate: limits and metrics


class _Gate:
    """Pure ASGI middleware in front of the routes: readiness and the queue bound (503 with
    Retry-After before any of the body is read), the body limit (413), and every answer counted."""

    def __init__(self, app, service: Service, instance: str | None = None):
        self.app = app
        self.service = service
        self.instance = [(b"x-arcdeploy-instance", instance.encode())] if instance else []

    async def _refuse(self, send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc = self.service
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        t0 = time.perf_counter()
        status = [500]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.instance:
                    message = {**message, "headers": [*message.get("headers", []), *self.instance]}
            await send(message)

        work = path in WORK_PATHS and scope.get("method") == "POST"
        try:
            if not work:
                await self.app(scope, receive, counted_send)
                return
            retry = {"Retry-After": str(svc.settings.retry_after_s)}
            if not svc.ready:
                why = svc.load_error or "the model is loading; retry shortly"
                log.warning("%s %s 503: %s", scope.get("method"), path, why)
                await self._refuse(counted_send, 503, why, None if svc.load_error else retry)
                return
            if svc.in_flight >= svc.settings.max_queue:
                why = f"server busy: {svc.settings.max_queue} requests already queued; retry shortly"
                log.warning("%s %s 503: %s", scope.get("method"), path, why)
                await self._refuse(counted_send, 503, why, retry)
                return
            limit = svc.settings.max_body_bytes
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                why = f"request body of {_size(int(length))} is larger than the limit of {_size(limit)}"
                log.warning("%s %s 413: %s", scope.get("method"), path, why)
                await self._refuse(counted_send, 413, why)
                return
            seen = [0]

            async def limited_receive():
                message = await receive()
                if message.get("type") == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise BodyTooLarge(limit)
                return message

            svc.in_flight += 1
            svc.metrics.in_flight.set(svc.in_flight)
            try:
                await self.app(scope, limited_receive, counted_send)
            finally:
                svc.in_flight -= 1
                svc.metrics.in_flight.set(svc.in_flight)
        finally:
            svc.metrics.requests.labels(endpoint, str(status[0])).inc()
            svc.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


# ------------------------------------------------------------------ the application

_EMBED_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "aligned": {"type": "boolean", "description": "the images are 112x112 aligned crops"},
                        "all_faces": {"type": "boolean", "description": "every face, not only the largest"},
                    },
                    "required": ["image"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                        "aligned": {"type": "boolean"},
                        "all_faces": {"type": "boolean"},
                    },
                    "required": ["images"],
                }
            },
        },
    }
}
_SEARCH_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "aligned": {"type": "boolean"},
                        "top_k": {"type": "integer", "default": 5},
                        "threshold": {"type": "number", "description": "cosine; below it a query is unknown"},
                    },
                    "required": ["image"],
                }
            }
        },
    }
}

_COMPARE_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "a": {"type": "string", "format": "binary"},
                        "b": {"type": "string", "format": "binary"},
                        "aligned": {"type": "boolean"},
                    },
                    "required": ["a", "b"],
                }
            }
        },
    }
}


def open_package(package, threads: int | None = None, engine_streams: int = 1) -> Package:
    """A package (folder or :class:`Package`) opened for serving: with ``engine_streams`` above 1,
    an engine with asynchronous requests is compiled for throughput with that many streams (as
    ``arcdeploy bench --mode throughput --streams N`` compiles it) unless it is open already."""
    from ..engines import get_engine

    pkg = load(package, threads=threads)
    engine = get_engine(pkg.manifest.engine)
    if engine_streams > 1 and not pkg.loaded and engine.capabilities.async_requests:
        # the engine says how a runtime is set up for requests in flight (as bench asks it)
        for key, value in engine.runtime.options_for(True, int(engine_streams)).items():
            pkg.engine_options.setdefault(key, value)
    return pkg


def create_app(
    package,
    detector=None,
    settings: ServeSettings | None = None,
    instance: str | None = None,
    gallery=None,
    **options: Any,
) -> FastAPI:
    """The service as a FastAPI application.

    ``package``: a :class:`~arcdeploy.package.Package` or a package folder. ``detector``: None (images
    are aligned crops), a detector file (SCRFD or YuNet) or an opened detector. ``settings`` or
    keyword options: see :class:`ServeSettings`. ``instance``: a name for this copy of the service
    (a Ray replica's node and process), sent as the ``X-Arcdeploy-Instance`` header of every answer.
    ``gallery``: a gallery (folder, ``postgresql://...`` or an opened :class:`~arcdeploy.gallery.Gallery`)
    of the same model, searched by ``POST /v1/search``.
    The model is opened and warmed up when the application starts (its ASGI lifespan).
    """
    if settings is None:
        settings = ServeSettings(**options)
    elif options:
        settings = ServeSettings(**{**asdict(settings), **options})
    pkg = open_package(package, engine_streams=settings.engine_streams)
    service = Service(pkg, detector, settings, gallery)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="arcdeploy",
        version=__version__,
        summary="Face embeddings from an arcdeploy package over HTTP, batched across requests",
        lifespan=lifespan,
    )
    app.state.service = service
    _add_error_handlers(app)
    app.add_middleware(_Gate, service=service, instance=instance)
    _add_work_routes(app, service)
    _add_info_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error a client sees is one line of JSON, and one line in the log."""

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        log.warning("%s %s %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = " ".join(str(exc.detail).split())
        log.warning("%s %s %d: %s", request.method, request.url.path, exc.status_code, message)
        return JSONResponse({"error": message}, exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: Exception) -> Response:
        message = first_line(exc)
        log.warning("%s %s 400: %s", request.method, request.url.path, message)
        return JSONResponse({"error": f"malformed request ({message})"}, 400)

    async def internal_error(request: Request, exc: Exception) -> Response:
        message = describe(exc)
        log.error("%s %s 500: %s", request.method, request.url.path, message)
        return JSONResponse({"error": f"internal error: {message}"}, 500)

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


async def _within_timeout(settings: ServeSettings, work: Callable[[], Awaitable[Response]]) -> Response:
    try:
        async with asyncio.timeout(settings.timeout_s):
            return await work()
    except TimeoutError:
        raise RequestError(
            504, f"not answered within {settings.timeout_s:g} s (server overloaded, or very large images)"
        ) from None
    except ArcdeployError as exc:  # the engine failed a batch
        raise RequestError(500, first_line(exc)) from None


def _add_work_routes(app: FastAPI, service: Service) -> None:
    """The routes that embed: each bounded by the request timeout."""
    settings = service.settings

    @app.post(
        "/v1/embed",
        summary="Faces and their embeddings, one result per image",
        openapi_extra=_EMBED_DOC,
        responses={400: {"description": "malformed request"}, 413: {}, 415: {}, 503: {}, 504: {}},
    )
    async def embed(request: Request) -> Response:
        async def work() -> Response:
            (uploads,), values = await _read_form(request, ("image",), ("aligned", "all_faces"))
            if not uploads:
                raise RequestError(400, "no images: send parts named 'image' (or a JSON body with 'images')")
            if len(uploads) > MAX_IMAGES:
                raise RequestError(400, f"{len(uploads)} images in one request; at most {MAX_IMAGES}")
            aligned = _flag(values["aligned"], "aligned") if "aligned" in values else None
            all_faces = _flag(values.get("all_faces", False), "all_faces")
            detection = service.detection_for(aligned, all_faces)
            done = await service.embed_uploads(uploads, detection)
            results = [
                {"faces": [], "error": p}
                if isinstance(p, str)
                else {"faces": [_face_json(f, r) for f, r in zip(p.faces, p.rows)], "error": None}
                for p in done
            ]
            return _answer(request, {"results": results, "model": service.model})

        return await _within_timeout(settings, work)

    @app.post(
        "/v1/compare",
        summary="Cosine similarity of the best faces of two images",
        openapi_extra=_COMPARE_DOC,
        responses={400: {}, 413: {}, 415: {}, 422: {"description": "an image without a usable face"}, 503: {}},
    )
    async def compare(request: Request) -> Response:
        async def work() -> Response:
            (a, b), values = await _read_form(request, ("a", "b"), ("aligned",))
            if len(a) != 1 or len(b) != 1:
                raise RequestError(400, "send exactly one image as part 'a' and one as part 'b'")
            aligned = _flag(values["aligned"], "aligned") if "aligned" in values else None
            detection = service.detection_for(aligned, False)
            done = await service.embed_uploads([a[0], b[0]], detection)
            for which, p in zip("ab", done):
                if isinstance(p, str):
                    raise RequestError(422, f"{which}: {p}")
            fa, fb = (p for p in done if isinstance(p, Embedded))
            ra, rb = fa.rows[0], fb.rows[0]
            cosine = float(np.dot(ra.astype(np.float64), rb.astype(np.float64)))
            return _answer(
                request,
                {
                    "cosine": cosine,
                    "a": _face_json(fa.faces[0], ra),
                    "b": _face_json(fb.faces[0], rb),
                    "model": service.model,
                },
            )

        return await _within_timeout(settings, work)

    _add_search_route(app, service)


def _add_search_route(app: FastAPI, service: Service) -> None:
    """POST /v1/search: each image's best face, embedded as /v1/embed does, searched in the gallery."""
    settings = service.settings

    @app.post(
        "/v1/search",
        summary="Who is this? Each image's best face searched in the server's gallery",
        openapi_extra=_SEARCH_DOC,
        responses={400: {}, 404: {"description": "the server has no gallery"}, 413: {}, 415: {}, 503: {}},
    )
    async def search(request: Request) -> Response:
        async def work() -> Response:
            if service.gallery is None:
                raise RequestError(404, "this server has no gallery (start it with --gallery GALLERY)")
            (uploads,), values = await _read_form(request, ("image",), ("aligned", "top_k", "threshold"))
            if not uploads:
                raise RequestError(400, "no images: send parts named 'image' (or a JSON body with 'images')")
            if len(uploads) > MAX_IMAGES:
                raise RequestError(400, f"{len(uploads)} images in one request; at most {MAX_IMAGES}")
            aligned = _flag(values["aligned"], "aligned") if "aligned" in values else None
            top_k = _number(values.get("top_k", DEFAULT_TOP_K), "top_k", int, 1, 1000)
            threshold = _number(values["threshold"], "threshold", float, -1.0, 1.0) if "threshold" in values else None
            done = await service.embed_uploads(uploads, service.detection_for(aligned, False))
            found = [(u.name, p) for u, p in zip(uploads, done) if isinstance(p, Embedded)]
            rows = np.stack([p.rows[0] for _, p in found]) if found else np.empty((0, 0), np.float32)
            answers = iter(await service.search(rows, [n for n, _ in found], top_k, threshold) if found else [])
            results = []
            for upload, p in zip(uploads, done):
                if isinstance(p, str):
                    results.append({"query": upload.name, "face": None, "matches": [], "error": p})
                    continue
                face = _face_json(p.faces[0], p.rows[0])
                face.pop("embedding")
                results.append({"query": upload.name, "face": face, **next(answers).to_json(), "error": None})
            return _answer(request, {"results": results, "model": service.model})

        return await _within_timeout(settings, work)


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """Readiness, the model, and metrics."""
    settings = service.settings

    @app.get("/healthz", summary="200 once the model is loaded and warmed up")
    async def healthz() -> Response:
        if service.ready:
            return JSONResponse({"status": "ok"})
        if service.load_error:
            return JSONResponse({"status": "failed", "error": service.load_error}, 503)
        return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/v1/model", summary="The package's manifest in short, and the serving settings")
    async def model() -> Response:
        return JSONResponse(_model_description(service))

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        if service.batcher is not None:
            service.metrics.queue_depth.set(service.batcher.waiting)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_description(service: Service) -> dict:
    pkg = service.package
    m = pkg.manifest
    runtime = None
    if service.ready:
        with contextlib.suppress(Exception):
            runtime = pkg.describe().to_json()
    s = service.settings
    return {
        **service.model,
        "requested_precision": m.requested_precision,
        "device": m.device,
        "source": m.source.to_json() if m.source is not None else None,
        "input": m.input.to_json(),
        "output": m.output.to_json(),
        "fidelity": m.fidelity.to_json() if m.fidelity is not None else None,
        "executed": m.executed.to_json() if m.executed is not None else None,
        "runtime": runtime,
        "versions": m.versions,
        "detector": service.detection.describe() if service.detection is not None else None,
        "serving": {
            "max_batch": service.max_batch,
            "max_wait_ms": s.max_wait_ms,
            "engine_streams": s.engine_streams,
            "max_queue": s.max_queue,
            "workers": service.workers,
            "max_body_bytes": s.max_body_bytes,
            "timeout_s": s.timeout_s,
            "max_images": MAX_IMAGES,
            "max_pixels": pixel_limit(s.max_pixels),
        },
    }
