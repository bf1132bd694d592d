"""Fidelity: a package's embeddings against the fp32 PyTorch reference, per image.

Every package carries its fp32 reference (the exported TorchScript, at
``manifest["reference"]["file"]``), so it can be checked on its own. The
reference sees the same aligned crops through the section 3 convention
(float32 NCHW, (x - 127.5) / 127.5); the package sees them through its own
``Package.infer`` (so folded preprocessing is covered too).
"""
from __future__ import annotations

import os

import numpy as np

from .errors import ArcdeployError

# per-image cosine floors by precision (the acceptance levels)
FLOORS: dict[str, dict[str, float]] = {
    "fp32": {"min": 0.99999},
    "fp16": {"mean": 0.9995},
    "bf16": {"mean": 0.9995},
    "int8": {"mean": 0.99, "min": 0.97},
}
GENERATED_COUNT = 64
GENERATED_SEED = 9001  # far from the seeds the tests and demo calibrate with
REFERENCE_BATCH = 32


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(axis=1) / den


def summarize(cos: np.ndarray) -> dict:
    return {
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "p1": float(np.percentile(cos, 1)),
        "max": float(cos.max()),
        "n": int(cos.size),
    }


def floor_problems(stats: dict, floor: dict) -> list[str]:
    """What falls below the floor, e.g. ["mean 0.9512 < 0.99"]; empty when it passes."""
    return [f"{k} {stats[k]:.6f} < {v}" for k, v in floor.items() if not stats[k] >= v]


def reference_embeddings(model_path: str | os.PathLike, faces: np.ndarray, threads: int | None = None) -> np.ndarray:
    """fp32 embeddings of aligned uint8 crops from a TorchScript model (section 3 input)."""
    import torch

    from .faces.preprocess import to_model_input

    if threads:
        torch.set_num_threads(int(threads))
    try:
        model = torch.jit.load(str(model_path), map_location="cpu").float().eval()
    except Exception as exc:
        raise ArcdeployError(f"{model_path}: cannot load the fp32 reference ({type(exc).__name__})") from None
    outs = []
    with torch.inference_mode():
        for start in range(0, len(faces), REFERENCE_BATCH):
            x = to_model_input(faces[start:start + REFERENCE_BATCH])
            outs.append(model(torch.from_numpy(x)).numpy())
    return np.concatenate(outs).astype(np.float32)


def package_embeddings(pkg, faces: np.ndarray) -> np.ndarray:
    batch = pkg.manifest.get("batch") or REFERENCE_BATCH
    return np.concatenate([pkg.infer(faces[s:s + batch]) for s in range(0, len(faces), batch)])


def check(package, images=None, landmarks=None, count: int | None = None, threads: int | None = None,
          floor: dict | None = None, images_label: str | None = None) -> dict:
    """Per-image cosine of a package against its fp32 PyTorch reference.

    ``package``: a path or a loaded :class:`arcdeploy.package.Package`.
    ``images``: None (``count`` or 64 generated faces, :func:`arcdeploy.synth.aligned_faces`),
    an aligned uint8 array [N, 112, 112, 3], a folder, a list file, or a list of paths
    (aligned with ``landmarks`` when given). Returns
    ``{"cosine": {"mean", "min", "p1", "max", "n"}, "reference", "images", "floor",
    "passed", "below_floor", "engine", "precision", "worst", "per_image"}``.
    """
    from .package import load

    pkg = load(package, threads=threads)
    m = pkg.manifest
    ref = m.get("reference") or {}
    if not ref.get("file"):
        raise ArcdeployError(f"{pkg.path}: the package has no fp32 reference to check against (manifest 'reference')")
    ref_path = pkg.path / ref["file"]
    if not ref_path.exists():
        raise ArcdeployError(f"{ref_path}: the package's fp32 reference is missing")

    names: list[str] = []
    if images is None:
        from .synth import aligned_faces

        n = count or GENERATED_COUNT
        faces = aligned_faces(n, seed=GENERATED_SEED)
        label = images_label or "generated"
        source = f"arcdeploy.synth.aligned_faces(n={n}, seed={GENERATED_SEED})"
    else:
        from .calibration import load_images

        got = load_images(images, landmarks, limit=count, what="check images")
        faces, names = got.faces, got.names
        label = images_label or got.source
        source = got.source
    out = package_embeddings(pkg, faces)
    want = reference_embeddings(ref_path, faces, threads=threads)
    cos = cosine_rows(out, want)
    if not np.all(np.isfinite(cos)):
        cos = np.nan_to_num(cos, nan=-1.0)
    stats = summarize(cos)
    precision = m.get("precision", "fp32")
    floor = floor or FLOORS.get(precision, FLOORS["int8"])
    problems = floor_problems(stats, floor)
    order = np.argsort(cos)[:5]
    worst = [{"index": int(i), "cosine": float(cos[i]), **({"name": names[i]} if names else {})} for i in order]
    return {
        "cosine": stats,
        "reference": f"pytorch fp32 ({ref.get('kind', 'torchscript')} {ref['file']})",
        "images": label,
        "images_source": source,
        "engine": m.get("engine"),
        "precision": precision,
        "floor": floor,
        "passed": not problems,
        "below_floor": problems,
        "worst": worst,
        "per_image": [round(float(c), 7) for c in cos],  # for the report's histogram
    }
