"""A detector package (``arcdeploy build scrfd_500m_kps.onnx ...``) opened as a detector.

The package's model is the SCRFD graph with a batch axis and a fixed input, built for one engine
and precision (:mod:`arcdeploy.detector_package`); it takes the letterboxed canvases as uint8 NHWC
and normalises them inside the graph. Its manifest says which engine runs it, with which precision
hint, and at which canvas size; a package folder is given wherever a detector file is
(``--detector PKG``, :class:`~arcdeploy.faces.detectors.DetectorSpec`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ArcdeployError
from ...manifest import MANIFEST_NAME, DetectorManifest, is_detector_package, read_detector_manifest
from .base import GraphIO

if TYPE_CHECKING:
    from .registry import DetectorSpec
    from .scrfd import ScrfdDetector

log = logging.getLogger(__name__)


def check_package_folder(path: str | os.PathLike) -> DetectorManifest:
    """The manifest of the detector package at ``path``; a one-line error for a folder that is not one."""
    path = Path(path)
    if not is_detector_package(path):
        if (path / MANIFEST_NAME).is_file():
            raise ArcdeployError(f"{path}: a recognition package, not a face detector (give its detector instead)")
        raise ArcdeployError(f"{path}: a folder, not a detector file or a detector package")
    return read_detector_manifest(path)


def package_files(root: Path, manifest: DetectorManifest) -> list[Path]:
    """The files of a detector package, manifest first (what its identity hashes and what travels)."""
    names = [MANIFEST_NAME, *sorted(set(manifest.files.values()) | {manifest.reference})]
    return [root / n for n in names]


def detector_files(path: str | os.PathLike) -> dict[str, Path]:
    """What a detector consists of on disk, by name relative to the detector's parent folder: a
    file is itself; a package is its folder's files (``PKG/manifest.json``, ...)."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: path}
    manifest = check_package_folder(path)
    return {f"{path.name}/{p.relative_to(path).as_posix()}": p for p in package_files(path, manifest)}


def open_detector_package(spec: DetectorSpec) -> ScrfdDetector:
    """The SCRFD detector in the package ``spec.path``, run by the package's engine with its
    precision hint (``spec.engine`` is a raw file's setting: a package says its own)."""
    from ...engines import open_graph
    from .scrfd import ScrfdDetector

    root = Path(spec.path)
    m = check_package_folder(root)
    model = m.file(root)
    if "weights" in m.files:
        m.file(root, "weights")  # refused when it points outside the package
    if spec.input_size is not None and tuple(spec.input_size) != m.canvas:
        raise ArcdeployError(
            f"{root}: this detector package takes {m.canvas[0]}x{m.canvas[1]} canvases; "
            f"it cannot run at {spec.input_size[0]}x{spec.input_size[1]} (build another with --input-size)"
        )
    session = open_graph(
        model, engine=m.engine, threads=spec.threads, precision_hint=m.engine_config.get("inference_precision")
    )
    graph = GraphIO(
        root, [(t.name, list(t.shape)) for t in session.inputs], [(t.name, list(t.shape)) for t in session.outputs]
    )
    detector = ScrfdDetector(
        graph,
        engine=m.engine,
        threshold=spec.threshold,
        min_face=spec.min_face,
        threads=spec.threads,
        input_size=m.canvas,
        pad_retry=spec.pad_retry,
        decode=spec.decode,
        batch=spec.batch,
        session=session,
        layout=m.input.layout,
    )
    detector.files = package_files(root, m)
    detector.package = m
    return detector
