"""Face galleries (1:N): enrol people's embeddings and search who a face is.

:func:`open_gallery` opens a folder (FAISS + SQLite, :mod:`.faiss_store`) or a PostgreSQL
database with pgvector (:mod:`.pgvector_store`); :class:`Gallery` checks the package's model
against the gallery's, normalises, embeds images (:func:`embed_for_gallery`) and searches.
"""

from __future__ import annotations

from .api import AddResult, Gallery, embed_for_gallery, open_gallery
from .store import GalleryInfo, GalleryStore, Match, ModelIdentity, SearchResult

__all__ = [
    "AddResult",
    "Gallery",
    "GalleryInfo",
    "GalleryStore",
    "Match",
    "ModelIdentity",
    "SearchResult",
    "embed_for_gallery",
    "open_gallery",
]
