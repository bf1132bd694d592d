"""LFW-style ``.bin`` verification sets, as insightface's ``verification.py`` scores them.

A ``.bin`` is a pickle of ``(bins, issame_list)``: 2N encoded aligned 112x112
faces (pair partners consecutive) and N booleans; any other count of images is
refused (naming both counts), not scored in part. It is read with a restricted
unpickler that builds only bytes, lists, tuples, booleans and plain numpy
arrays; anything else (a hostile or foreign pickle) is refused before it runs.
Python 2 files hold the images as ``str``, which Python 3 only loads with
``encoding='bytes'``; as insightface does, the default encoding is tried first.

Images: decoded as RGB. One whose width is not 112 is resized as insightface's
``load_bin`` does (mxnet ``resize_short``: the shorter side to 112, aspect ratio
kept, bicubic; here OpenCV's ``INTER_CUBIC``); insightface then copies it into a
112x112 slot, which fails unless the result is 112x112, so a non-square image
(or one 112 wide but not 112 high) is refused with that reason.

Protocol: embedding = L2-normalise(f(img) + f(fliplr(img))) (raw features,
summed in float64); distance = squared L2 between partners; thresholds
0.00 ... 3.99 step 0.01; "same" when distance < threshold; 10 contiguous folds;
per fold the first threshold with the best accuracy on the other nine, scored
on the held-out fold; mean and population std of the fold accuracies. XNorm is
insightface's: the mean L2 norm of the raw embeddings of all images and all
flipped images (each on its own, not their sum).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError, first_line
from ..tables import box_table

THRESHOLDS = np.arange(0, 4, 0.01)
FOLDS = 10

# the only globals a .bin pickle may name: numpy's array/scalar reconstruction (old and new module names),
# and _codecs.encode for bytes in protocol-2 pickles written by Python 3 (see _latin1_bytes)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        self.what = f"{module}.{name}"
        super().__init__(self.what)


def _latin1_bytes(text, encoding="latin1"):
    """What Python 3 writes for ``bytes`` in protocol 0-2 pickles: ``_codecs.encode(str, 'latin1')``.
    Only that exact use is honoured."""
    codec = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(text, str) or codec not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as str -> latin1 bytes")
    return text.encode("latin1")


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise RefusedGlobal(module, name)
        import importlib

        try:
            mod = importlib.import_module(target[0])
        except ImportError:  # numpy < 2 has numpy.core only
            mod = importlib.import_module(target[0].replace("numpy._core", "numpy.core"))
        return getattr(mod, target[1])

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _unpickle(data: bytes, encoding: str):
    return _BinUnpickler(io.BytesIO(data), encoding=encoding).load()


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N booleans) of a .bin set, read without running any code from it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArcdeployError(f"{path}: no such .bin file") from None
    except OSError as exc:
        raise ArcdeployError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        try:
            obj = _unpickle(data, "ASCII")
        except UnicodeDecodeError:
            obj = _unpickle(data, "bytes")  # Python 2 pickle: image str -> bytes
    except RefusedGlobal as exc:
        raise ArcdeployError(
            f"{path}: refused: the pickle asks for {exc.what}, which a .bin set never needs "
            "(not loaded; the file is foreign or hostile)"
        ) from None
    except Exception as exc:  # any malformed pickle: one line, never a traceback
        raise ArcdeployError(f"{path}: not a readable .bin pickle ({first_line(exc)})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ArcdeployError(
            f"{path}: not a .bin set (expected a pickled (bins, issame_list) pair, got {type(obj).__name__})"
        )
    bins, issame = obj
    if isinstance(bins, np.ndarray) and bins.dtype != object:
        raise ArcdeployError(
            f"{path}: bins must be a list of encoded images, got an array {bins.dtype} {list(bins.shape)}"
        )
    if not isinstance(bins, (list, tuple, np.ndarray)) or not all(
        isinstance(b, (bytes, bytearray)) or (isinstance(b, np.ndarray) and b.dtype == np.uint8) for b in bins
    ):
        raise ArcdeployError(f"{path}: bins must hold encoded image bytes")
    bins = [b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bins]
    try:
        issame_arr = np.asarray(issame)
    except Exception:
        raise ArcdeployError(f"{path}: issame_list is not a list of booleans") from None
    if (
        issame_arr.ndim != 1
        or issame_arr.size == 0
        or not (
            issame_arr.dtype == bool
            or (np.issubdtype(issame_arr.dtype, np.integer) and np.isin(issame_arr, (0, 1)).all())
        )
    ):
        raise ArcdeployError(f"{path}: issame_list must be a non-empty list of booleans")
    n = issame_arr.size
    if len(bins) != 2 * n:
        raise ArcdeployError(
            f"{path}: {len(bins)} images for {n} pairs; a .bin set holds exactly 2 images per "
            f"pair label ({2 * n} images for {n} labels)"
        )
    if n < FOLDS:
        raise ArcdeployError(f"{path}: {n} pairs; 10-fold evaluation needs at least 10")
    return bins, issame_arr.astype(bool)


def bin_face(img: np.ndarray, name: str = "<image>", size: int = 112) -> np.ndarray:
    """A decoded .bin image as insightface's ``load_bin`` uses it (module doc): resized with the
    shorter side to ``size`` (bicubic) when its width is not ``size``; refused unless the result
    is ``size`` x ``size``."""
    import cv2

    h, w = img.shape[:2]
    if w != size:
        # mxnet resize_short: integer arithmetic for the longer side
        nh, nw = (size * h // w, size) if h > w else (size, size * w // h)
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)
    if img.shape[:2] != (size, size):
        raise ArcdeployError(
            f"{name}: a {w}x{h} image; insightface resizes its shorter side to {size} and then "
            f"needs {size}x{size} (got {img.shape[1]}x{img.shape[0]}), so a .bin set must hold "
            "square faces"
        )
    return img


def decode_faces(bins: list[bytes], path: str | os.PathLike = "<bin>") -> np.ndarray:
    """Encoded images -> RGB uint8 [2N, 112, 112, 3] (see :func:`bin_face` for other sizes)."""
    from ..faces.io import decode_image

    out = np.empty((len(bins), 112, 112, 3), np.uint8)
    for i, b in enumerate(bins):
        name = f"{path}[image {i}]"
        out[i] = bin_face(decode_image(b, name), name)
    return out


def fold_bounds(n: int, folds: int = FOLDS) -> np.ndarray:
    """Start offsets (folds + 1) of sklearn KFold(n_splits=folds, shuffle=False) test folds."""
    sizes = np.full(folds, n // folds, np.int64)
    sizes[: n % folds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass
class BinAccuracy:
    accuracy: float
    std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray


def verification_accuracy(
    embeddings: np.ndarray, issame, folds: int = FOLDS, thresholds: np.ndarray = THRESHOLDS
) -> BinAccuracy:
    """10-fold accuracy of L2-normalised embeddings [2N, D] (partners at 2k, 2k+1)."""
    issame = np.asarray(issame, bool)
    e = np.asarray(embeddings, np.float64)
    e1, e2 = e[0::2], e[1::2]
    n = min(issame.size, e1.shape[0])
    issame = issame[:n]
    dist = np.sum(np.square(e1[:n] - e2[:n]), 1)
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]  # [thresholds, pairs]
    bounds = fold_bounds(n, folds)
    per_fold = np.add.reduceat(correct, bounds[:-1], axis=1).astype(np.int64)  # [thresholds, folds]
    sizes = np.diff(bounds)
    total = per_fold.sum(axis=1)
    accs, best = np.empty(folds), np.empty(folds)
    for k in range(folds):
        # training folds share one denominator, so the first best count is the first best accuracy
        b = int(np.argmax(total - per_fold[:, k]))
        best[k] = thresholds[b]
        accs[k] = per_fold[b, k] / sizes[k]
    return BinAccuracy(float(np.mean(accs)), float(np.std(accs)), accs, best)


def embed_pairs(package, faces: np.ndarray, batch: int = 64) -> tuple[np.ndarray, float]:
    """(L2-normalised flip-summed embeddings float64 [2N, D], XNorm) through a package."""
    raws = []
    for flip in (False, True):
        chunks = []
        for s in range(0, faces.shape[0], batch):
            x = faces[s : s + batch]
            chunks.append(package.infer(np.ascontiguousarray(x[:, :, ::-1]) if flip else x))
        raws.append(np.concatenate(chunks).astype(np.float64))
    xnorm = float(np.mean(np.concatenate([np.linalg.norm(r, axis=1) for r in raws])))
    emb = raws[0] + raws[1]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb /= np.where(norms > 0, norms, 1.0)
    return emb, xnorm


@dataclass
class BinResult:
    """The accuracy of one package on one .bin set."""

    name: str
    file: str
    package: str
    pairs: int
    accuracy: float
    std: float
    xnorm: float
    fold_accuracies: list[float] = field(default_factory=list)
    fold_thresholds: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "file": self.file,
            "package": self.package,
            "pairs": self.pairs,
            "accuracy": self.accuracy,
            "std": self.std,
            "xnorm": self.xnorm,
            "fold_accuracies": list(self.fold_accuracies),
            "fold_thresholds": list(self.fold_thresholds),
        }

    @classmethod
    def from_json(cls, data: dict) -> BinResult:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def evaluate_bins(package, paths, batch: int = 64, log=None) -> list[BinResult]:
    """Every .bin set through one package (path or :class:`arcdeploy.package.Package`), in order;
    ``log`` gets insightface's two lines per set."""
    from ..package import load

    pkg = load(package)
    results = []
    for p in paths:
        r = _evaluate_one(pkg, Path(p), batch)
        if log:
            log(f"[{r.name}]XNorm: {r.xnorm:f}")
            log(f"[{r.name}]Accuracy-Flip: {r.accuracy:1.5f}+-{r.std:1.5f}")
        results.append(r)
    return results


def _evaluate_one(pkg, path: Path, batch: int) -> BinResult:
    bins, issame = read_bin(path)
    faces = decode_faces(bins, path)
    emb, xnorm = embed_pairs(pkg, faces, batch=batch)
    if not np.all(np.isfinite(emb)):
        raise ArcdeployError(f"{pkg.path}: the model gave non-finite embeddings on {path.name}")
    acc = verification_accuracy(emb, issame)
    return BinResult(
        name=path.stem,
        file=str(path),
        package=str(pkg.path),
        pairs=int(issame.size),
        accuracy=acc.accuracy,
        std=acc.std,
        xnorm=xnorm,
        fold_accuracies=acc.fold_accuracies.tolist(),
        fold_thresholds=acc.fold_thresholds.tolist(),
    )


def format_bin_table(rows: list) -> str:
    """The accuracy table: one row per (package, set); rows are :class:`BinResult` or their JSON."""
    header = ["package", "set", "pairs", "accuracy %", "std %", "XNorm"]
    rows = [r.to_json() if isinstance(r, BinResult) else r for r in rows]
    body = [
        [
            Path(r["package"]).name,
            r["name"],
            str(r["pairs"]),
            f"{100 * r['accuracy']:.2f}",
            f"{100 * r['std']:.2f}",
            f"{r['xnorm']:.3f}",
        ]
        for r in rows
    ]
    return box_table(header, body)
