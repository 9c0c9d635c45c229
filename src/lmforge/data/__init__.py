"""Data: read sources, split and tokenize them once into a cache folder, and draw training batches."""
from .batches import get_batch
from .prepare import Prepared, ValDocument, open_prepared, prepare
from .sources import Document, read_sources

__all__ = ["Document", "Prepared", "ValDocument", "get_batch", "open_prepared", "prepare", "read_sources"]
