"""Data: read sources, split and tokenize them once into a cache folder, and draw training batches."""
from .batches import Batches, get_batch, lm_batches
from .prepare import Prepared, ValDocument, open_prepared, prepare, prepare_data
from .sources import Document, read_sources

__all__ = ["Batches", "Document", "Prepared", "ValDocument", "get_batch", "lm_batches", "open_prepared", "prepare",
           "prepare_data", "read_sources"]
