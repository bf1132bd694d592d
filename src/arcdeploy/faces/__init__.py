"""Faces in: decoding, 5-point alignment, the one preparation path and the embed pipeline."""

from ..manifest import ALIGNED_SIZE
from .align import TEMPLATE_112, align_face, estimate_transform, landmarks_problem, to_aligned
from .io import ImageError, image_size, images_root, list_images, read_image
from .landmarks import Landmarks, read_landmarks, reduce_68_to_5
from .pipeline import EmbedResult, embed_files, embed_images
from .prepare import MISSING, Failure, prepare_face, resolve_landmarks

__all__ = [
    "ALIGNED_SIZE",
    "TEMPLATE_112",
    "align_face",
    "estimate_transform",
    "landmarks_problem",
    "to_aligned",
    "ImageError",
    "image_size",
    "images_root",
    "list_images",
    "read_image",
    "Landmarks",
    "read_landmarks",
    "reduce_68_to_5",
    "EmbedResult",
    "Failure",
    "embed_files",
    "embed_images",
    "MISSING",
    "prepare_face",
    "resolve_landmarks",
]
