"""Faces in: decoding, 5-point alignment, the one preparation path and the embed pipeline."""
from ..manifest import ALIGNED_SIZE
from .align import TEMPLATE_112, align_face, estimate_transform, to_aligned
from .io import ImageError, images_root, list_images, read_image
from .landmarks import Landmarks, read_landmarks, reduce_68_to_5
from .pipeline import EmbedResult, Failure, embed_files, embed_images

__all__ = ["ALIGNED_SIZE", "TEMPLATE_112", "align_face", "estimate_transform", "to_aligned",
           "ImageError", "images_root", "list_images", "read_image", "Landmarks", "read_landmarks",
           "reduce_68_to_5", "EmbedResult", "Failure", "embed_files", "embed_images"]
