"""IJB evaluation of packages and feature files: extraction, caching, results on disk.

A package's features are extracted once through the embed pipeline (resumable)
into ``OUTDIR/features_<name>_<target>_<flip|noflip>.npy`` with a record beside
it (``.json``): the package fingerprint, the images (names, sizes, modification
times, landmarks), flip, and the sha256 of the features file. A later evaluation
reuses the cache only when the record matches and the file still has that
checksum; otherwise it is recomputed (a damaged or edited cache is never
trusted).

Result files in OUTDIR (``<name>_<target>_scores.npy``, ``roc.png``,
``result.json``) and ``json_path`` are not replaced without ``force``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ...errors import ArcdeployError, first_line
from ...files import refuse_existing, save_npy_atomic, write_json_atomic
from ..roc import format_tar_table
from .meta import IJBMeta, read_meta
from .protocol import IJBResult, evaluate_features

logger = logging.getLogger(__name__)

CACHE_FORMAT = "arcdeploy-ijb-features/2"


def load_features(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise ArcdeployError(f"{path}: no such features file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ArcdeployError(f"{path}: not a readable .npy array ({first_line(exc)})") from None


def _file_sha256(path: Path) -> str | None:
    from ...utils import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def extract_features(
    package,
    meta: IJBMeta,
    out_dir: Path,
    flip: bool = True,
    batch: int | None = None,
    progress: bool = True,
    name: str | None = None,
    ray=None,
) -> tuple[np.ndarray, Path, int]:
    """Raw features of every IJB image through the package, cached in out_dir (module doc).

    ``ray``: a :class:`arcdeploy.distributed.RayOptions` to extract them on a Ray cluster
    (the same features). Returns (features, cache path, number of failed images).
    """
    from ...faces.chunks import images_identity
    from ...faces.job import EmbedJob
    from ...faces.pipeline import EmbedResult
    from ...package import load

    pkg = load(package)
    name = name or Path(pkg.path).name
    cache = out_dir / f"features_{name}_{meta.target.lower()}_{'flip' if flip else 'noflip'}.npy"
    record_path = cache.with_suffix(".json")
    paths = meta.image_paths()
    record = {
        "format": CACHE_FORMAT,
        "package": pkg.fingerprint(),
        "images": images_identity(paths, np.asarray(meta.landmarks, np.float32)),
        "count": meta.images,
        "flip": bool(flip),
        "raw": True,
    }
    old = _read_record(record_path) if cache.exists() else None
    if old is not None and {k: old.get(k) for k in record} == record:
        if old.get("sha256") and _file_sha256(cache) == old["sha256"]:
            return load_features(cache), cache, int(old.get("failed", 0))
        logger.warning(
            "%s: the cached features do not match the checksum in %s; extracting them again", cache, record_path.name
        )
    res: EmbedResult
    job = EmbedJob.create(
        paths, landmarks=meta.landmarks, flip=flip, raw=True, batch=batch, output=cache, progress=progress, force=True
    )
    if ray is not None:
        from ...distributed import run_on_ray

        res = run_on_ray(job, pkg, ray)
    else:
        from ...faces.pipeline import run_local

        res = run_local(job, pkg)
    n_failed = len(res.failures or [])
    write_json_atomic(record_path, {**record, "sha256": _file_sha256(cache), "failed": n_failed})
    return np.asarray(res.features), cache, n_failed


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 1
            out.append(n)
    return out


def evaluate_ijb(
    root: str | os.PathLike,
    target: str = "IJBC",
    packages=(),
    features=(),
    flip: bool = True,
    detector_score: bool = True,
    normalize_images: bool = False,
    batch: int | None = None,
    out_dir: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    plot: bool = True,
    progress: bool = True,
    log=None,
    force: bool = False,
    precision: str = "float32",
    ray=None,
) -> dict:
    """Evaluate packages (features extracted and cached in out_dir) or feature files.

    Returns the JSON document: the first method's fields at top level (``target``,
    ``far``, ``tar``, ``mode``, ...) and ``results``, one entry per method, in order.
    Writes ``<name>_<target>_scores.npy`` per method, ``roc.png`` and ``result.json``
    into out_dir; existing result files (and ``json_path``) only with ``force``.
    ``precision``: "float32" (insightface's arithmetic) or "float64" aggregation.
    ``log``: called with progress lines; warnings go to the ``logging`` module. ``ray``: a
    :class:`arcdeploy.distributed.RayOptions` to extract the features on a Ray cluster.
    """
    say = log or (lambda *_: None)
    packages, features = list(packages or []), list(features or [])
    if not packages and not features:
        raise ArcdeployError("eval ijb: give one or more packages or --features FEATS.npy")
    meta = read_meta(root, target)
    out = Path(out_dir) if out_dir else Path(f"ijb_{meta.target.lower()}_results")
    names = _unique_names([Path(p).name for p in packages] + [Path(f).stem for f in features])
    score_files = [out / f"{name}_{meta.target.lower()}_scores.npy" for name in names]
    outputs = [
        *score_files,
        out / "result.json",
        *([out / "roc.png"] if plot else []),
        *([Path(json_path)] if json_path else []),
    ]
    for path in outputs:  # before any work: extraction may take hours
        refuse_existing(path, force)
    out.mkdir(parents=True, exist_ok=True)
    if meta.name_mismatches:
        logger.warning(
            "%d rows name different images in %s and %s (row order is what counts)",
            meta.name_mismatches,
            meta.files["tid_mid"].name,
            meta.files["5pts"].name,
        )
    results: list[IJBResult] = []
    sources = [("package", p) for p in packages] + [("features", f) for f in features]
    for name, sf, (kind, src) in zip(names, score_files, sources):
        if kind == "package":
            say(f"[{name}] extracting features of {meta.images} images ({'with' if flip else 'without'} flip) ...")
            feats, cache, _ = extract_features(
                src, meta, out, flip=flip, batch=batch, progress=progress, name=name, ray=ray
            )
            source = feat_file = str(cache)
        else:
            feats = load_features(src)
            source = feat_file = str(src)
        res = evaluate_features(
            meta,
            feats,
            name=name,
            flip=flip,
            detector_score=detector_score,
            normalize_images=normalize_images,
            source=source,
            precision=precision,
        )
        del feats
        save_npy_atomic(sf, res.scores, force=force)
        res.scores_file, res.features_file = str(sf), feat_file
        results.append(res)
        say(f"[{name}] {res.mode}: TAR@FAR=1e-4 {100 * res.tar[2]:.2f}%, 1e-5 {100 * res.tar[1]:.2f}%")
    doc = dict(results[0].to_json())
    doc["results"] = [r.to_json() for r in results]
    doc["table"] = format_tar_table([(f"{r.name}-{r.target}", r.tar) for r in results])
    if plot:
        from ..plots import plot_roc

        png = out / "roc.png"
        plot_roc(
            [(f"{r.name} ({r.mode})", r.fpr, r.tpr, r.auc) for r in results],
            png,
            title=f"ROC on {meta.target}",
            force=force,
        )
        doc["plot"] = str(png)
    write_json_atomic(out / "result.json", doc, force=force)
    if json_path:
        write_json_atomic(json_path, doc, force=force)
    return doc


def evaluate_packages(packages, root, target: str = "IJBC", flip: bool = True, out_dir=None, **kw) -> dict:
    """:func:`evaluate_ijb` for packages only (used by ``arcdeploy run``, which owns ``out_dir``:
    its results are replaced unless ``force=False`` is passed)."""
    kw.setdefault("progress", False)
    kw.setdefault("force", True)
    return evaluate_ijb(root, target, packages=[str(p) for p in packages], flip=flip, out_dir=out_dir, **kw)
