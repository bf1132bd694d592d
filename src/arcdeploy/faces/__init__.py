"""Faces in: decoding, detection, 5-point alignment, the one preparation path and the embed job.

``types`` (the values every stage passes on), ``io`` (decoding), ``detectors/`` (SCRFD, YuNet and
their registry), ``align`` and ``landmarks``, ``prepare`` (image -> aligned crops), ``job``
(:class:`EmbedJob`), ``pipeline`` (:func:`run_local`), ``chunks`` (resumable output),
``calibration`` (image sets for int8) and ``detect`` (the detect stage's files).
"""

from ..manifest import ALIGNED_SIZE
from .align import TEMPLATE_112, align_face, estimate_transform, landmarks_problem, to_aligned
from .io import image_size, images_root, list_images, read_image
from .job import EmbedJob
from .landmarks import Landmarks, read_landmarks, reduce_68_to_5
from .pipeline import EmbedResult, embed_files, embed_images, run_local
from .prepare import prepare_face, resolve_landmarks
from .types import MISSING, EncodedImage, Face, Failure, ImageError

__all__ = [
    "ALIGNED_SIZE",
    "MISSING",
    "TEMPLATE_112",
    "EmbedJob",
    "EmbedResult",
    "EncodedImage",
    "Face",
    "Failure",
    "ImageError",
    "Landmarks",
    "align_face",
    "embed_files",
    "embed_images",
    "estimate_transform",
    "image_size",
    "images_root",
    "landmarks_problem",
    "list_images",
    "prepare_face",
    "read_image",
    "read_landmarks",
    "reduce_68_to_5",
    "resolve_landmarks",
    "run_local",
    "to_aligned",
]
