"""The tvq archive: a safetensors file of bit-packed codes plus a JSON header (docs/format.md)."""

from .format import ArchiveHeader, Part, TensorEntry
from .reader import Archive, open_archive
from .writer import ArchiveWriter

__all__ = ["Archive", "ArchiveHeader", "ArchiveWriter", "Part", "TensorEntry", "open_archive"]
