"""Container signatures that more than one sniffer (audio, video) recognises: one definition each."""

from __future__ import annotations

#: First box types of an ISO base media file (MP4, M4A, MOV: `pnot` opens old QuickTime files).
ISO_BMFF_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"})
#: An EBML header: Matroska and WebM.
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def is_iso_bmff(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] in ISO_BMFF_BOXES


def is_matroska(head: bytes) -> bool:
    return head[:4] == EBML_MAGIC
