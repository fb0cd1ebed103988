"""The tvq archive: a safetensors file of bit-packed codes plus a JSON header (docs/format.md).

`format` is the header schema and the layout derived from it, `schemes` the registry of
quantization schemes, `container` the safetensors framing, `parts` one quantized part's stored
tensors, and `reader` / `writer` open and stream whole archives.
"""

from .format import ArchiveHeader, Part, TensorEntry
from .reader import Archive, open_archive
from .writer import ArchiveWriter

__all__ = ["Archive", "ArchiveHeader", "ArchiveWriter", "Part", "TensorEntry", "open_archive"]
