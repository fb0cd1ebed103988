"""The tvq archive: a safetensors file of bit-packed codes plus a JSON header (docs/format.md).

`format` is the header schema and the layout derived from it, `schemes` the registry of
quantization schemes, `container` the safetensors framing, `parts` one quantized part's stored
tensors, and `reader` / `writer` open and stream whole archives. The writer (and the file
machinery it brings) loads on first use: `tvq inspect` only reads.
"""

from .format import ArchiveHeader, Part, TensorEntry
from .reader import Archive, open_archive


def __getattr__(name: str) -> object:
    if name != "ArchiveWriter":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .writer import ArchiveWriter

    return ArchiveWriter


__all__ = ["Archive", "ArchiveHeader", "ArchiveWriter", "Part", "TensorEntry", "open_archive"]
