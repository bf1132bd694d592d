"""IJB evaluation of packages and feature files (1:1 and 1:N): extraction, caching, results on disk.

A package's features are extracted once through the embed pipeline (resumable)
into ``OUTDIR/features_<name>_<target>_<flip|noflip>.npy`` with a record beside
it (``.json``): the package fingerprint, the images (names, sizes, modification
times, landmarks), flip, and the sha256 of the features file. A later evaluation
reuses the cache only when the record matches and the file still has that
checksum; otherwise it is recomputed (a damaged or edited cache is never
trusted).

One extraction serves both protocols: the cache is the same file for 1:1 and 1:N, and
:func:`evaluate_protocols` evaluates both from it in one pass. Result files in OUTDIR (1:1:
``<name>_<target>_scores.npy``, ``roc.png``, ``result.json``; 1:N: ``tpir_fpir.png``,
``cmc.png``, ``result_1n.json``) and ``json_path`` are not replaced without ``force``.
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
from .meta_1n import GALLERIES, has_1n_lists, list_paths, read_1n_lists
from .protocol import IJBResult, evaluate_features
from .protocol_1n import IJB1NResult, evaluate_features_1n, format_rank_table, format_tpir_table

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


def default_features_dir(target: str) -> Path:
    """Where features of packages are cached when no output folder is given: a folder of the
    current one that a rerun of the same command finds (and resumes from)."""
    return Path(f"ijb_{target.lower()}_features")


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


PROTOCOLS = ("1:1", "1:N")


def protocol_name(protocol: str) -> str:
    """ "1:1" or "1:N" (any case), or a one-line error."""
    p = str(protocol).strip().upper()
    if p not in PROTOCOLS:
        raise ArcdeployError(f"unknown IJB protocol {protocol!r}: use 1:1 (verification) or 1:N (identification)")
    return p


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
    protocol: str = "1:1",
) -> dict:
    """Evaluate packages (features extracted and cached in out_dir) or feature files.

    ``protocol``: "1:1" verification (TAR@FAR) or "1:N" identification (TPIR@FPIR, rank-k; needs the
    three 1:N list files, not the pair file). Returns the JSON document: the first method's fields at
    top level (1:1: ``target``, ``far``, ``tar``, ``mode``, ...; 1:N: ``protocol``, ``fpir``,
    ``tpir``, ``threshold``, ``rank``, ...) and ``results``, one entry per method, in order.
    Writes into out_dir, for 1:1: ``<name>_<target>_scores.npy`` per method, ``roc.png`` and
    ``result.json``; for 1:N: ``tpir_fpir.png``, ``cmc.png`` and ``result_1n.json``. Existing
    result files (and ``json_path``) are replaced only with ``force``.
    ``precision``: "float32" (insightface's arithmetic) or "float64" aggregation.
    ``log``: called with progress lines; warnings go to the ``logging`` module. ``ray``: a
    :class:`arcdeploy.distributed.RayOptions` to extract the features on a Ray cluster.
    """
    protocol = protocol_name(protocol)
    docs = evaluate_protocols(
        root,
        target,
        packages=packages,
        features=features,
        protocols=(protocol,),
        flip=flip,
        detector_score=detector_score,
        normalize_images=normalize_images,
        batch=batch,
        out_dir=out_dir,
        json_path=json_path,
        plot=plot,
        progress=progress,
        log=log,
        force=force,
        precision=precision,
        ray=ray,
    )
    return docs[protocol]


def evaluate_protocols(
    root: str | os.PathLike,
    target: str = "IJBC",
    packages=(),
    features=(),
    protocols=PROTOCOLS,
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
) -> dict[str, dict]:
    """:func:`evaluate_ijb` for several protocols from one feature extraction per package.

    Returns {protocol: its document}; ``json_path`` gets the document of the one protocol, or
    this dict when there are several."""
    say = log or (lambda *_: None)
    protocols = tuple(dict.fromkeys(protocol_name(p) for p in protocols))
    if not protocols:
        raise ArcdeployError("eval ijb: no protocol to evaluate")
    packages, features = list(packages or []), list(features or [])
    if not packages and not features:
        raise ArcdeployError("eval ijb: give one or more packages or --features FEATS.npy")
    meta = read_meta(root, target, pairs="1:1" in protocols)
    lists = read_1n_lists(root, meta.target, meta) if "1:N" in protocols else None
    # without out_dir nothing is written but what was asked for (json_path), and the features of
    # packages, cached where a rerun of the same command finds them and resumes
    out = Path(out_dir) if out_dir else None
    cache_dir = out or default_features_dir(meta.target)
    names = _unique_names([Path(p).name for p in packages] + [Path(f).stem for f in features])
    score_files = [out / f"{name}_{meta.target.lower()}_scores.npy" if out else None for name in names]
    _refuse_outputs(out, protocols, score_files, plot, json_path, force)  # before any work: it may take hours
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if packages:
        cache_dir.mkdir(parents=True, exist_ok=True)
    if meta.name_mismatches:
        logger.warning(
            "%d rows name different images in %s and %s (row order is what counts)",
            meta.name_mismatches,
            meta.files["tid_mid"].name,
            meta.files["5pts"].name,
        )
    verification: list[IJBResult] = []
    identification: list[IJB1NResult] = []
    sources = [("package", p) for p in packages] + [("features", f) for f in features]
    for name, sf, (kind, src) in zip(names, score_files, sources):
        if kind == "package":
            say(f"[{name}] extracting features of {meta.images} images ({'with' if flip else 'without'} flip) ...")
            feats, cache, _ = extract_features(
                src, meta, cache_dir, flip=flip, batch=batch, progress=progress, name=name, ray=ray
            )
            source = feat_file = str(cache)
        else:
            feats = load_features(src)
            source = feat_file = str(src)
        modes = dict(flip=flip, detector_score=detector_score, normalize_images=normalize_images, precision=precision)
        if "1:1" in protocols:
            verification.append(_verify(meta, feats, name, source, feat_file, sf, modes, force, say))
        if lists is not None:
            identification.append(_identify(meta, lists, feats, name, source, feat_file, modes, say))
        del feats
    docs: dict[str, dict] = {}
    if verification:
        docs["1:1"] = _verification_doc(verification, meta, out, plot, force)
    if identification:
        docs["1:N"] = _identification_doc(identification, meta, out, plot, force)
    if json_path:
        write_json_atomic(json_path, docs[protocols[0]] if len(protocols) == 1 else docs, force=force)
    return docs


def _refuse_outputs(out: Path | None, protocols, score_files, plot: bool, json_path, force: bool) -> None:
    outputs: list[Path] = []
    if out is not None and "1:1" in protocols:
        outputs += [*(f for f in score_files if f), out / "result.json", *([out / "roc.png"] if plot else [])]
    if out is not None and "1:N" in protocols:
        outputs += [out / "result_1n.json", *([out / "tpir_fpir.png", out / "cmc.png"] if plot else [])]
    if json_path:
        outputs.append(Path(json_path))
    for path in outputs:
        refuse_existing(path, force)


def _verify(meta, feats, name: str, source: str, feat_file: str, sf: Path | None, modes: dict, force, say):
    res = evaluate_features(meta, feats, name=name, source=source, **modes)
    if sf is not None:
        save_npy_atomic(sf, res.scores, force=force)
    res.scores_file, res.features_file = (str(sf) if sf else None), feat_file
    say(f"[{name}] {res.mode}: TAR@FAR=1e-4 {100 * res.tar[2]:.2f}%, 1e-5 {100 * res.tar[1]:.2f}%")
    return res


def _identify(meta, lists, feats, name: str, source: str, feat_file: str, modes: dict, say):
    res = evaluate_features_1n(meta, lists, feats, name=name, source=source, **modes)
    res.features_file = feat_file
    shown = res.shown()["mean"]
    say(
        f"[{name}] {res.mode} 1:N: mean TPIR@FPIR=1e-2 "
        + ("-" if shown[2] is None else f"{100 * shown[2]:.2f}%")
        + f", rank-1 {100 * res.rank(1):.2f}%"
    )
    return res


def _verification_doc(results: list[IJBResult], meta: IJBMeta, out: Path | None, plot: bool, force: bool) -> dict:
    doc = {"protocol": "1:1", **results[0].to_json()}
    doc["results"] = [r.to_json() for r in results]
    doc["table"] = format_tar_table([(f"{r.name}-{r.target}", r.tar) for r in results])
    if out is None:
        return doc
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
    return doc


def _identification_doc(results: list[IJB1NResult], meta: IJBMeta, out: Path | None, plot: bool, force: bool) -> dict:
    doc = results[0].to_json()
    doc["results"] = [r.to_json() for r in results]
    doc["table"] = format_tpir_table(results)
    doc["rank_table"] = format_rank_table(results)
    if out is None:
        return doc
    if plot:
        from ..plots import plot_cmc, plot_tpir_fpir

        tpir_png, cmc_png = out / "tpir_fpir.png", out / "cmc.png"
        curves = []
        for r in results:
            for g in (*GALLERIES, "mean"):
                tpir = r.tpir_mean if g == "mean" else r.galleries[g].tpir
                curves.append((f"{r.name} {r.labels.get(g, g)} ({r.mode})", r.fpir, tpir))
        plot_tpir_fpir(curves, tpir_png, title=f"1:N identification on {meta.target}", force=force)
        plot_cmc(
            [(f"{r.name} ({r.mode})", *r.cmc()) for r in results],
            cmc_png,
            title=f"CMC on {meta.target} (both galleries)",
            force=force,
        )
        doc["plots"] = {"tpir_fpir": str(tpir_png), "cmc": str(cmc_png)}
    write_json_atomic(out / "result_1n.json", doc, force=force)
    return doc


def evaluate_packages(
    packages, root, target: str = "IJBC", flip: bool = True, out_dir=None, identification: bool | None = None, **kw
) -> dict:
    """:func:`evaluate_ijb` for packages only (used by ``arcdeploy run``, which owns ``out_dir``:
    its results are replaced unless ``force=False`` is passed).

    The 1:1 document; with ``identification`` (default: when the 1:N list files are present) the
    1:N document too, under ``"identification"``, from the same features."""
    kw.setdefault("progress", False)
    kw.setdefault("force", True)
    if identification is None:
        identification = has_1n_lists(root, target)
        present = [p.name for p in list_paths(root, target).values() if p.exists()]
        if present and not identification:
            logger.warning("%s: only %s of the three 1:N list files; 1:N is left out", root, ", ".join(present))
    protocols = ("1:1", "1:N") if identification else ("1:1",)
    docs = evaluate_protocols(
        root, target, packages=[str(p) for p in packages], protocols=protocols, flip=flip, out_dir=out_dir, **kw
    )
    doc = dict(docs["1:1"])
    if "1:N" in docs:
        doc["identification"] = docs["1:N"]
    return doc
