"""Frames of low-rate records: gathered while tensors are packed, written after the last one.

The records of small low-rate parts of one role go, in entry order, into one stored tensor
(`frame:ROLE`, docs/format.md), so that an archive of many small tensors does not pay a stored
tensor's header entries and checksum for each record. Frames hold only entries below
`format.FRAMED_BELOW` elements, so what waits here stays small.
"""

from __future__ import annotations

from ..archive.format import ArchiveHeader, frame_key
from .blocked import Output


class Frames:
    def __init__(self, header: ArchiveHeader, roles: list[str] | None = None):
        """Frames of `roles` that the header has a frame for (default: all of them)."""
        roles = list(header.frames) if roles is None else roles
        self._records = {
            frame_key(r): [] for r in header.roles if r in roles and r in header.frames
        }

    def split(self, outputs: list[Output]) -> list[Output]:
        """Keep the records among `outputs` (under their frame's key); return the rest."""
        rest = []
        for key, data in outputs:
            if key in self._records:
                self._records[key].append(bytes(data))
            else:
                rest.append((key, data))
        return rest

    def stored(self) -> list[Output]:
        """Each frame's stored tensor, in layout order."""
        return [(key, b"".join(records)) for key, records in self._records.items()]
