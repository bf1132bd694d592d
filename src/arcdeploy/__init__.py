"""arcdeploy: a face-recognition model in, a fast verified inference package out.

The Python API mirrors the command line::

    import arcdeploy
    arcdeploy.export("backbone.pth", "exported/")
    arcdeploy.build("backbone.pth", "pkg/", engine="openvino", precision="int8", calib="faces/")
    pkg = arcdeploy.load("pkg/")             # a built package
    feats = pkg.embed(["a.jpg", "b.jpg"])    # L2-normalised [N, 512]
    arcdeploy.compare(feats[0], feats[1])    # cosine similarity

These functions are the layer the CLI calls; the stages behind them live in their
own modules (export, build, fidelity, bench, evaluate). Where a user gives no images
for a fidelity check, this layer supplies generated faces and says so in the result.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

from .errors import ArcdeployError

try:
    __version__ = metadata.version("arcdeploy")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

GENERATED_CHECK_COUNT = 64
GENERATED_SEED = 9001  # far from the seeds the tests and demo calibrate with


def generated_check_images(count: int | None = None):
    """Generated aligned faces for a fidelity check when the user gives none (labelled "generated")."""
    from .options import CheckImages
    from .synthetic import aligned_faces

    n = count or GENERATED_CHECK_COUNT
    return CheckImages(
        aligned_faces(n, seed=GENERATED_SEED),
        "generated",
        f"arcdeploy.synthetic.aligned_faces(n={n}, seed={GENERATED_SEED})",
    )


def export(src, out_dir, **kwargs: Any):
    """A checkpoint or a foreign ONNX -> an export folder (see :func:`arcdeploy.exporter.export`)."""
    from .exporter import export as _export

    return _export(src, out_dir, **kwargs)


def build(src, out, options=None, **kwargs: Any):
    """Build a package (see :func:`arcdeploy.builder.build`) as ``options`` (a
    :class:`arcdeploy.options.BuildOptions`) or ``kwargs`` (its fields) say; checks on generated
    faces when no images are given and none are held out from the calibration set.
    ``precision="auto"``: the fastest precision this CPU runs that meets its floor on every group
    of the check faces (see :mod:`arcdeploy.auto_precision`)."""
    from .builder import build as _build
    from .options import BuildOptions
    from .types import Precision

    if options is None:
        options = BuildOptions.from_kwargs(**kwargs)
    elif kwargs:
        raise TypeError("build(): give options or keyword arguments, not both")
    if options.check_images is None and (options.calib is None or options.precision is Precision.INT8):
        # an int8 build holds out part of its calibration images; only when too few remain
        # does it need generated ones, which it asks for through this fallback
        if options.default_check_images is None:
            options.default_check_images = generated_check_images(options.check_count)
    return _build(src, out, options)


def check(package, images=None, count: int | None = None, **kwargs: Any):
    """Per-image cosine of a package against its fp32 reference (see :func:`arcdeploy.fidelity.check`);
    on generated faces when no images are given."""
    from .fidelity import check as _check

    if images is None:
        gen = generated_check_images(count)
        return _check(package, images=gen.faces, images_label=gen.label, images_source=gen.source, **kwargs)
    return _check(package, images=images, count=count, **kwargs)


def load(path, threads: int | None = None, **engine_options: Any):
    """Open a built package (see :class:`arcdeploy.package.Package`)."""
    from .package import load as _load

    return _load(path, threads=threads, **engine_options)


def compare(a, b) -> float:
    """Cosine similarity of two embeddings (any scale). A row of ``embed(..., flip=True)`` ([2, D]:
    the face and its mirror image) counts as the sum of the two, as insightface's flip test and
    ``eval`` take it; any other shape than [D], [1, D] or [2, D] is refused."""
    import numpy as np

    def one(x, which: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 2 and x.shape[0] in (1, 2):
            x = x.sum(axis=0)
        if x.ndim != 1:
            raise ArcdeployError(f"compare: {which} has shape {list(np.shape(x))}; give one embedding [D] or [2, D]")
        return x

    a, b = one(a, "the first embedding"), one(b, "the second embedding")
    if a.shape != b.shape:
        raise ArcdeployError(f"compare: embeddings of different sizes ({a.shape[0]} and {b.shape[0]})")
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


__all__ = ["ArcdeployError", "__version__", "build", "check", "compare", "export", "generated_check_images", "load"]
